"""`kc ablate` over whole-pipeline seeds: one table from the ablations of several runs.

`kc ablate RUN --seed S` varies the student's data order on one run's teachers; over whole-pipeline seeds each
seed is a run of its own (`kc seeds` makes RUN_ROOT/seed_<n>/run), ablated on its own teachers. This reads each
run's RUN/ablation/ablation.json and prints, per variant, the mean ± std over seeds of val mAP (what chooses) and
test mAP (the record), and paired by seed: the variant against the same head without scales, and against its
ground-truth control (the variant's head and scales on the labels). Then the paces of the self-paced scales.

    python benchmarks/ablation_seeds.py runs/p1k-u60/seed_0/run runs/p1k-u60/seed_1/run runs/p1k-u60/seed_2/run
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kc.seeds import mean_std, plus_minus


def shown(values: list[float]) -> str:
    return plus_minus(mean_std(values))


def paired(diffs: list[float]) -> str:
    s = mean_std(diffs)
    return f"{s['mean']:+.2f} ± {s['std']:.2f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, one per whole-pipeline seed")
    args = parser.parse_args()
    results = [json.loads((run / "ablation" / "ablation.json").read_text()) for run in args.runs]
    by_seed = [{s["variant"]: s for s in r["summary"]} for r in results]
    variants = [s["variant"] for s in results[0]["summary"]]
    missing = [str(run) for run, seed in zip(args.runs, by_seed, strict=True) if set(seed) != set(variants)]
    if missing:
        raise SystemExit(f"{', '.join(missing)}: other variants than {args.runs[0]}; ablate every run alike")
    plain = {s["structure"]: s["variant"] for s in results[0]["summary"] if s["self_paced"] == "none"}
    print(f"{len(results)} whole-pipeline seeds; mean ± std; paired differences with wins in brackets.\n")
    print(
        "| student | val mAP | test mAP | test mean per-vertical AP | val - same head without scales | "
        "val - ground-truth control | test - ground-truth control |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        rows = [seed[v] for seed in by_seed]
        base = plain.get(rows[0]["structure"])
        vs_plain = (
            "—"
            if base in (None, v)
            else paired([r["val_mAP"] - seed[base]["val_mAP"] for r, seed in zip(rows, by_seed, strict=True)])
        )
        print(
            f"| {v} | {shown([r['val_mAP'] for r in rows])} | {shown([r['test_mAP'] for r in rows])} | "
            f"{shown([r['test_mean_per_vertical_AP'] for r in rows])} | {vs_plain} | "
            f"{paired([r['val_vs_truth'] for r in rows])} | {paired([r['test_vs_truth'] for r in rows])} |"
        )
    best = max(variants, key=lambda v: statistics.mean(seed[v]["val_mAP"] for seed in by_seed))
    print(f"\nBest on val mAP (mean over seeds): {best}.")
    paced = [v for v in variants if "pace_median" in by_seed[0][v]]
    if paced:
        print(
            "\n| student | pace: median of the seeds' medians | min | max | rank correlation with size (mean ± std) |"
        )
        print("|---|---:|---:|---:|---:|")
        for v in paced:
            rows = [seed[v] for seed in by_seed]
            correlations = [r["pace_size_correlation"] for r in rows if r["pace_size_correlation"] is not None]
            correlation = shown(correlations) if correlations else "n/a"
            print(
                f"| {v} | {statistics.median(r['pace_median'] for r in rows):.3f} | "
                f"{min(r['pace_min'] for r in rows):.3f} | {max(r['pace_max'] for r in rows):.3f} | {correlation} |"
            )


if __name__ == "__main__":
    main()
