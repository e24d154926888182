"""A run directory: its resolved config, taxonomy and data index, shared by every stage of the run.

Layout::

    RUN/config.yaml          the resolved config (absolute paths)
    RUN/taxonomy.json        the taxonomy the run uses (class order = model output order)
    RUN/data/{train,val,test}.jsonl, RUN/data/check.json   the split, checked once; later stages reuse it
    RUN/data/unlabeled.{jsonl,json}   data.unlabeled's images, checked once (again when that manifest changes)
    RUN/<stage>/             checkpoints/, tensorboard/, metrics_<split>.json, ...

Preparing is idempotent: a second call reads what the first wrote. Re-using a run directory with a config that
differs in what decides the data or the model is refused, naming the keys that differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kc import distributed
from kc.config import RunConfig, dump_yaml
from kc.data.decoded import DecodedImages, decoded_path, ensure_decoded
from kc.data.features import is_feature_path
from kc.data.images import check_images
from kc.data.samples import SPLITS, Sample, load_unlabeled
from kc.data.sources import load_source
from kc.data.splits import assign_splits
from kc.errors import CheckpointError, DataError
from kc.io import atomic_write_json, atomic_write_text, read_json, sha256_file
from kc.taxonomy import Taxonomy

# Keys whose change does not change any result, so a run may be resumed with them changed.
_FREE_KEYS = {"run_dir", "device", "data.num_workers"}
# Training sections: each stage's checkpoint fingerprint guards its own section, so they are not checked here.
_STAGE_SECTIONS = ("generalist.", "specialists.", "student.", "control")
_SAME_RESULTS = ("data.num_workers", "data.decoded_cache")  # how the data is read, not what it is
# Unlabeled images change only the stages after the generalist, whose checkpoints fingerprint them: they may be
# added to (or changed in) a run whose generalist and specialists are trained.
_LATER_STAGES_ONLY = ("data.unlabeled",)


@dataclass
class Run:
    cfg: RunConfig
    dir: Path
    taxonomy: Taxonomy
    image_root: Path
    splits: dict[str, list[Sample]]
    decoded: DecodedImages | None = None  # data.decoded_cache: every image decoded once
    unlabeled: list[Sample] = field(default_factory=list)  # data.unlabeled's images (no labels, no split)

    def stage_dir(self, stage: str) -> Path:
        return stage_path(self.dir, stage)


def stage_path(run_dir: Path, stage: str) -> Path:
    """Where a stage of the run in `run_dir` keeps its checkpoints: RUN/<stage>."""
    return run_dir / stage


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ. A key the old config lacks (added to kc after that run was made) is unchanged
    when the new config holds the key's default: the run was made with what the default does."""
    a, b = _flat(old), _flat(new)
    for key in set(b) - set(a):
        default = _default_of(key)
        if default is not _NO_DEFAULT:
            a[key] = default
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(tuple(_FREE_KEYS)))


_NO_DEFAULT = object()


def _default_of(key: str) -> Any:
    """The default of a dotted config key ('data.augment.feature_noise' -> 0.0), as the config file writes it."""
    model: Any = RunConfig
    *sections, name = key.split(".")
    for section in [*sections, name]:
        fields = getattr(model, "model_fields", None)
        if fields is None or section not in fields:
            return _NO_DEFAULT
        field = fields[section]
        if section == name:
            value = field.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                return _NO_DEFAULT
            return json.loads(json.dumps(value, default=str))  # the YAML/JSON form (tuples as lists, paths as text)
        model = field.annotation
    return _NO_DEFAULT


def _write_split(path: Path, samples: list[Sample]) -> None:
    lines = [
        json.dumps(
            {"path": s.path, "labels": list(s.labels), "where": s.where}
            | ({"negatives": list(s.negatives)} if s.negatives else {})
        )
        for s in samples
    ]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def _read_split(path: Path, split: str | None) -> list[Sample]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        out.append(Sample(obj["path"], tuple(obj["labels"]), split, obj["where"], tuple(obj.get("negatives", ()))))
    return out


