"""A foreign checkpoint -> a local model folder in timm's (the Hugging Face Hub's) layout, which `model.backbone:
local-dir:PATH` (and `timm.create_model("local-dir:PATH")`) loads without a download.

The folder holds `config.json` (architecture, num_classes, pretrained_cfg: input size, interpolation, crop, mean,
std) and `model.safetensors` under the timm architecture's own tensor names. Names are mapped one to one: by name
where the checkpoint already uses the architecture's names, else by position, the two lists of tensors being in
the same module order (as for a port of the same network); every tensor's shape is checked either way, and any
difference stops the conversion naming the first tensor that differs. A checkpoint is read with
`torch.load(weights_only=True)` (or as safetensors): never an arbitrary pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file

from kc.errors import CheckpointError, ConfigError
from kc.hub_layout import CONFIG, WEIGHTS
from kc.io import atomic_write, atomic_write_json, sha256_file

PRETRAINED_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "first_conv", "classifier")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (safetensors, or a torch file read with weights_only=True, unwrapped from a
    'state_dict' or 'model' entry), in their stored order."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc}); only plain tensors are loaded") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: holds no mapping of tensor names to tensors")
    tensors = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def map_to_architecture(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> tuple[dict[str, torch.Tensor], str]:
    """`source`'s tensors under `target`'s names, and how they were paired ('name' or 'order')."""
    if set(target) <= set(source):
        pairs, how = [(name, source[name], name) for name in target], "name"
    else:
        if len(source) != len(target):
            raise CheckpointError(
                f"{what}: {len(source)} tensors, the architecture has {len(target)}; not a checkpoint of this "
                "architecture (or of another variant: check --architecture and --num-classes)"
            )
        pairs, how = [(s, t, name) for (s, t), name in zip(source.items(), target, strict=True)], "order"
    for source_name, tensor, name in pairs:
        wanted = tuple(target[name].shape)
        if tuple(tensor.shape) != wanted:
            raise CheckpointError(
                f"{what}: tensor '{source_name}' has shape {tuple(tensor.shape)}, the architecture's '{name}' "
                f"{wanted} (paired by {how}); check --architecture and --num-classes"
            )
    mapped = {name: tensor.detach().to(target[name].dtype).contiguous() for _, tensor, name in pairs}
    return mapped, how


def convert_checkpoint(
    source: Path,
    out: Path,
    architecture: str,
    *,
    num_classes: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    input_size: int | None = None,
    interpolation: str | None = None,
    license: str | None = None,
) -> dict[str, Any]:
    """Write `out`/config.json and `out`/model.safetensors; returns the config written. The preprocessing is the
    architecture's default pretrained_cfg unless given (give what the checkpoint was trained with)."""
    if not timm.is_model(architecture):
        raise ConfigError(f"--architecture: '{architecture}' is not a timm model")
    defaults = timm.get_pretrained_cfg(architecture)
    default_cfg = defaults.to_dict() if defaults is not None else {}
    classes = num_classes if num_classes is not None else int(default_cfg.get("num_classes") or 1000)
    model = timm.create_model(architecture, pretrained=False, num_classes=classes)
    state, how = map_to_architecture(read_state_dict(source), model.state_dict(), str(source))
    model.load_state_dict(state)  # strict: every tensor of the architecture is set
    pretrained_cfg = {k: default_cfg[k] for k in PRETRAINED_KEYS if default_cfg.get(k) is not None}
    if mean is not None:
        pretrained_cfg["mean"] = tuple(mean)
    if std is not None:
        pretrained_cfg["std"] = tuple(std)
    if input_size is not None:
        pretrained_cfg["input_size"] = (3, input_size, input_size)
    if interpolation is not None:
        pretrained_cfg["interpolation"] = interpolation
    if license is not None:
        pretrained_cfg["license"] = license
    config = {
        "architecture": architecture,
        "num_classes": classes,
        "num_features": int(model.num_features),
        "pretrained_cfg": pretrained_cfg,
        "converted_from": {"file": source.name, "sha256": sha256_file(source), "paired_by": how},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG, config)
    return config
