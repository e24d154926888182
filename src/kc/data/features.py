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
    """(dim,) float32: the row '<file>.npy#<row>' names."""
    return read_features(root, [path])[0]


def read_features(root: Path, paths: list[str]) -> torch.Tensor:
    """(len(paths), dim) float32: the rows the paths name, with one indexed read per array (a training batch of
    feature rows costs one gather, not a Python call per row)."""
    located = [split_feature_path(p) for p in paths]
    rows = np.array([row for _, row in located], dtype=np.int64)
    files = np.array([file for file, _ in located])
    out: np.ndarray | None = None
    for file in dict.fromkeys(files.tolist()):
        array = _array(str(root / file))
        mine = files == file
        outside = (rows[mine] < 0) | (rows[mine] >= len(array))
        if outside.any():
            raise IndexError(f"{root / file}: row {rows[mine][outside][0]} outside its {len(array)} rows")
        if out is None:
            out = np.empty((len(paths), array.shape[1]), dtype=np.float32)
        out[mine] = array[rows[mine]]
    return torch.from_numpy(out if out is not None else np.empty((0, 0), dtype=np.float32))


def feature_problems(root: Path, paths: list[str]) -> list[str | None]:
    """For each path, None if its row can be read, else why not (for the checks before training): each array is
    opened once and the rows checked against its length, not read one by one."""
    problems: list[str | None] = [None] * len(paths)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for i, path in enumerate(paths):
        try:
            file, row = split_feature_path(path)
        except ValueError:
            problems[i] = f"'{path}': the part after '#' must be a row number"
            continue
        by_file.setdefault(file, []).append((i, row))
    for file, entries in by_file.items():
        why = None
        if not (root / file).is_file():
            why = "file not found"
        else:
            try:
                rows = len(_array(str(root / file)))  # opening maps the whole array: a truncated file fails here
            except (ValueError, OSError) as exc:
                why = str(exc)
        for i, row in entries:
            if why is None and not 0 <= row < rows:
                problems[i] = f"{root / file}: row {row} outside its {rows} rows"
            else:
                problems[i] = why
    return problems


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