def prepare_run(cfg: RunConfig, progress: bool = True) -> Run:
    run_dir = cfg.run_dir
    config_path = run_dir / "config.yaml"
    data_dir = run_dir / "data"
    check_file = data_dir / "check.json"
    resolved = cfg.resolved()
    # Once the data is prepared, the run is bound to it; before that (e.g. after a data error), any config goes.
    if check_file.is_file() and config_path.is_file():
        old = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        bound = [k for k in changed_keys(old, resolved) if not k.startswith(_STAGE_SECTIONS + _SAME_RESULTS)]
        diff = [k for k in bound if k not in _LATER_STAGES_ONLY]
        if diff:
            raise CheckpointError(
                f"{run_dir}: this run directory was made with another config (differs in: {', '.join(diff[:8])}); "
                "use a new run_dir, or delete the old one"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, dump_yaml(resolved))
    if check_file.is_file():
        taxonomy = Taxonomy.load(run_dir / "taxonomy.json")
        splits = {s: _read_split(data_dir / f"{s}.jsonl", s) for s in SPLITS}
        image_root = Path(read_json(check_file)["image_root"])
        return _finish(cfg, run_dir, taxonomy, image_root, splits, progress)

    d = cfg.data
    taxonomy, samples, image_root = load_source(d)
    samples = assign_splits(samples, d.split.val, d.split.test, cfg.seed)
    kept, skipped = check_images(samples, image_root, d.bad_images, progress=progress, max_pixels=d.max_image_pixels)
    splits = {s: [x for x in kept if x.split == s] for s in SPLITS}
    if not splits["train"]:
        raise DataError(
            f"{d.manifest or d.image_folder or d.shards}: no training images; check the split column or fractions"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    taxonomy.save(run_dir / "taxonomy.json")
    for s in SPLITS:
        _write_split(data_dir / f"{s}.jsonl", splits[s])
    atomic_write_json(
        check_file,
        {
            "image_root": str(image_root),
            "images": len(samples),
            "kept": len(kept),
            "skipped": skipped,
            "split_sizes": {s: len(v) for s, v in splits.items()},
        },
    )
    return _finish(cfg, run_dir, taxonomy, image_root, splits, progress)


def _finish(
    cfg: RunConfig,
    run_dir: Path,
    taxonomy: Taxonomy,
    image_root: Path,
    splits: dict[str, list[Sample]],
    progress: bool,
) -> Run:
    """The Run, its unlabeled images and decoded cache added (both checked or built once)."""
    data_dir = run_dir / "data"
    unlabeled = _unlabeled(cfg, data_dir, image_root, splits, progress)
    samples = [s for split in SPLITS for s in splits[split]] + unlabeled
    decoded = _decoded(cfg, data_dir, samples, image_root, progress)
    return Run(cfg, run_dir, taxonomy, image_root, splits, decoded, unlabeled)


def _unlabeled(
    cfg: RunConfig, data_dir: Path, image_root: Path, splits: dict[str, list[Sample]], progress: bool
) -> list[Sample]:
    """data.unlabeled's images, read and checked once: RUN/data/unlabeled.jsonl, its manifest's path and SHA-256
    in unlabeled.json (written last), read again when the manifest changes."""
    d = cfg.data
    if d.unlabeled is None:
        return []
    listed, meta = data_dir / "unlabeled.jsonl", data_dir / "unlabeled.json"
    source = {"manifest": str(d.unlabeled), "sha256": sha256_file(d.unlabeled) if d.unlabeled.is_file() else None}
    if meta.is_file() and listed.is_file() and {k: read_json(meta).get(k) for k in source} == source:
        return _read_split(listed, None)
    labelled = {s.path for split in SPLITS for s in splits[split]}
    samples = load_unlabeled(d.unlabeled, image_root, labelled)
    kept, skipped = check_images(samples, image_root, d.bad_images, progress=progress, max_pixels=d.max_image_pixels)
    meta.unlink(missing_ok=True)  # stale from here on
    _write_split(listed, kept)
    atomic_write_json(meta, {**source, "images": len(samples), "kept": len(kept), "skipped": skipped})
    return kept


def _decoded(
    cfg: RunConfig, data_dir: Path, samples: list[Sample], image_root: Path, progress: bool
) -> DecodedImages | None:
    """The run's decoded images when data.decoded_cache asks for them (never for rows of features)."""
    if not cfg.data.decoded_cache or not samples or is_feature_path(samples[0].path):
        return None
    distributed.on_main(lambda: ensure_decoded(data_dir, cfg.data, samples, image_root, progress))  # rank 0 builds
    return DecodedImages(decoded_path(data_dir, cfg.data))
