"""The soft-target cache on disk: its layout, what a shard records, and its index.

Layout (one shard per teacher, so building resumes teacher by teacher)::

    RUN/cache/teacher_NNN.json         what shard v was built from (K, teacher weights, classes, training images,
                                       preprocessing), its sizes and its arrays' SHA-256 (checked when the cache
                                       is opened); written after its arrays: the shard is done
    RUN/cache/index.json               a summary of the finished shards
    RUN/cache/teacher_NNN.rows.npy     (n_v,) int64: index into the student's training images (the training
                                       split, then any routed unlabeled images) of each image of shard v
    RUN/cache/teacher_NNN.logits.npy   (n_v, K) float32: the teacher's K largest logits, largest first
    RUN/cache/teacher_NNN.classes.npy  (n_v, K) int32: their class indices within the vertical

Arrays are plain .npy files read memory-mapped: large and contiguous, never one file per image. Each file is
written under a temporary name and renamed. `kc.distill.cache` builds the shards, `kc.distill.cached_teachers`
reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from kc.data.samples import Sample
from kc.io import atomic_write, atomic_write_json, read_json
from kc.run import Run

INDEX = "index.json"
ARRAYS = ("rows", "logits", "classes")  # the arrays of a shard: teacher_NNN.<part>.npy
PARTS = {
    "taxonomy": "classes",
    "train_split": "training images",
    "preprocess": "preprocessing",
    "specialists": "specialist weights",
}
VERSION = 1


def cache_dir(run: Run) -> Path:
    return run.dir / "cache"


def split_digest(samples: list[Sample]) -> str:
    text = json.dumps([[s.path, list(s.labels)] for s in samples])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_fingerprint(run: Run, samples: list[Sample]) -> dict[str, Any]:
    """What every teacher's shard depends on besides the teacher: classes, the student's training images
    (`samples`, with their labels), preprocessing."""
    d = run.cfg.data
    return {
        "taxonomy": run.taxonomy.fingerprint(),
        "train_split": split_digest(samples),
        "preprocess": [d.image_size, list(d.mean), list(d.std)],
    }


def shard_prefix(vertical: int) -> str:
    return f"teacher_{vertical:03d}"


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def read_shards(run: Run) -> dict[int, dict[str, Any]]:
    """The finished shards: vertical -> its metadata (teacher_NNN.json, written after its arrays)."""
    shards = {}
    for v in range(run.taxonomy.num_verticals):
        meta = cache_dir(run) / f"{shard_prefix(v)}.json"
        if meta.is_file():
            shards[v] = read_json(meta)
    return shards


def write_index(run: Run) -> dict[str, Any]:
    """index.json: a summary of the finished shards, for people and tools (the loader reads the shards' own
    metadata, so processes building shards side by side never share a file)."""
    shards = read_shards(run)
    index = {
        "version": VERSION,
        "top_k": max((m["top_k"] for m in shards.values()), default=None),
        "shards": {str(v): m for v, m in shards.items()},
    }
    atomic_write_json(cache_dir(run) / INDEX, index)
    return index


def cache_bytes(run: Run) -> int:
    return sum(p.stat().st_size for p in cache_dir(run).glob("teacher_*.npy"))
