"""Seeded train/val/test splits.

Each image's split is decided by a hash of (seed, path), not by its position: adding or reordering images never
moves an existing image to another split. Fractions are therefore met in expectation, not exactly.
"""

from __future__ import annotations

import hashlib

from kc.data.samples import Sample


def split_unit(seed: int, path: str) -> float:
    digest = hashlib.sha1(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(samples: list[Sample], val: float, test: float, seed: int) -> list[Sample]:
    """Give every sample without a split one; samples that already have a split keep it."""
    out = []
    for s in samples:
        if s.split is not None:
            out.append(s)
            continue
        u = split_unit(seed, s.path)
        out.append(s.with_split("test" if u < test else "val" if u < test + val else "train"))
    return out


def training_folds(samples: list[Sample], folds: int, seed: int) -> list[int]:
    """The fold (0 .. folds-1) of each training sample, for cross-fitted specialists. Like the split, decided by a
    hash of (seed, path), so that adding images never moves an existing one to another fold."""
    return [min(folds - 1, int(split_unit(seed, f"fold:{s.path}") * folds)) for s in samples]
