"""WebDataset tar shards: writing them from any kc data source (`kc make-shards`) and reading images from them.

A shard is a plain tar in WebDataset layout: for each image a member `<key>.<ext>` (the original file's bytes,
unchanged) and a member `<key>.json` with its labels::

    {"labels": ["sparrow", ...], "negatives": [...], "split": "train", "source": "birds/0001.jpg"}

(labels and negatives are class ids of the taxonomy; split and source optional). A shard directory holds the
shards, `taxonomy.json`, and `shards.json` (the list of shards and their sizes, written last). Any tool that reads
WebDataset reads these shards, and kc reads shards other tools wrote in this layout (a directory of `*.tar` with
`<key>.json` labels, no shards.json needed).

kc reads shards by random access: one pass over the tar headers gives each member's offset, and an image is one
seek and one read. Training therefore keeps everything a manifest run has: an exact seeded shuffle of the whole
dataset every epoch (no shuffle buffer), exact mid-epoch resume, the soft-target cache's row indices, and each
process's and loader worker's part of every batch (the sampler splits batches, not shards, so none overlap and
none is lost). A sample's path is `<shard>.tar/<member>`, relative to the shard directory; any image path whose
parent is a `.tar` file is read this way (`kc predict` included).
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from kc.data.samples import IMAGE_SUFFIXES, Sample, _class_indices, _descendants
from kc.errors import DataError, format_problems
from kc.io import atomic_write, atomic_write_json, read_json
from kc.taxonomy import Taxonomy

INDEX = "shards.json"


def _key(member: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the name up to the first dot of its last path component."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@functools.lru_cache(maxsize=256)
def _members(tar_path: str) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of its data, size), from one pass over the headers (cached per process)."""
    with tarfile.open(tar_path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def read_member(tar_path: Path, member: str) -> bytes:
    entry = _members(str(tar_path)).get(member)
    if entry is None:
        raise FileNotFoundError(f"{tar_path}: no member '{member}'")
    offset, size = entry
    with open(tar_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{tar_path}: member '{member}' is cut short (truncated shard)")
    return data


def image_source(path: Path) -> Path | io.BytesIO:
    """A path to open: the file itself, or the bytes of a shard member when its parent is a .tar file."""
    if path.parent.suffix == ".tar" and path.parent.is_file():
        return io.BytesIO(read_member(path.parent, path.name))
    return path


def write_shards(
    samples: list[Sample],
    taxonomy: Taxonomy,
    image_root: Path,
    out: Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Write `samples` (splits assigned) into tar shards of `shard_size` images under `out`, in order. A shard
    already written whole (it is renamed into place only when complete) is kept, so an interrupted run resumes."""
    if shard_size < 1:
        raise DataError(f"--shard-size: {shard_size}; give at least 1 image per shard")
    out.mkdir(parents=True, exist_ok=True)
    taxonomy.save(out / "taxonomy.json")
    ids = [c.id for c in taxonomy.classes]
    shards = []
    for number, begin in enumerate(range(0, len(samples), shard_size)):
        part = samples[begin : begin + shard_size]
        name = f"{prefix}-{number:06d}.tar"
        shards.append({"file": name, "images": len(part)})
        if (out / name).is_file():
            continue

        def write(tmp: Path, part: list[Sample] = part, begin: int = begin) -> None:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i, s in enumerate(part, begin):
                    key = f"{i:09d}"
                    suffix = Path(s.path).suffix.lower() or ".img"
                    data = (image_root / s.path).read_bytes()
                    meta = {"labels": [ids[c] for c in s.labels], "split": s.split, "source": s.path}
                    if s.negatives:
                        meta["negatives"] = [ids[c] for c in s.negatives]
                    _add(tar, f"{key}{suffix}", data)
                    _add(tar, f"{key}.json", json.dumps(meta).encode())

        atomic_write(out / name, write)
        if on_shard is not None:
            on_shard(number)
    index = {"format": "webdataset", "images": len(samples), "shards": shards}
    atomic_write_json(out / INDEX, index)
    return index


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def load_shards(root: Path, taxonomy: Taxonomy, expand_ancestors: bool = False) -> list[Sample]:
    """Every image of the shards under `root` (in shards.json's order, else the .tar files sorted by name), with
    labels from its `<key>.json` (extended up and down the hierarchy as a manifest's with `expand_ancestors`).
    Unknown classes, images without labels and unreadable shards are reported all at once."""
    if not root.is_dir():
        raise DataError(f"{root}: shard directory not found; check 'data.shards' in your config")
    if (root / INDEX).is_file():
        files = [root / s["file"] for s in read_json(root / INDEX)["shards"]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(format_problems(f"{root / INDEX} lists shards that are missing", missing))
    else:
        files = sorted(root.glob("*.tar"))
    if not files:
        raise DataError(f"{root}: no .tar shards found (make them with kc make-shards)")
    samples: list[Sample] = []
    problems: list[str] = []
    for tar_path in files:
        try:
            samples += _shard_samples(tar_path, taxonomy, problems, expand_ancestors)
        except (tarfile.TarError, OSError) as exc:
            problems.append(f"{tar_path}: not a readable tar shard ({exc}); rewrite it with kc make-shards")
    if problems:
        raise DataError(format_problems(f"{len(problems)} problem(s) in the shards under {root}", problems))
    return samples


def _shard_samples(tar_path: Path, taxonomy: Taxonomy, problems: list[str], expand_ancestors: bool) -> list[Sample]:
    images: dict[str, str] = {}
    labels: dict[str, dict] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _key(m.name)
            if ext == "json":
                f = tar.extractfile(m)
                try:
                    labels[key] = json.loads(f.read()) if f is not None else {}
                except ValueError as exc:  # not JSON, or not UTF-8 text
                    problems.append(f"{tar_path}:{m.name}: not valid JSON ({exc})")
            elif f".{ext.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES:
                images[key] = m.name
    ancestors = expand_ancestors and taxonomy.ancestors
    descendants = expand_ancestors and _descendants(taxonomy).get
    out = []
    for key, member in images.items():
        where = f"{tar_path}:{key}"
        meta = labels.get(key)
        if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
            problems.append(f"{where}: no {key}.json with a 'labels' list beside {member}")
            continue
        present = _class_indices([str(x) for x in meta["labels"]], "", where, taxonomy, problems, ancestors)
        negatives = [str(x) for x in meta.get("negatives", [])]
        absent = _class_indices(negatives, " in negatives", where, taxonomy, problems, descendants)
        split = meta.get("split")
        if split not in (None, "train", "val", "test"):
            problems.append(f"{where}: split '{split}' is not train, val or test")
            continue
        if present is not None and absent is not None:
            path = f"{tar_path.name}/{member}"
            out.append(Sample(path, tuple(sorted(set(present))), split, where, tuple(sorted(set(absent)))))
    return out
