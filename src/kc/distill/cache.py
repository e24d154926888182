"""The soft-target cache: each specialist run once over its vertical's training images, its top-K logits stored.

Layout (one shard per teacher, so building resumes teacher by teacher)::

    RUN/cache/teacher_NNN.json         what shard v was built from (K, teacher weights, classes, training images,
                                       preprocessing), its sizes and its arrays' SHA-256 (checked when the cache
                                       is opened); written after its arrays: the shard is done
    RUN/cache/index.json               a summary of the finished shards
    RUN/cache/teacher_NNN.rows.npy     (n_v,) int64: index into the run's training split of each image of shard v
    RUN/cache/teacher_NNN.logits.npy   (n_v, K) float32: the teacher's K largest logits, largest first
    RUN/cache/teacher_NNN.classes.npy  (n_v, K) int32: their class indices within the vertical

Arrays are plain .npy files read memory-mapped: large and contiguous, never one file per image. Each file is
written under a temporary name and renamed. Shards share no file, so processes (`kc cache-targets --jobs N` or
`--shard I/N` on several machines) build them side by side; a process holds a shard's lock
(`RUN/cache/.teacher_NNN.lock`, `kc.locks`) while it writes it, so two never write the same one. A cache built
from other classes, training images, preprocessing or teacher weights is refused by training (`kc cache-targets`
rebuilds what is stale).

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
from kc.distill.targets import BlockTargets, Teachers
from kc.errors import CheckpointError
from kc.io import atomic_write, atomic_write_json, read_json, sha256_file
from kc.locks import DirectoryLock
from kc.run import Run
from kc.taxonomy import Taxonomy

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


def _split_digest(run: Run) -> str:
    text = json.dumps([[s.path, list(s.labels)] for s in run.splits["train"]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_fingerprint(run: Run) -> dict[str, Any]:
    """What every teacher's shard depends on besides the teacher: classes, training images, preprocessing."""
    d = run.cfg.data
    return {
        "taxonomy": run.taxonomy.fingerprint(),
        "train_split": _split_digest(run),
        "preprocess": [d.image_size, list(d.mean), list(d.std)],
    }


def _shard_prefix(vertical: int) -> str:
    return f"teacher_{vertical:03d}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def read_shards(run: Run) -> dict[int, dict[str, Any]]:
    """The finished shards: vertical -> its metadata (teacher_NNN.json, written after its arrays)."""
    shards = {}
    for v in range(run.taxonomy.num_verticals):
        meta = cache_dir(run) / f"{_shard_prefix(v)}.json"
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


def build_cache(
    run: Run,
    teachers: list[torch.nn.Module | list[torch.nn.Module] | None],
    specialist_digests: list[str],
    *,
    top_k: int,
    device: torch.device,
    fold_of: list[int] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    on_shard: Callable[[int], None] | None = None,
    verticals: list[int] | None = None,
) -> dict[str, Any]:
    """Write (or complete) the cache's shards for `verticals` (default: all); a shard already built from the same
    teacher, K, classes, images and preprocessing is kept. `teachers[v]` is vertical v's specialist, or its
    cross-fitted specialists, one per fold: then training image i is taught by `teachers[v][fold_of[i]]`, the
    one that was trained without it."""
    out = cache_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    base = base_fingerprint(run)
    done_before = read_shards(run)
    for v in verticals if verticals is not None else range(run.taxonomy.num_verticals):
        wanted = {"version": VERSION, "top_k": top_k, "base": base, "specialist": specialist_digests[v]}
        if _is_current(done_before.get(v), wanted):
            continue
        what = f"the soft-target cache of vertical {run.taxonomy.verticals[v].id}"
        with DirectoryLock(out, what, name=_shard_prefix(v)):
            if _is_current(read_shards(run).get(v), wanted):  # finished by another process since the read above
                continue
            members = teachers[v] if isinstance(teachers[v], list) else [teachers[v]]
            _write_shard(run, v, members, fold_of, wanted, top_k, device, batch_size, progress)
        write_index(run)
        if on_shard is not None:
            on_shard(v)
    return write_index(run)


