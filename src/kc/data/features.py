"""Precomputed features instead of pixels: a manifest path `<file>.npy#<row>` names one row of a 2-D .npy array.

With the backbone `kc_features` (the identity, `backbone_args: {dim: D}`), every stage trains and evaluates the
network's head on those rows: the way to use a frozen backbone's embeddings, and how the 100K-class benchmark runs
on a CPU (`kc generate-benchmark --preset features-100k`). Arrays are memory-mapped, so they may exceed RAM.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from timm.models import register_model
from torch import nn

MARK = ".npy#"


def is_feature_path(path: str) -> bool:
    return MARK in path


def split_feature_path(path: str) -> tuple[str, int]:
    """'<file>.npy#<row>' -> (file, row)."""
    file, _, row = path.rpartition("#")
    return file, int(row)


@functools.lru_cache(maxsize=16)
def _array(path: str) -> np.ndarray:
    array = np.load(path, mmap_mode="r")
    if array.ndim != 2:
        raise ValueError(f"{path}: feature arrays must be 2-D (rows x dims), not {array.shape}")
    return array


def read_feature(root: Path, path: str) -> torch.Tensor:
    file, row = split_feature_path(path)
    array = _array(str(root / file))
    if not 0 <= row < len(array):
        raise IndexError(f"{root / file}: row {row} outside its {len(array)} rows")
    return torch.from_numpy(np.asarray(array[row], dtype=np.float32))


def feature_problem(root: Path, path: str) -> str | None:
    """None if the row can be read, else why not (for the checks before training)."""
    try:
        file, row = split_feature_path(path)
    except ValueError:
        return f"'{path}': the part after '#' must be a row number"
    if not (root / file).is_file():
        return "file not found"
    try:
        read_feature(root, path)
    except (ValueError, IndexError, OSError) as exc:
        return str(exc)
    return None


class Features(nn.Module):
    """The identity as a backbone: the inputs are the features."""

    def __init__(self, dim: int, **_: object):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register_model
def kc_features(pretrained: bool = False, dim: int = 128, **kwargs: object) -> Features:
    return Features(dim)
