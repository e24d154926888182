"""`kc ablate`: the paper's ablation of the student on one run's generalist and specialists.

Variants: distillation alone (dense head, plain logits); + self-paced scales; + structurally connected layers
(FC-SC); + both. Each variant, and for each head structure the same-compute control (the generalist trained on
with the ground truth, same head, same epochs), is trained for each seed in its own run directory under
RUN/ablation/, which links the run's data, generalist, specialists and soft-target cache instead of copying them.
Everything resumes like any stage. The table goes to RUN/ablation/ablation.md and .json.
"""

from __future__ import annotations

import statistics
from typing import Any

from kc.config import load_config, merge
from kc.evaluate.stage import evaluate_stage
from kc.io import atomic_write_json, atomic_write_text
from kc.run import Run, prepare_run
from kc.train.common import CONTROL, STUDENT
from kc.train.generalist import train_control
from kc.train.student import cache_targets, train_student

VARIANTS: list[tuple[str, str, str]] = [  # name, head structure, self-paced variant
    ("distillation", "fc-fc", "none"),
    ("+ self-paced scales", "fc-fc", "vertical"),
    ("+ structurally connected layers (FC-SC)", "fc-sc", "none"),
    ("+ both", "fc-sc", "vertical"),
]
SHARED = ("taxonomy.json", "data", "generalist", "specialists", "cache")
METRICS = ("mAP", "mean_per_vertical_AP")


def _variant_run(run: Run, slug: str, seed: int, structure: str, self_paced: str) -> Run:
    directory = run.dir / "ablation" / slug / f"seed_{seed}"
    directory.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = directory / name
        if (run.dir / name).exists() and not link.is_symlink():
            link.symlink_to(run.dir / name, target_is_directory=(run.dir / name).is_dir())
    overrides = {
        "run_dir": str(directory),
        "student": {"seed": seed, "head": {"structure": structure}, "self_paced": {"variant": self_paced}},
    }
    if structure == "fc-fc":
        overrides = merge(overrides, {"student": {"head": {"shared_units": 0, "init": "generalist"}}})
    return prepare_run(load_config(run.dir / "config.yaml", overrides), progress=False)


def ablate(run: Run, seeds: list[int], verbose: bool = True) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    controls: dict[tuple[str, int], dict[str, Any]] = {}
    for name, structure, self_paced in VARIANTS:
        slug = f"{structure}_{self_paced}"
        for seed in seeds:
            sub = _variant_run(run, slug, seed, structure, self_paced)
            if sub.cfg.student.teachers == "cache":  # built once, in the run's own RUN/cache when it has one
                cache_targets(sub, progress=False)
            train_student(sub, progress=False, verbose=False)
            student = evaluate_stage(sub, STUDENT, "test", progress=False)
            if (structure, seed) not in controls:  # the control depends on the head and the seed only
                train_control(sub, progress=False, verbose=False)
                controls[(structure, seed)] = evaluate_stage(sub, CONTROL, "test", progress=False)
            control = controls[(structure, seed)]
            rows.append(
                {
                    "variant": name,
                    "structure": structure,
                    "self_paced": self_paced,
                    "seed": seed,
                    "parameters": student["parameters"],
                    **{m: student[m] for m in METRICS},
                    **{f"control_{m}": control[m] for m in METRICS},
                }
            )
            if verbose:
                print(f"{name}, seed {seed}: mAP {student['mAP']:.2f} (control {control['mAP']:.2f})", flush=True)
    summary = []
    for name, structure, self_paced in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        diffs = [r["mAP"] - r["control_mAP"] for r in mine]
        summary.append(
            {
                "variant": name,
                "structure": structure,
                "self_paced": self_paced,
                "parameters": mine[0]["parameters"],
                **{m: statistics.mean(r[m] for r in mine) for m in METRICS},
                "control_mAP": statistics.mean(r["control_mAP"] for r in mine),
                "vs_control": statistics.mean(diffs),
                "vs_control_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            }
        )
    result = {"seeds": seeds, "rows": rows, "summary": summary}
    out = run.dir / "ablation"
    atomic_write_json(out / "ablation.json", result)
    atomic_write_text(out / "ablation.md", ablation_table(result) + "\n")
    return result


def ablation_table(result: dict[str, Any]) -> str:
    seeds = result["seeds"]
    lines = [
        f"Test split; means over seeds {', '.join(map(str, seeds))}; control = the generalist trained on with the "
        "ground truth for the student's epochs, same head.",
        "",
        "| student | head | mAP | mean per-vertical AP | parameters | control mAP | student - control |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        spread = f" ± {s['vs_control_std']:.2f}" if len(seeds) > 1 else ""
        lines.append(
            f"| {s['variant']} | {s['structure']} | {s['mAP']:.2f} | {s['mean_per_vertical_AP']:.2f} | "
            f"{s['parameters']:,} | {s['control_mAP']:.2f} | {s['vs_control']:+.2f}{spread} |"
        )
    return "\n".join(lines)
