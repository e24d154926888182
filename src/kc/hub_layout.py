"""A model folder in timm's (the Hugging Face Hub's) layout: `config.json` (architecture, num_classes,
pretrained_cfg with the preprocessing) beside `model.safetensors`. `model.backbone: local-dir:PATH` names one, as
`timm.create_model("local-dir:PATH")` does; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kc.errors import ConfigError

CONFIG, WEIGHTS = "config.json", "model.safetensors"
LOCAL_DIR = "local-dir:"  # timm's prefix for a model folder on disk


def local_dir_config(backbone: str) -> dict[str, Any] | None:
    """The config.json of a `local-dir:PATH` backbone (None for a timm model name), checked to be loadable."""
    if not backbone.startswith(LOCAL_DIR):
        return None
    folder = Path(backbone[len(LOCAL_DIR) :])
    path = folder / CONFIG
    if not path.is_file():
        raise ConfigError(
            f"model.backbone: {path} not found; a local-dir backbone is a folder with {CONFIG} and {WEIGHTS} "
            "(kc convert-weights writes one from a checkpoint)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ConfigError(f"{path}: needs an 'architecture' naming a timm model")
    if not isinstance(config.get("pretrained_cfg", {}), dict):
        raise ConfigError(f"{path}: 'pretrained_cfg' must be a mapping")
    if not (folder / WEIGHTS).is_file():
        raise ConfigError(f"model.backbone: {folder / WEIGHTS} not found beside {CONFIG}")
    return config
