"""A model's weights as a safetensors file (never a pickle): written atomically, read with a message naming the file."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from kc.errors import CheckpointError
from kc.io import atomic_write


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_weights(path: Path, model: nn.Module, strict: bool = True) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights not found; train that stage first (kc pipeline runs every stage)")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); delete it and re-run") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: does not fit this model (missing: {missing[:5]}, unexpected: {unexpected[:5]}); "
            "was it written by another config?"
        )
