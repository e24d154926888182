"""The soft-target cache: each specialist run once over its vertical's training images, its top-K logits stored.

Layout (one shard per teacher, so building resumes teacher by teacher)::

    RUN/cache/index.json               what the cache was built from (fingerprint), K, and the finished shards
    RUN/cache/teacher_NNN.rows.npy     (n_v,) int64: index into the run's training split of each image of shard v
    RUN/cache/teacher_NNN.logits.npy   (n_v, K) float32: the teacher's K largest logits, largest first
    RUN/cache/teacher_NNN.classes.npy  (n_v, K) int32: their class indices within the vertical
    RUN/cache/teacher_NNN.other.npy    (n_v,) float32: the 'other' logit, for teachers that have that output

Arrays are plain .npy files read memory-mapped: large and contiguous, never one file per image. Each file is
written under a temporary name and renamed; a shard enters index.json only when its files are complete. The
fingerprint covers the taxonomy, every specialist's weights, the training split and the preprocessing: a cache
built from anything else is refused by training (`kc cache-targets` rebuilds what is stale).

Targets are rebuilt exactly as the online teachers build them (sigmoid(logit / T) on the top K kept, 0 elsewhere),
but from the un-augmented image, while the student sees augmented views (the cost is measured in
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kc.data.dataset import ImageDataset, collate
from kc.distill.targets import SoftTargets, selected_verticals
from kc.errors import CheckpointError
from kc.io import atomic_write, atomic_write_json, read_json
from kc.run import Run
from kc.taxonomy import Taxonomy

INDEX = "index.json"
PARTS = {
    "taxonomy": "classes",
    "train_split": "training images",
    "preprocess": "preprocessing",
    "specialists": "specialist weights",
}
VERSION = 1


def cache_dir(run: Run) -> Path:
    return run.dir / "cache"


def _split_digest(run: Run) -> str:
    text = json.dumps([[s.path, list(s.labels)] for s in run.splits["train"]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_fingerprint(run: Run, specialist_digests: list[str]) -> dict[str, Any]:
    d = run.cfg.data
    return {
        "taxonomy": run.taxonomy.fingerprint(),
        "train_split": _split_digest(run),
        "preprocess": [d.image_size, list(d.mean), list(d.std)],
        "specialists": specialist_digests,
    }


def _shard_prefix(vertical: int) -> str:
    return f"teacher_{vertical:03d}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def build_cache(
    run: Run,
    teachers: list[torch.nn.Module],
    specialist_digests: list[str],
    top_k: int,
    device: torch.device,
    batch_size: int = 256,
    progress: bool = False,
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write (or complete) the cache; shards already built from the same teacher and K are kept."""
    out = cache_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = cache_fingerprint(run, specialist_digests)
    index_path = out / INDEX
    index = read_json(index_path) if index_path.is_file() else {}
    same_base = {k: v for k, v in index.get("fingerprint", {}).items() if k != "specialists"} == {
        k: v for k, v in fingerprint.items() if k != "specialists"
    }
    if not same_base or index.get("top_k") != top_k or index.get("version") != VERSION:
        index = {"version": VERSION, "top_k": top_k, "fingerprint": fingerprint, "shards": {}}
    old_digests = index["fingerprint"]["specialists"]
    shards: dict[str, Any] = {
        key: shard
        for key, shard in index["shards"].items()
        if int(key) < len(old_digests) and old_digests[int(key)] == specialist_digests[int(key)]
    }
    index["fingerprint"] = fingerprint
    train = run.splits["train"]
    for v, teacher in enumerate(teachers):
        if str(v) in shards:
            continue
        start, end = run.taxonomy.vertical_ranges[v]
        rows = np.array([i for i, s in enumerate(train) if any(start <= c < end for c in s.labels)], dtype=np.int64)
        k = min(top_k, end - start)
        logits = np.zeros((len(rows), k), dtype=np.float32)
        classes = np.zeros((len(rows), k), dtype=np.int32)
        other = np.zeros(len(rows), dtype=np.float32)
        has_other = False
        dataset = ImageDataset([train[i] for i in rows], run.image_root, run.cfg.data, train=False)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=run.cfg.data.num_workers)
        teacher.eval().to(device)
        done = 0
        desc = f"caching teacher {run.taxonomy.verticals[v].id}"
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
                z = teacher(batch["images"].to(device)).float().cpu()
                top = z[:, : end - start].topk(k, dim=1)
                n = len(z)
                logits[done : done + n] = top.values.numpy()
                classes[done : done + n] = top.indices.numpy()
                if z.shape[1] > end - start:  # the 'other' output
                    has_other = True
                    other[done : done + n] = z[:, end - start].numpy()
                done += n
        prefix = _shard_prefix(v)
        _save_npy(out / f"{prefix}.rows.npy", rows)
        _save_npy(out / f"{prefix}.logits.npy", logits)
        _save_npy(out / f"{prefix}.classes.npy", classes)
        if has_other:
            _save_npy(out / f"{prefix}.other.npy", other)
        shards[str(v)] = {"images": len(rows), "k": k, "other": has_other, "prefix": prefix}
        index["shards"] = shards
        atomic_write_json(index_path, index)  # the shard counts only once its files are all in place
        if on_shard is not None:
            on_shard(v)
    index["shards"] = shards
    atomic_write_json(index_path, index)
    return index


