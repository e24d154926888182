"""`kc ablate`: the paper's ablation of the student on one run's generalist and specialists.

Variants: distillation alone (dense head, plain logits); + self-paced scales (the paper's, the centred ones that
keep the ranking across verticals, and the running norms that change no ranking); + structurally connected layers
(FC-SC); + both; and the same scales on a block of each hidden layer per vertical (SC-SC). Each variant is
trained for each seed in its own run directory under RUN/ablation/, which links the run's data, generalist,
specialists, soft-target cache and teacher choice instead of copying them, so that every variant learns from the
same teachers (under `teacher_choice: better_on_val` the run's own labelled-only control stays the reference:
`student.reference_run`). Beside each variant, two controls: per head structure the same-compute one (the
generalist trained on with the ground truth, same head, same epochs), and the ground-truth one with the variant's
head and scales (what the head and scales give without teachers): with unlabeled images, on the labelled images
only (`control_ground_truth_labelled`, the strongest baseline there), trained for every variant; without, for
the variants with scales (for one without, it is the same-compute control). Everything resumes like any stage;
`variants` (their slugs, e.g. sc-sc_vertical_centred) trains some of them only.

Every model is scored on val (what a choice between variants may read) and on test (the record), printed apart.
For a variant with scales, the paces: each vertical's scale at the student's best epoch over its scale after the
first epoch, and how that ratio ranks with the vertical's size (do verticals learn at different paces?).
The seeds here vary the student's and control's data order only (the teachers are the run's); for seeds over the
whole pipeline, use `kc seeds`. The table goes to RUN/ablation/ablation.md and .json.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from kc.config import load_config, merge
from kc.errors import KCError
from kc.evaluate.stage import evaluate_stage
from kc.io import atomic_write_json, atomic_write_text, read_json
from kc.run import Run, prepare_run
from kc.stages import CONTROL, GROUND_TRUTH, GROUND_TRUTH_LABELLED, STUDENT
from kc.train.controls import TRAIN, train_control
from kc.train.student import cache_targets, train_student
from kc.train.teacher_choice import CHOICE, chooses

# name, head structure, self-paced variant, normalisation of the blocks (image: the paper's; centred; running)
VARIANTS: list[tuple[str, str, str, str]] = [
    ("distillation", "fc-fc", "none", "image"),
    ("+ self-paced scales (paper)", "fc-fc", "vertical", "image"),
    ("+ self-paced scales (centred)", "fc-fc", "vertical", "centred"),
    ("+ self-paced scales (running norms)", "fc-fc", "vertical", "running"),
    ("+ structurally connected layers (FC-SC)", "fc-sc", "none", "image"),
    ("+ both (paper scales)", "fc-sc", "vertical", "image"),
    ("+ both (centred scales)", "fc-sc", "vertical", "centred"),
    ("+ both (running norms)", "fc-sc", "vertical", "running"),
    ("SC-SC", "sc-sc", "none", "image"),
    ("SC-SC + paper scales", "sc-sc", "vertical", "image"),
    ("SC-SC + centred scales", "sc-sc", "vertical", "centred"),
    ("SC-SC + running norms", "sc-sc", "vertical", "running"),
]


def slug(structure: str, self_paced: str, norm: str) -> str:
    """A variant's directory under RUN/ablation/ and its name on the command line."""
    return f"{structure}_{self_paced}" + ("" if norm == "image" else f"_{norm}")


SHARED = ("taxonomy.json", "data", "generalist", "specialists", "cache", CHOICE)
METRICS = ("mAP", "mean_per_vertical_AP")
SPLITS = ("val", "test")


def _variant_run(run: Run, slug: str, seed: int, structure: str, self_paced: str, norm: str) -> Run:
    directory = run.dir / "ablation" / slug / f"seed_{seed}"
    directory.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = directory / name
        if (run.dir / name).exists() and not link.is_symlink():
            link.symlink_to(run.dir / name, target_is_directory=(run.dir / name).is_dir())
    overrides = {
        "run_dir": str(directory),
        "student": {
            "seed": seed,
            "head": {"structure": structure},
            "self_paced": {"variant": self_paced, "centred": norm == "centred", "running": norm == "running"},
        },
    }
    if structure == "fc-fc":
        overrides = merge(overrides, {"student": {"head": {"shared_units": 0, "init": "generalist"}}})
    if structure == "sc-sc":
        overrides = merge(overrides, {"student": {"head": {"shared_units": 0}}})
    if chooses(run):  # the run's labelled-only control teaches where it beats the specialist, whatever the variant
        overrides = merge(overrides, {"student": {"reference_run": str(run.dir)}})
    return prepare_run(load_config(run.dir / "config.yaml", overrides), progress=False)


