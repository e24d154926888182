"""`kc export`: a trained stage as a self-contained artifact directory, checked against the PyTorch model.

    EXPORT/model.onnx | model.pt   the network: images (B, 3, S, S), normalised -> logits (B, N)
    EXPORT/kc_model.json           format, stage, activation, preprocessing, parity figures, source weights
    EXPORT/taxonomy.json           the label table: class ids, names, verticals, hierarchy (output order)
    EXPORT/MODEL_CARD.md           classes, verticals, training data, metrics, intended use

`--format hub` writes timm's layout instead (config.json, model.safetensors, README.md with the Hub's front
matter; `kc.serve.hub`), with the same taxonomy.json and kc_model.json.

The artifact is written into a temporary directory next to the target and renamed into place only after the
exported network has been run and matched the PyTorch model on the run's test images (max abs difference of logits
at most `tolerance`), so a failed or interrupted export never leaves a half-written or unchecked artifact.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import kc
from kc.data.dataset import ImageDataset, collate
from kc.errors import CheckpointError, KCError
from kc.io import atomic_write_json, read_json, sha256_file
from kc.run import Run
from kc.serve.artifact import FORMATS, MANIFEST, MODEL_FILES
from kc.serve.hub import write_hub_files, write_readme
from kc.serve.model_card import model_card
from kc.serve.runtime import open_model  # the runtime is how users will load the artifact: checked through it
from kc.stages import FULL_MODEL_STAGES, STUDENT, activation, best_weights, file_digest, load_stage, new_model


class ExportError(KCError):
    pass


def _parity_batches(run: Run, images: int, batch_size: int) -> list[torch.Tensor]:
    """Preprocessed test images (or val, or train when the run has no test split), in batches."""
    samples = next((run.splits[s] for s in ("test", "val", "train") if run.splits[s]), [])[:images]
    dataset = ImageDataset(samples, run.image_root, run.cfg.data, train=False, decoded=run.decoded)
    return [b["images"] for b in DataLoader(dataset, batch_size=batch_size, collate_fn=collate)]


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
            verbose=False,
            # one self-contained file unless protobuf's 2 GB limit forces the weights beside it
            external_data=sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9,
        )


def _write_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))


def export_stage(
    run: Run,
    out_dir: Path,
    fmt: str = "onnx",
    stage: str = STUDENT,
    parity_images: int = 1024,
    tolerance: float = 1e-4,
    license: str = "other",
) -> dict[str, Any]:
    """Export a trained stage of `run` to `out_dir` (replaced if it exists); returns the artifact's manifest."""

    if fmt not in FORMATS:
        raise ExportError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    if stage not in FULL_MODEL_STAGES:
        raise ExportError(f"--stage: '{stage}' is not one of {', '.join(FULL_MODEL_STAGES)}")
    weights = best_weights(run.stage_dir(stage))
    digest = file_digest(weights)  # raises a clear error when the stage is not trained
    model = load_stage(run.stage_dir(stage), new_model(run, stage)).eval()
    batches = _parity_batches(run, parity_images, 64)
    if not batches:
        raise ExportError(f"{run.dir}: no images to check the export on")

    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model_file = staging / MODEL_FILES[fmt]
        if fmt == "hub":
            write_hub_files(run, stage, model, staging)
        else:
            with torch.no_grad():
                (_write_onnx if fmt == "onnx" else _write_torchscript)(model, batches[0], model_file)
        shutil.copy(run.dir / "taxonomy.json", staging / "taxonomy.json")
        loss = run.cfg.generalist.loss
        manifest: dict[str, Any] = {
            "format": fmt,
            "file": model_file.name,
            "sha256": sha256_file(model_file),  # checked by every reader (kc.serve.runtime.open_model)
            "stage": stage,
            "activation": activation(stage, loss),
            "preprocess": {
                "size": run.cfg.data.image_size,
                "mean": run.cfg.data.mean,
                "std": run.cfg.data.std,
                "interpolation": run.cfg.data.interpolation,
            },
            "classes": run.taxonomy.num_classes,
            "verticals": run.taxonomy.num_verticals,
            "source": {"run": str(run.dir), "weights": str(weights), "sha256_16": digest},
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": kc.versions(),
        }
        atomic_write_json(staging / MANIFEST, manifest)

        # Parity: the artifact, loaded the way users load it, against the PyTorch model on the same inputs.
        exported = open_model(staging)
        worst, count = 0.0, 0
        with torch.no_grad():
            for images in batches:
                expected = model(images).float().numpy()
                worst = max(worst, float(np.abs(exported.logits(images.numpy()) - expected).max()))
                count += len(images)
        manifest["parity"] = {"images": count, "max_abs_logit_difference": worst, "tolerance": tolerance}
        if not worst <= tolerance:
            raise ExportError(
                f"the {fmt} export differs from the PyTorch model by up to {worst:.3g} in logits on {count} images "
                f"(tolerance {tolerance:g}); nothing was written to {out_dir}"
            )
        atomic_write_json(staging / MANIFEST, manifest)
        metrics_path = run.dir / "metrics.json"
        metrics = read_json(metrics_path) if metrics_path.is_file() else None
        card = model_card(run, manifest, metrics)
        if fmt == "hub":  # the Hub's (and timm's) name for the model card, with its metadata on top
            write_readme(staging, out_dir.name, run, card, license)
        else:
            (staging / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is kept until the new one is in place."""
    if target.exists():
        if not (target / MANIFEST).is_file():
            raise CheckpointError(f"{target}: exists and is not a kc export; choose another --out")
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
