"""Generalist with every class in its loss vs with sampled negatives: test mAP, epoch time, step memory.

    python benchmarks/sampled_negatives.py [--preset large] [--epochs 10] [--negatives 128] [--batch-size 128]
                                           [--work DIR]

Generates the built-in benchmark preset (default `large`: 1,000 classes in 20 verticals, so that a batch of 128
covers few classes), trains the demo's generalist on it twice, with the full sigmoid cross-entropy and with
`generalist.sampled_negatives` (the batch's positive classes plus N drawn others), and scores both on the test split.
Then the peak memory of one training step with a 100K-class head, both ways (`kc.bench.step_memory`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from kc.bench import step_memory
from kc.config import config_from_dict, merge
from kc.data.benchmark import PRESETS, generate_benchmark
from kc.demo import DEMO_CONFIG
from kc.evaluate.stage import evaluate_stage
from kc.io import read_json
from kc.run import prepare_run
from kc.train.generalist import train_generalist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="large")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("runs/sampled_negatives"))
    args = parser.parse_args()
    bench = args.work / "benchmark"
    if not (bench / "manifest.csv").is_file():
        generate_benchmark(bench, PRESETS[args.preset], progress=False)
    rows = {}
    for name, sampled in (("every class", None), (f"{args.negatives} sampled negatives", args.negatives)):
        data = merge(
            DEMO_CONFIG,
            {
                "run_dir": str(args.work / ("full" if sampled is None else "sampled")),
                "data": {"manifest": str(bench / "manifest.csv"), "taxonomy": str(bench / "taxonomy.json")},
                "generalist": {"epochs": args.epochs, "batch_size": args.batch_size, "sampled_negatives": sampled},
            },
        )
        run = prepare_run(config_from_dict(data), progress=False)
        train_generalist(run, progress=False, verbose=False)
        history = read_json(run.stage_dir("generalist") / "checkpoints" / "last.json")["history"]
        metrics = evaluate_stage(run, "generalist", "test", progress=False)
        rows[name] = {
            "mAP": metrics["mAP"],
            "epoch_s": statistics.median(h["seconds"] for h in history),
            "classes": run.taxonomy.num_classes,
        }
        print(name, rows[name], flush=True)
    config = args.work / "full" / "config.yaml"
    memory = {name: step_memory(config, 100_000, 128, n) for name, n in (("every class", None), ("sampled", 1024))}
    print(f"\n{args.preset} preset, generalist {args.epochs} epochs, batch {args.batch_size}, test split\n")
    print("| generalist loss | test mAP | epoch seconds (median) |")
    print("|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['mAP']:.2f} | {r['epoch_s']:.1f} |")
    print("\none step at 100K classes, batch 128: memory above the built model")
    for name, m in memory.items():
        print(f"  {name}: {m['step_mib']:.0f} MiB (peak RSS {m['peak_rss_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