def _scores(run: Run, stage: str) -> dict[str, float]:
    out = {}
    for split in SPLITS:
        metrics = evaluate_stage(run, stage, split, progress=False)
        out.update({f"{split}_{m}": metrics[m] for m in METRICS})
        out["parameters"] = metrics["parameters"]
    return out


def scale_paces(student_dir: Path, vertical_ids: list[str]) -> dict[str, float] | None:
    """Per vertical, its self-paced scale at the student's best epoch over its scale after the first epoch (from
    the training history); None for a student without scales."""
    state = read_json(student_dir / "checkpoints" / "last.json")
    history, best = state.get("history", []), state.get("best_epoch")
    keys = [f"gamma/{vid}" for vid in vertical_ids]
    if not history or keys[0] not in history[0]:
        return None
    end = next((h for h in history if h["epoch"] == best), history[-1])
    return {vid: end[key] / history[0][key] for vid, key in zip(vertical_ids, keys, strict=True)}


def _ranks(values: list[float]) -> np.ndarray:
    """Ranks from 0, tied values sharing the mean of their ranks."""
    x = np.asarray(values, dtype=float)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, tie, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie, ranks) / counts)[tie]


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation; None where either side is constant (verticals of equal sizes)."""
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def ablate(run: Run, seeds: list[int], verbose: bool = True, variants: list[str] | None = None) -> dict[str, Any]:
    known = [slug(*v[1:]) for v in VARIANTS]
    unknown = sorted(set(variants or ()) - set(known))
    if unknown:
        raise KCError(f"--variant: {', '.join(unknown)} not among {', '.join(known)}")
    chosen = [v for v in VARIANTS if variants is None or slug(*v[1:]) in variants]
    rows: list[dict[str, Any]] = []
    controls: dict[tuple[str, int], dict[str, Any]] = {}
    truth_stage = GROUND_TRUTH_LABELLED if run.unlabeled else GROUND_TRUTH
    for name, structure, self_paced, norm in chosen:
        for seed in seeds:
            sub = _variant_run(run, slug(structure, self_paced, norm), seed, structure, self_paced, norm)
            if sub.cfg.student.teachers == "cache":  # built once, in the run's own RUN/cache when it has one
                cache_targets(sub, progress=False)
            train_student(sub, progress=False, verbose=False)
            student = _scores(sub, STUDENT)
            if (structure, seed) not in controls:  # the control depends on the head and the seed only
                train_control(sub, progress=False, verbose=False)
                controls[(structure, seed)] = _scores(sub, CONTROL)
            control = controls[(structure, seed)]
            truth = control
            if self_paced != "none" or truth_stage == GROUND_TRUTH_LABELLED:  # the variant's head and scales
                TRAIN[truth_stage](sub, progress=False, verbose=False)
                truth = _scores(sub, truth_stage)
            paces = scale_paces(sub.stage_dir(STUDENT), [v.id for v in run.taxonomy.verticals])
            rows.append(
                {
                    "paces": paces,
                    "variant": name,
                    "structure": structure,
                    "self_paced": self_paced,
                    "norm": norm,
                    "seed": seed,
                    **student,
                    **{f"control_{k}": v for k, v in control.items() if k != "parameters"},
                    **{f"truth_{k}": v for k, v in truth.items() if k != "parameters"},
                }
            )
            if verbose:
                print(
                    f"{name}, seed {seed}: val mAP {student['val_mAP']:.2f} (controls: same compute "
                    f"{control['val_mAP']:.2f}, ground truth {truth['val_mAP']:.2f}); test mAP "
                    f"{student['test_mAP']:.2f} ({control['test_mAP']:.2f}, {truth['test_mAP']:.2f})",
                    flush=True,
                )
    summary = []
    for name, structure, self_paced, norm in chosen:
        mine = [r for r in rows if r["variant"] == name]
        entry: dict[str, Any] = {
            "variant": name,
            "structure": structure,
            "self_paced": self_paced,
            "norm": norm,
            "parameters": mine[0]["parameters"],
        }
        for split in SPLITS:
            for m in METRICS:
                entry[f"{split}_{m}"] = statistics.mean(r[f"{split}_{m}"] for r in mine)
            for control in ("control", "truth"):
                diffs = [r[f"{split}_mAP"] - r[f"{control}_{split}_mAP"] for r in mine]
                entry[f"{control}_{split}_mAP"] = statistics.mean(r[f"{control}_{split}_mAP"] for r in mine)
                entry[f"{split}_vs_{control}"] = statistics.mean(diffs)
                entry[f"{split}_vs_{control}_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        paces = [r["paces"] for r in mine if r["paces"] is not None]
        if paces:  # pooled over seeds: every vertical's pace in every seed
            sizes = run.taxonomy.vertical_sizes()
            pooled = [p[v.id] for p in paces for v in run.taxonomy.verticals]
            entry["pace_min"], entry["pace_median"], entry["pace_max"] = (
                min(pooled),
                statistics.median(pooled),
                max(pooled),
            )
            correlations = [rank_correlation([p[v.id] for v in run.taxonomy.verticals], sizes) for p in paces]
            known = [c for c in correlations if c is not None]
            entry["pace_size_correlation"] = statistics.mean(known) if known else None
        summary.append(entry)
    best = max(summary, key=lambda s: s["val_mAP"])["variant"]
    result = {"seeds": seeds, "rows": rows, "summary": summary, "best_on_val": best, "truth_control": truth_stage}
    out = run.dir / "ablation"
    atomic_write_json(out / "ablation.json", result)
    atomic_write_text(out / "ablation.md", ablation_table(result) + "\n")
    return result


def ablation_table(result: dict[str, Any]) -> str:
    seeds = result["seeds"]
    spread = len(seeds) > 1
    if result.get("truth_control") == GROUND_TRUTH_LABELLED:
        truth = "the ground truth on the labelled images only, with the student's head and scales"
    else:
        truth = "the same with the student's head and scales (for a student without scales, the same-compute control)"
    lines = [
        f"Means over seeds {', '.join(map(str, seeds))} (the student's and controls' data order). Controls: same "
        "compute = the generalist trained on with the ground truth for the student's epochs, same head; ground "
        f"truth = {truth}. Val chooses, test records.",
        "",
        "| student | head | parameters | val mAP | val - same compute | val - ground truth | test mAP | "
        "test mean per-vertical AP | test - same compute | test - ground truth |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def diff(s: dict[str, Any], split: str, control: str) -> str:
        std = f" ± {s[f'{split}_vs_{control}_std']:.2f}" if spread else ""
        return f"{s[f'{split}_vs_{control}']:+.2f}{std}"

    for s in result["summary"]:
        lines.append(
            f"| {s['variant']} | {s['structure']} | {s['parameters']:,} | {s['val_mAP']:.2f} | "
            f"{diff(s, 'val', 'control')} | {diff(s, 'val', 'truth')} | {s['test_mAP']:.2f} | "
            f"{s['test_mean_per_vertical_AP']:.2f} | {diff(s, 'test', 'control')} | {diff(s, 'test', 'truth')} |"
        )
    lines += ["", f"Best on val mAP: {result['best_on_val']}."]
    paced = [s for s in result["summary"] if "pace_median" in s]
    if paced:
        lines += [
            "",
            "Paces of the self-paced scales: each vertical's scale at the student's best epoch over its scale after "
            "the first epoch, over the verticals of every seed; and their rank correlation with the vertical's size "
            "(mean over seeds).",
            "",
            "| student | pace: median | min | max | rank correlation with size |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in paced:
            correlation = s["pace_size_correlation"]
            shown = "n/a (equal sizes)" if correlation is None else f"{correlation:+.2f}"
            lines.append(
                f"| {s['variant']} | {s['pace_median']:.3f} | {s['pace_min']:.3f} | {s['pace_max']:.3f} | {shown} |"
            )
    return "\n".join(lines)
