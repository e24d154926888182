"""Three costs of training heads on precomputed features at 10,000 classes, each against what it replaced.

    python benchmarks/feature_pipeline.py [--rounds 7]

1. Validation AP: 4,000 images x 10,000 classes, one label an image (the `paper-10k` val split's shape).
   `average_precision` (only classes with a positive, by counting where positives are few) against sorting every
   class's column (the previous implementation, `_ap_chunk` on every column).
2. Reading a batch of 256 feature rows of a 100,000 x 128 float16 array: `ImageDataset.__getitems__` (one gather)
   against `__getitem__` row by row (what the DataLoader did before).
3. The sigmoid cross-entropy of a 256 x 10,000 batch of logits, forward and backward, with the logits near -10
   (a young head) and near -95 (a confident one, whose losses and gradients are subnormal floats), with and
   without flushing subnormals to zero (`kc.numerics`: set first thing by every kc command), each in a process
   of its own.

Each pair is timed interleaved, round by round; medians of the rounds after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kc.config import DataConfig
from kc.data.dataset import ImageDataset
from kc.data.samples import Sample
from kc.evaluate.metrics import _ap_chunk, average_precision


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def side_by_side(rounds: int, **fns: Callable[[], object]) -> dict[str, float]:
    """Median seconds of each function, interleaved; the first round is a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t = timed(fn)
            if r:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ap_pair(rounds: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    n, c = 4000, 10_000
    scores = rng.random((n, c)).astype(np.float32)
    targets = np.zeros((n, c), dtype=np.float32)
    targets[np.arange(n), rng.integers(0, c, n)] = 1

    def every_column() -> np.ndarray:
        out = np.empty(c)
        for a in range(0, c, 1024):
            out[a : a + 1024] = _ap_chunk(scores[:, a : a + 1024].astype(np.float64), targets[:, a : a + 1024] > 0)
        return out

    new, old = average_precision(scores, targets), every_column()
    assert np.allclose(new, old, equal_nan=True, atol=1e-12), "the two APs differ"
    return side_by_side(
        rounds, average_precision=lambda: average_precision(scores, targets), sort_every_column=every_column
    )


def batch_pair(rounds: int, folder: Path) -> dict[str, float]:
    rng = np.random.default_rng(0)
    np.save(folder / "features.npy", rng.normal(size=(100_000, 128)).astype(np.float16))
    samples = [Sample(f"features.npy#{i}", (i % 10_000,), "train", f"m:{i}") for i in range(100_000)]
    data_cfg = DataConfig(manifest=folder / "m.jsonl", taxonomy=folder / "t.json")  # read for settings only
    dataset = ImageDataset(samples, folder, data_cfg, train=True)
    batches = [rng.choice(100_000, 256, replace=False).tolist() for _ in range(50)]

    def batched() -> None:
        for b in batches:
            dataset.__getitems__(b)

    def one_by_one() -> None:
        for b in batches:
            [dataset[i] for i in b]

    out = side_by_side(rounds, getitems=batched, getitem_each=one_by_one)
    return {name: t / len(batches) for name, t in out.items()}  # per batch


CROSS_ENTROPY = """
import statistics, sys, time
import torch, torch.nn.functional as F
if sys.argv[1] == "flushed":
    torch.set_flush_denormal(True)  # first thing, as kc's command line does: worker threads inherit it
torch.manual_seed(0)
logits = (torch.randn(256, 10_000) * 5 + float(sys.argv[2])).requires_grad_()
targets = torch.zeros(256, 10_000)
times = []
for r in range(int(sys.argv[3]) + 1):
    logits.grad = None
    start = time.perf_counter()
    (F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 256).backward()
    times.append(time.perf_counter() - start)
print(statistics.median(times[1:]))
"""


def cross_entropy_pairs(rounds: int) -> dict[str, float]:
    """Each measurement in a process of its own (the flag must be set before torch starts its threads), 4
    processes each, flushed and default alternating, which of them first swapped each time (the first of a pair
    measured slower on this machine); the median of their medians."""
    out = {}
    for centre in ("-10", "-95"):
        times: dict[str, list[float]] = {"flushed": [], "default": []}
        for repeat in range(4):
            for mode in ("flushed", "default") if repeat % 2 else ("default", "flushed"):
                command = [sys.executable, "-c", CROSS_ENTROPY, mode, centre, str(rounds)]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                times[mode].append(float(result.stdout))
        out.update({f"logits near {centre}, {mode}": statistics.median(ts) for mode, ts in times.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.rounds} rounds")
    ap = ap_pair(args.rounds)
    print(
        f"AP, 4,000 x 10,000: {ap['average_precision']:.3f} s vs sorting every column {ap['sort_every_column']:.3f} s "
        f"({ap['sort_every_column'] / ap['average_precision']:.1f}x)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = batch_pair(args.rounds, Path(tmp))
    print(
        f"256 feature rows: {1000 * rows['getitems']:.2f} ms batched vs {1000 * rows['getitem_each']:.2f} ms one by "
        f"one ({rows['getitem_each'] / rows['getitems']:.1f}x)"
    )
    for name, t in cross_entropy_pairs(args.rounds).items():
        print(f"cross-entropy 256 x 10,000, {torch.get_num_threads()} threads, {name}: {1000 * t:.1f} ms")


if __name__ == "__main__":
    main()