def _is_current(shard: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    return shard is not None and all(shard.get(key) == value for key, value in wanted.items())


def _write_shard(
    run: Run,
    v: int,
    members: list[torch.nn.Module | None],
    fold_of: list[int] | None,
    wanted: dict[str, Any],
    top_k: int,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> None:
    """Vertical v's shard: its teacher's top-K logits over the vertical's training images (each image's from the
    member of its fold, when the teachers are cross-fitted)."""
    out = cache_dir(run)
    train = run.splits["train"]
    (out / f"{_shard_prefix(v)}.json").unlink(missing_ok=True)  # the shard is stale from here on
    start, end = run.taxonomy.vertical_ranges[v]
    rows = np.array([i for i, s in enumerate(train) if any(start <= c < end for c in s.labels)], dtype=np.int64)
    if len(members) > 1 and fold_of is None:
        raise ValueError(f"vertical {v}: {len(members)} cross-fitted teachers need the training images' folds")
    row_folds = np.zeros(len(rows), dtype=np.int64) if len(members) == 1 else np.asarray(fold_of)[rows]
    k = min(top_k, end - start)
    logits = np.zeros((len(rows), k), dtype=np.float32)
    classes = np.zeros((len(rows), k), dtype=np.int32)
    for fold, teacher in enumerate(members):
        assert teacher is not None, f"no teacher given for vertical {v}"
        picked = np.flatnonzero(row_folds == fold)
        dataset = ImageDataset(
            [train[i] for i in rows[picked]], run.image_root, run.cfg.data, train=False, decoded=run.decoded
        )
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=run.cfg.data.num_workers)
        teacher.eval().to(device)
        done = 0
        desc = f"caching teacher {run.taxonomy.verticals[v].id}" + (f" fold {fold}" if len(members) > 1 else "")
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
                z = teacher(batch["images"].to(device)).float().cpu()
                top = z[:, : end - start].topk(k, dim=1)
                where = picked[done : done + len(z)]
                logits[where] = top.values.numpy()
                classes[where] = top.indices.numpy()
                done += len(z)
    prefix = _shard_prefix(v)
    _save_npy(out / f"{prefix}.rows.npy", rows)
    _save_npy(out / f"{prefix}.logits.npy", logits)
    _save_npy(out / f"{prefix}.classes.npy", classes)
    # Written last: the shard counts only once its arrays are all in place, each with its SHA-256.
    digests = {part: sha256_file(out / f"{prefix}.{part}.npy") for part in ARRAYS}
    atomic_write_json(out / f"{prefix}.json", {**wanted, "images": len(rows), "k": k, "sha256": digests})


def cache_bytes(run: Run) -> int:
    return sum(p.stat().st_size for p in cache_dir(run).glob("teacher_*.npy"))


class CachedTeachers(Teachers):
    """Soft targets from the cache, built as `OnlineTeachers` builds them (same targets), by training index."""

    def __init__(
        self,
        run: Run,
        specialist_digests: list[str],
        top_k: int,
        temperature: float,
        unselected: str = "zero",
    ):
        directory = cache_dir(run)
        shards = read_shards(run)
        if not shards:
            raise CheckpointError(f"{directory}: no soft-target cache; build it with `kc cache-targets RUN`")
        taxonomy: Taxonomy = run.taxonomy
        base = base_fingerprint(run)
        stale = {PARTS[key] for m in shards.values() for key, value in base.items() if m["base"].get(key) != value}
        stale |= {PARTS["specialists"] for v, m in shards.items() if m["specialist"] != specialist_digests[v]}
        if stale:
            raise CheckpointError(
                f"{directory}: the soft-target cache was built from other {' and '.join(sorted(stale))} than this "
                "run now has; rebuild it with `kc cache-targets RUN` (or delete it to train with online teachers)"
            )
        missing = [taxonomy.verticals[v].id for v in range(taxonomy.num_verticals) if v not in shards]
        if missing:
            raise CheckpointError(
                f"{directory}: the cache lacks the teachers of {', '.join(missing[:10])}; finish it with "
                "`kc cache-targets RUN`"
            )
        short = [
            taxonomy.verticals[v].id
            for v in range(taxonomy.num_verticals)
            if shards[v]["k"] < min(top_k, taxonomy.vertical_size(v))
        ]
        if short:
            kept = min(shards[v]["top_k"] for v in range(taxonomy.num_verticals))
            raise CheckpointError(
                f"{directory}: the cache keeps the top {kept} logits, fewer than student.top_k={top_k} "
                f"(verticals {', '.join(short[:10])}); rebuild it with `kc cache-targets RUN --top-k {top_k}`"
            )
        rows, logits, classes = [], [], []
        for v in range(taxonomy.num_verticals):
            prefix = _shard_prefix(v)
            for part, recorded in shards[v].get("sha256", {}).items():  # absent in caches built before digests
                path = directory / f"{prefix}.{part}.npy"
                if not path.is_file() or sha256_file(path) != recorded:
                    raise CheckpointError(
                        f"{path}: damaged or missing (its SHA-256 is not the one {prefix}.json recorded); rebuild "
                        "the cache with `kc cache-targets RUN`"
                    )
            rows.append(np.load(directory / f"{prefix}.rows.npy"))
            logits.append(np.load(directory / f"{prefix}.logits.npy", mmap_mode="r"))
            classes.append(np.load(directory / f"{prefix}.classes.npy", mmap_mode="r"))
        super().__init__(taxonomy, top_k, temperature, unselected)
        self._hold(rows, logits, classes)

    @classmethod
    def from_arrays(
        cls,
        taxonomy: Taxonomy,
        rows: list[np.ndarray],
        logits: list[np.ndarray],
        classes: list[np.ndarray],
        top_k: int,
        temperature: float,
        unselected: str = "zero",
    ) -> CachedTeachers:
        """Teachers over the cache's arrays as given (the constructor opens and checks a run's): per vertical v,
        `rows[v]` the ascending training indices of its images, `logits[v]` and `classes[v]` (n_v, k) their
        teacher's largest logits and the class indices within v."""
        teachers = cls.__new__(cls)
        Teachers.__init__(teachers, taxonomy, top_k, temperature, unselected)
        teachers._hold(rows, logits, classes)
        return teachers

    def _hold(self, rows: list[np.ndarray], logits: list[np.ndarray], classes: list[np.ndarray]) -> None:
        # Per shard: the sorted training indices of its images (searched per batch), and the memory-mapped arrays.
        # Plain ndarray views of the memory maps (same pages): np.memmap's indexing costs more per call than the read.
        self.rows, self.logits, self.classes = rows, [np.asarray(z) for z in logits], [np.asarray(c) for c in classes]
        self.width = max((min(self.top_k, z.shape[1]) for z in logits), default=0)  # most targets kept per pair
        # Every (training index, vertical) pair of the cache, by key index * V + v, sorted, with its row in the
        # vertical's shard: a batch's pairs are found by one search, not one per vertical.
        keys = np.concatenate([r.astype(np.int64) * self.num_verticals + v for v, r in enumerate(rows)] or [[]])
        local = np.concatenate([np.arange(len(r)) for r in rows] or [[]]).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        self.pair_keys, self.pair_row = keys[order], local[order]

    @torch.no_grad()
    def blocks(self, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor) -> BlockTargets:
        # One read per selected vertical into shared buffers, then one scatter for every pair: at 100K classes a
        # batch selects about 400 verticals, and torch calls per vertical cost more than the reads.
        selected, rows, verticals, values = self.pairs(labels)
        pairs, width = len(rows), values.shape[1]
        indices = sample_index.cpu().numpy()[rows.cpu().numpy()]
        pair_verticals = verticals.cpu().numpy()
        # Pairs grouped by vertical (a stable sort), each group's rows read into one contiguous slice of the buffers.
        order = np.argsort(pair_verticals, kind="stable")
        found = np.searchsorted(self.pair_keys, indices[order] * self.num_verticals + pair_verticals[order])
        shard_rows = self.pair_row[found]  # each pair's row in its vertical's shard, in `order`
        z = np.full((pairs, self.width), -np.inf, dtype=np.float32)  # sigmoid(-inf) = 0: padding adds nothing
        where_class = np.full((pairs, self.width), width, dtype=np.int32)  # padding lands in a dropped column
        ends = [*np.flatnonzero(np.diff(pair_verticals[order])) + 1, pairs] if pairs else []
        begin = 0
        for end in ends:
            v, where = int(pair_verticals[order[begin]]), shard_rows[begin:end]
            if self.logits[v].shape[1] == self.width:  # the usual case: whole rows, straight into the buffers
                self.logits[v].take(where, axis=0, out=z[begin:end])
                self.classes[v].take(where, axis=0, out=where_class[begin:end])
            else:  # a vertical smaller than the rest, or a cache that keeps more than top_k
                k = min(self.top_k, self.logits[v].shape[1])
                z[begin:end, :k] = self.logits[v][where, :k]
                where_class[begin:end, :k] = self.classes[v][where, :k]
            begin = end
        device = values.device
        padded = torch.zeros(pairs, width + 1, device=device)
        probs = torch.sigmoid(torch.from_numpy(z).to(device) / self.temperature)
        columns = torch.from_numpy(where_class).to(device).long()
        unsorted = torch.from_numpy(np.argsort(order)).to(device)  # buffer row of each pair
        padded.scatter_(1, columns[unsorted], probs[unsorted])
        return BlockTargets(rows, verticals, padded[:, :width], selected)
