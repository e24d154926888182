"""Student epoch with the soft-target cache vs a generalist epoch (and vs online teachers), side by side.

    python benchmarks/cache_epoch.py RUN_DIR [--rounds 3] [--json out.json]

RUN_DIR is a finished run (generalist and specialists trained, e.g. by `kc demo`). In RUN_DIR/bench (the run's data
and teachers linked, its own cache), the script builds the cache from scratch (`kc cache-targets`, timed), then
trains, round after round, one epoch of each: the generalist's architecture on ground truth, the student from the
cache, the student with online teachers (`kc.bench.training`: same augmented data loading, batch and optimizer;
epochs interleaved so the machine's drift hits all three alike). Reports median epoch seconds, the ratios to the
generalist epoch (goal for the cache: at most 1.15) and the cache's size per training image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from kc.bench import bench_workspace, training
from kc.config import load_config
from kc.distill.cache_format import cache_bytes, cache_dir
from kc.io import read_json
from kc.run import prepare_run
from kc.train.student import cache_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    source = args.run_dir.resolve()
    run = bench_workspace(prepare_run(load_config(source / "config.yaml", {"run_dir": str(source)}), progress=False))
    shutil.rmtree(cache_dir(run), ignore_errors=True)
    start = time.perf_counter()
    cache_targets(run, progress=False)
    build_seconds = time.perf_counter() - start
    result = training(run, args.rounds)  # finds the cache complete
    index = read_json(cache_dir(run) / "index.json")
    size = cache_bytes(run)
    result.update(
        {
            "cache_build_seconds": build_seconds,
            "cache_bytes": size,
            "bytes_per_training_image": size / len(run.splits["train"]),
            "top_k": index["top_k"],
            "train_images": len(run.splits["train"]),
        }
    )
    seconds = result["epoch_seconds"]
    print(f"\n{len(run.splits['train']):,} training images, median of {args.rounds} epochs\n")
    print("| epoch | seconds | x generalist epoch |")
    print("|---|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {s / seconds['generalist']:.2f} |")
    print(
        f"\ncache: built in {build_seconds:.1f} s; {size / 2**20:.1f} MiB, {result['bytes_per_training_image']:,.0f} "
        f"bytes per training image (top {index['top_k']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
