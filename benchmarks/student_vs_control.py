"""Student vs same-compute control over several seeds, on one run's fixed generalist and specialists.

    python benchmarks/student_vs_control.py RUN_DIR [--seeds 0 1 2 3 4] [--set student.top_k=3 ...] [--json out.json]

A single run cannot tell a gain of a point from noise. This script takes a finished run (generalist and
specialists trained, e.g. by `kc demo`), and for each seed trains the student and the control afresh with that
seed for their data order (same teachers, same starting generalist), then scores both on the test split. It reports
each seed's figures and the mean and standard deviation of student - control.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from kc.config import load_config, merge, parse_override
from kc.evaluate.stage import evaluate_stage
from kc.run import prepare_run
from kc.train.controls import train_control
from kc.train.student import cache_targets, train_student

METRICS = ("mean_per_vertical_AP", "mAP")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--work", type=Path, help="where the per-seed runs go (default: RUN_DIR/../student_vs_control)")
    parser.add_argument("--json")
    args = parser.parse_args()
    source = args.run_dir.resolve()
    work = (args.work or source.parent / "student_vs_control").resolve()

    rows = []
    for seed in args.seeds:
        target = work / f"seed_{seed}"
        if not (target / "config.yaml").is_file():
            target.mkdir(parents=True, exist_ok=True)
            for name in ("config.yaml", "taxonomy.json", "data", "generalist", "specialists"):
                src = source / name
                (shutil.copytree if src.is_dir() else shutil.copy)(src, target / name)
        overrides: dict = {"run_dir": str(target), "student": {"seed": seed}}
        for text in args.set:
            overrides = merge(overrides, parse_override(text))
        run = prepare_run(load_config(target / "config.yaml", overrides), progress=False)
        if run.cfg.student.teachers == "cache":
            cache_targets(run, progress=False)
        train_student(run, progress=False, verbose=False)
        train_control(run, progress=False, verbose=False)
        student = evaluate_stage(run, "student", "test", progress=False)
        control = evaluate_stage(run, "control", "test", progress=False)
        row = {
            "seed": seed,
            **{f"student_{m}": student[m] for m in METRICS},
            **{f"control_{m}": control[m] for m in METRICS},
            **{
                f"{name}_{key}": stage[key]
                for name, stage in (("student", student), ("control", control))
                for key in ("parameters", "inference_images_per_s")
            },
        }
        rows.append(row)
        print(
            f"seed {seed}: student mAP {student['mAP']:.2f}, control mAP {control['mAP']:.2f}, "
            f"difference {student['mAP'] - control['mAP']:+.2f}",
            flush=True,
        )

    summary = {}
    for m in METRICS:
        diffs = [r[f"student_{m}"] - r[f"control_{m}"] for r in rows]
        summary[m] = {
            "student_mean": statistics.mean(r[f"student_{m}"] for r in rows),
            "control_mean": statistics.mean(r[f"control_{m}"] for r in rows),
            "difference_mean": statistics.mean(diffs),
            "difference_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "student_wins": sum(d > 0 for d in diffs),
        }
    summary["parameters"] = {"student": rows[0]["student_parameters"], "control": rows[0]["control_parameters"]}
    summary["inference_images_per_s"] = {
        name: statistics.median(r[f"{name}_inference_images_per_s"] for r in rows) for name in ("student", "control")
    }
    print(f"\n{len(rows)} seeds, overrides: {args.set or 'none'}\n")
    print("| metric | student (mean) | control (mean) | student - control (mean ± std) | seeds student wins |")
    print("|---|---:|---:|---:|---:|")
    for m in METRICS:
        s = summary[m]
        print(
            f"| {m} | {s['student_mean']:.2f} | {s['control_mean']:.2f} | "
            f"{s['difference_mean']:+.2f} ± {s['difference_std']:.2f} | {s['student_wins']}/{len(rows)} |"
        )
    params, speed = summary["parameters"], summary["inference_images_per_s"]
    print(
        f"\nparameters: student {params['student']:,}, control {params['control']:,}; inference images/s "
        f"(forward only, median over seeds): student {speed['student']:,.0f}, control {speed['control']:,.0f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "overrides": args.set}, indent=1))


if __name__ == "__main__":
    main()
