"""The export artifact's layout, which `kc export` writes and the runtime reads: its formats, file names and
manifest (`kc_model.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kc.errors import CheckpointError

FORMATS = ("onnx", "torchscript", "hub")  # hub: timm's layout (config.json + model.safetensors, kc.serve.hub)
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "hub": "model.safetensors"}
MANIFEST = "kc_model.json"


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / MANIFEST}: cannot read the export manifest: {exc}") from None
    if manifest.get("format") not in FORMATS:
        raise CheckpointError(f"{path / MANIFEST}: unknown format {manifest.get('format')!r}")
    return manifest