def cache_bytes(run: Run) -> int:
    return sum(p.stat().st_size for p in cache_dir(run).glob("teacher_*.npy"))


class CachedTeachers:
    """Soft targets from the cache, built as `OnlineTeachers` builds them (same SoftTargets), by training index."""

    def __init__(
        self,
        run: Run,
        specialist_digests: list[str],
        top_k: int,
        temperature: float,
        unselected: str = "zero",
    ):
        directory = cache_dir(run)
        index_path = directory / INDEX
        if not index_path.is_file():
            raise CheckpointError(f"{directory}: no soft-target cache; build it with `kc cache-targets RUN`")
        index = read_json(index_path)
        expected = cache_fingerprint(run, specialist_digests)
        stale = [PARTS[k] for k, v in expected.items() if index.get("fingerprint", {}).get(k) != v]
        if stale:
            raise CheckpointError(
                f"{directory}: the soft-target cache was built from other {' and '.join(stale)} than this run "
                "now has; rebuild it with `kc cache-targets RUN` (or delete it to train with online teachers)"
            )
        taxonomy: Taxonomy = run.taxonomy
        missing = [taxonomy.verticals[v].id for v in range(taxonomy.num_verticals) if str(v) not in index["shards"]]
        if missing:
            raise CheckpointError(
                f"{directory}: the cache lacks the teachers of {', '.join(missing[:10])}; finish it with "
                "`kc cache-targets RUN`"
            )
        short = [
            taxonomy.verticals[v].id
            for v in range(taxonomy.num_verticals)
            if index["shards"][str(v)]["k"] < min(top_k, taxonomy.vertical_size(v))
        ]
        if short:
            raise CheckpointError(
                f"{directory}: the cache keeps the top {index['top_k']} logits, fewer than student.top_k={top_k} "
                f"(verticals {', '.join(short[:10])}); rebuild it with `kc cache-targets RUN --top-k {top_k}`"
            )
        self.ranges = taxonomy.vertical_ranges
        self.vertical_of_class = torch.tensor(taxonomy.vertical_of_class)
        self.num_classes, self.num_verticals = taxonomy.num_classes, taxonomy.num_verticals
        self.top_k, self.temperature, self.unselected = top_k, temperature, unselected
        # Per shard: the sorted training indices of its images (searched per batch), and the memory-mapped arrays.
        self.rows, self.logits, self.classes = [], [], []
        for v in range(taxonomy.num_verticals):
            prefix = index["shards"][str(v)]["prefix"]
            self.rows.append(np.load(directory / f"{prefix}.rows.npy"))
            self.logits.append(np.load(directory / f"{prefix}.logits.npy", mmap_mode="r"))
            self.classes.append(np.load(directory / f"{prefix}.classes.npy", mmap_mode="r"))

    def to(self, device: torch.device) -> CachedTeachers:
        self.vertical_of_class = self.vertical_of_class.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor) -> SoftTargets:
        device = labels.device
        selected = selected_verticals(labels, self.vertical_of_class, self.num_verticals)
        values = torch.zeros(labels.shape[0], self.num_classes, device=device)
        picked = selected.cpu().numpy()
        indices = sample_index.cpu().numpy()
        for v in np.flatnonzero(picked.any(axis=0)).tolist():
            batch_rows = np.flatnonzero(picked[:, v])
            where = np.searchsorted(self.rows[v], indices[batch_rows])
            k = min(self.top_k, self.logits[v].shape[1])
            z = torch.from_numpy(np.ascontiguousarray(self.logits[v][where, :k])).to(device)
            cls = torch.from_numpy(np.ascontiguousarray(self.classes[v][where, :k])).long().to(device)
            start = self.ranges[v][0]
            block = torch.zeros(len(batch_rows), self.ranges[v][1] - start, device=device)
            block.scatter_(1, cls, torch.sigmoid(z / self.temperature))
            values[torch.from_numpy(batch_rows).to(device), start : self.ranges[v][1]] = block
        if self.unselected == "zero":
            defined = torch.ones_like(values, dtype=torch.bool)
        else:
            defined = selected[:, self.vertical_of_class]
        return SoftTargets(values, defined, selected)
