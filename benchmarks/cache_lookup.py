"""The soft-target cache's per-batch lookup at 100,000 classes: the current reader against the previous one.

    python benchmarks/cache_lookup.py [--images-per-class 4] [--batches 40] [--batch 512]

A synthetic cache in the layout `kc cache-targets` writes (one memory-mapped shard per vertical: rows, top-100
logits, class indices) for 100,000 classes in 1,000 verticals of 100 (features-100k), one label per training image.
Each round draws a batch of training images at random (a batch of 512 selects about 400 verticals) and times
`CachedTeachers.blocks` (one read per vertical into shared buffers, one reordering for all pairs) and the previous
implementation (kept below: torch calls per vertical), interleaved; medians of the rounds after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kc.distill.cached_teachers import CachedTeachers
from kc.distill.targets import BlockTargets
from kc.taxonomy import ClassInfo, Taxonomy, Vertical

VERTICALS, PER_VERTICAL, TOP_K = 1000, 100, 100


Shards = tuple[list[np.ndarray], list[np.memmap], list[np.memmap]]


def previous_blocks(
    teachers: CachedTeachers, shards: Shards, labels: torch.Tensor, sample_index: torch.Tensor
) -> BlockTargets:
    """The reader before 2026-12-02: per selected vertical, its pairs found by a scan, read from its memory maps,
    and written to the pairs' rows (torch calls per vertical)."""
    shard_rows, shard_logits, shard_classes = shards
    selected, rows, verticals, _ = teachers.pairs(labels)
    classes = torch.full((len(rows), teachers.width), -1, dtype=torch.long)
    values = torch.zeros(len(rows), teachers.width)
    indices = sample_index.cpu().numpy()[rows.cpu().numpy()]
    pair_verticals = verticals.cpu().numpy()
    for v in np.unique(pair_verticals).tolist():
        pairs = np.flatnonzero(pair_verticals == v)
        where = np.searchsorted(shard_rows[v], indices[pairs])
        k = min(teachers.top_k, shard_logits[v].shape[1])
        z = torch.from_numpy(np.ascontiguousarray(shard_logits[v][where, :k]))
        cls = torch.from_numpy(np.ascontiguousarray(shard_classes[v][where, :k])).long()
        classes[torch.from_numpy(pairs), :k] = cls
        values[torch.from_numpy(pairs), :k] = torch.sigmoid(z / teachers.temperature)
    return BlockTargets(rows, verticals, classes, values, selected)


def synthetic_shards(folder: Path, members: list[np.ndarray], sizes: list[int], top_k: int, seed: int = 0) -> Shards:
    """Shards of random top-K logits (descending) and distinct classes for the images `members[v]` of each vertical
    v, written to `folder` in the cache's layout and memory-mapped as the reader opens them."""
    rng = np.random.default_rng(seed)
    rows, logits, classes = [], [], []
    for v, (mine, size) in enumerate(zip(members, sizes, strict=True)):
        k = min(top_k, size)
        z = -np.sort(-rng.normal(size=(len(mine), k)).astype(np.float32), axis=1)
        # k distinct classes a row: sorted draws from [0, size - k] plus 0, 1, ..., k - 1 (ranking every class of a
        # 14,362-class vertical for each of its images would take gigabytes)
        c = (np.sort(rng.integers(0, size - k + 1, size=(len(mine), k)), axis=1) + np.arange(k)).astype(np.int32)
        for part, array in (("rows", mine), ("logits", z), ("classes", c)):
            np.save(folder / f"teacher_{v:04d}.{part}.npy", np.ascontiguousarray(array))
        rows.append(np.load(folder / f"teacher_{v:04d}.rows.npy"))
        logits.append(np.load(folder / f"teacher_{v:04d}.logits.npy", mmap_mode="r"))
        classes.append(np.load(folder / f"teacher_{v:04d}.classes.npy", mmap_mode="r"))
    return rows, logits, classes


def synthetic_cache(folder: Path, images_per_class: int, seed: int = 0) -> tuple[CachedTeachers, Shards, np.ndarray]:
    verticals = [Vertical(f"v{v:04d}", "") for v in range(VERTICALS)]
    classes = [ClassInfo(f"v{v:04d}c{i:03d}", "", f"v{v:04d}") for v in range(VERTICALS) for i in range(PER_VERTICAL)]
    taxonomy = Taxonomy(verticals, classes)
    rng = np.random.default_rng(seed)
    label_of_image = rng.permutation(np.repeat(np.arange(VERTICALS * PER_VERTICAL), images_per_class))
    vertical_of_image = label_of_image // PER_VERTICAL
    members = [np.flatnonzero(vertical_of_image == v) for v in range(VERTICALS)]
    shards = synthetic_shards(folder, members, [PER_VERTICAL] * VERTICALS, TOP_K, seed)
    teachers = CachedTeachers.from_arrays(taxonomy, *shards, TOP_K, temperature=1.0)
    return teachers, shards, label_of_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as folder:
        teachers, shards, label_of_image = synthetic_cache(Path(folder), args.images_per_class)
        times: dict[str, list[float]] = {"current": [], "previous": []}
        selected = []
        for round_ in range(args.batches + 1):
            index = torch.from_numpy(rng.choice(len(label_of_image), args.batch, replace=False))
            labels = torch.from_numpy(label_of_image[index.numpy()]).unsqueeze(1)
            results = {}
            for name in ("current", "previous"):
                start = time.perf_counter()
                if name == "current":
                    results[name] = teachers.blocks(None, labels, index)
                else:
                    results[name] = previous_blocks(teachers, shards, labels, index)
                if round_ > 0:  # the first round warms the page cache and the allocator
                    times[name].append(time.perf_counter() - start)
            gap = (results["current"].values - results["previous"].values).abs().max().item()
            assert gap <= 1e-6 and torch.equal(results["current"].classes, results["previous"].classes), gap
            selected.append(int(results["current"].selected.any(dim=0).sum()))
    current, previous = (1000 * statistics.median(times[k]) for k in ("current", "previous"))
    print(
        f"{VERTICALS * PER_VERTICAL:,} classes in {VERTICALS} verticals, {len(label_of_image):,} training images, "
        f"batch {args.batch} (median {statistics.median(selected):.0f} verticals selected), top {TOP_K}"
    )
    print("| reader | ms per batch (median) | x current |\n|---|---:|---:|")
    print(f"| current (one reordering) | {current:.2f} | 1.00 |")
    print(f"| previous (torch calls per vertical) | {previous:.2f} | {previous / current:.2f} |")


if __name__ == "__main__":
    main()
