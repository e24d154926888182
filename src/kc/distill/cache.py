"""Building the soft-target cache: each specialist run once over its vertical's training images, its top-K
logits stored (the layout: `kc.distill.cache_format`).

Shards share no file, so processes (`kc cache-targets --jobs N` or `--shard I/N` on several machines) build them
side by side; a process holds a shard's lock (`RUN/cache/.teacher_NNN.lock`, `kc.locks`) while it writes it, so
two never write the same one. A cache built from other classes, training images, preprocessing or teacher weights
is refused by training (`kc cache-targets` rebuilds what is stale).

Targets are rebuilt exactly as the online teachers build them (sigmoid(logit / T) on the top K kept, 0 elsewhere),
but from the un-augmented image, while the student sees augmented views (the cost is measured in
docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kc.data.dataset import ImageDataset, collate
from kc.data.samples import Sample
from kc.distill.cache_format import (
    ARRAYS,
    VERSION,
    base_fingerprint,
    cache_dir,
    read_shards,
    save_npy,
    shard_prefix,
    write_index,
)
from kc.io import atomic_write_json, sha256_file
from kc.locks import DirectoryLock
from kc.run import Run


def build_cache(
    run: Run,
    samples: list[Sample],
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
    """Write (or complete) the cache's shards over `samples` (the student's training images) for `verticals`
    (default: all); a shard already built from the same teacher, K, classes, images and preprocessing is kept.
    `teachers[v]` is vertical v's specialist, or its cross-fitted specialists, one per fold: then training image i
    is taught by `teachers[v][fold_of[i]]`, the one that was trained without it."""
    out = cache_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    base = base_fingerprint(run, samples)
    done_before = read_shards(run)
    for v in verticals if verticals is not None else range(run.taxonomy.num_verticals):
        wanted = {"version": VERSION, "top_k": top_k, "base": base, "specialist": specialist_digests[v]}
        if _is_current(done_before.get(v), wanted):
            continue
        what = f"the soft-target cache of vertical {run.taxonomy.verticals[v].id}"
        with DirectoryLock(out, what, name=shard_prefix(v)):
            if _is_current(read_shards(run).get(v), wanted):  # finished by another process since the read above
                continue
            members = teachers[v] if isinstance(teachers[v], list) else [teachers[v]]
            _write_shard(run, samples, v, members, fold_of, wanted, top_k, device, batch_size, progress)
        write_index(run)
        if on_shard is not None:
            on_shard(v)
    return write_index(run)


def _is_current(shard: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    return shard is not None and all(shard.get(key) == value for key, value in wanted.items())


def _write_shard(
    run: Run,
    train: list[Sample],
    v: int,
    members: list[torch.nn.Module | None],
    fold_of: list[int] | None,
    wanted: dict[str, Any],
    top_k: int,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> None:
    """Vertical v's shard: its teacher's top-K logits over the vertical's images of `train` (each image's from the
    member of its fold, when the teachers are cross-fitted)."""
    out = cache_dir(run)
    (out / f"{shard_prefix(v)}.json").unlink(missing_ok=True)  # the shard is stale from here on
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
    prefix = shard_prefix(v)
    save_npy(out / f"{prefix}.rows.npy", rows)
    save_npy(out / f"{prefix}.logits.npy", logits)
    save_npy(out / f"{prefix}.classes.npy", classes)
    # Written last: the shard counts only once its arrays are all in place, each with its SHA-256.
    digests = {part: sha256_file(out / f"{prefix}.{part}.npy") for part in ARRAYS}
    atomic_write_json(out / f"{prefix}.json", {**wanted, "images": len(rows), "k": k, "sha256": digests})
