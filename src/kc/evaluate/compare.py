"""Scores for every model a run has, side by side on the val and the test split, and the comparison.

Models (rows of the comparison):

- **generalist** — one network over all classes.
- **specialists (oracle-routed)** — each vertical's classes scored by its own specialist, on every test image. No
  router makes mistakes for it, so it is the upper reference: K networks per image.
- **teachers as chosen (oracle-routed)** — under `student.teacher_choice: better_on_val` only: each vertical
  scored by the teacher the student learned it from (its specialist, or the labelled-only control's block), routed
  by an oracle as above: the upper reference of what the student was taught.
- **specialists (ensemble)** — what a deployment of the specialists would run: the generalist as router and every
  specialist on every image, merged by the rule score(c) = p_specialist(c) * max_{c' in v} p_generalist(c') for a
  class c of vertical v (the specialist's belief, gated by how present the generalist thinks the vertical is):
  K + 1 networks per image.
- **student** — one network, the knowledge of the K specialists concentrated into it.
- **the controls** (`kc.train.controls`) — what the student must beat: the same compute, self-distillation, the
  student's head on the ground truth, the total compute.

The evidence protocol: the strongest baseline (the generalist or a control) is chosen by **val** mAP, and the gap
the student closed is measured on **test** from that baseline; the gap from the generalist (the paper's figure)
stands beside it, labelled. Each split also gets its chance floor (the vertical-only scorer) and every model its
within-vertical mAP (each class ranked among its vertical's own images).

Images/s are the forward passes alone (decoding excluded), with the same batch size and threads for every model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kc.distributed import resolve_device
from kc.errors import CheckpointError
from kc.evaluate.metrics import (
    classification_metrics,
    metrics_from_ap,
    verified_targets,
    vertical_floor_ap,
    within_vertical_ap,
)
from kc.evaluate.predict import predict
from kc.models.classifier import count_parameters
from kc.models.self_paced import SelfPacedScales
from kc.run import Run
from kc.stages import (
    GENERALIST,
    GROUND_TRUTH_LABELLED,
    STAGES,
    STUDENT,
    activation,
    best_weights,
    load_specialists,
    load_stage,
    new_generalist_model,
    new_model,
    specialist_dirs,
    stage_complete,
)

ORACLE, ENSEMBLE = "specialists (oracle-routed)", "specialists (ensemble)"
CHOSEN = "teachers as chosen on val (oracle-routed)"
METRICS = ("mAP", "mean_per_vertical_AP")


@dataclass(frozen=True)
class ChosenTeachers:
    """Under `student.teacher_choice: better_on_val`: per vertical whether its specialist teaches it, and the model
    that teaches the others (the labelled-only control: `kc.train.teacher_choice.load_reference`)."""

    specialist_teaches: list[bool]
    load_reference: Callable[[], torch.nn.Module]


def output_scales(model: torch.nn.Module, run: Run) -> dict[str, float] | None:
    scales = getattr(model, "output_scales", None)
    if not isinstance(scales, SelfPacedScales) or scales.variant == "none":
        return None
    return {v.id: float(g) for v, g in zip(run.taxonomy.verticals, scales.per_vertical_scale(), strict=True)}


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def compare(
    run: Run, split: str = "test", progress: bool = False, teachers: ChosenTeachers | None = None
) -> dict[str, Any]:
    """Every model scored on `split` and reduced to its metrics before the next is scored: at most the generalist's
    scores, the targets and one more (images x classes) matrix are held at once (at 100K classes, 1.6 GB each for
    4,000 images). `teachers` (under `student.teacher_choice: better_on_val`) adds the row of the teachers as chosen,
    and with it one more matrix."""
    needed = [run.stage_dir(GENERALIST)]
    needed += [d for v in range(run.taxonomy.num_verticals) for d in specialist_dirs(run, v)]
    unfinished = [d for d in needed if not stage_complete(d)]
    if unfinished:
        raise CheckpointError(
            f"{unfinished[0]}: not finished training ({len(unfinished)} such stage(s)); every other row of the "
            "report rests on the generalist and the specialists, so finish them first (kc pipeline, or rerun the "
            "stage's command: it resumes)"
        )
    samples = run.splits[split]
    device = resolve_device(run.cfg.device)
    C, n = run.taxonomy.num_classes, len(samples)
    batch_size = run.cfg.generalist.eval_batch_size
    loss = run.cfg.generalist.loss

    def run_model(
        model: torch.nn.Module,
        desc: str,
        classes: tuple[int, int] = (0, C),
        targets: bool = False,
        how: str = "sigmoid",
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Scores, targets over `classes` if asked for (a specialist's vertical: no (N, C) matrix), seconds."""
        scores, truth, rate = predict(
            model,
            samples,
            run.image_root,
            run.cfg.data,
            classes[1] - classes[0],
            batch_size=batch_size,
            device=device,
            activation=how,
            first_class=classes[0],
            with_targets=targets,
            progress=progress,
            desc=desc,
        )
        return scores, truth, n / rate if rate else 0.0

    models: list[dict[str, Any]] = []

    def add(
        stage: str, name: str, scores: np.ndarray, parameters: int, networks: int, seconds: float, scales=None
    ) -> None:
        m = classification_metrics(scores, targets, run.taxonomy)
        within = within_vertical_ap(scores, targets, run.taxonomy)
        models.append(
            {
                "stage": stage,
                "model": name,
                "mean_per_vertical_AP": m["mean_per_vertical_AP"],
                "mAP": m["mAP"],
                "within_vertical_mAP": metrics_from_ap(within, run.taxonomy, n)["mAP"],
                "per_vertical_AP": {k: v["ap"] for k, v in m["per_vertical"].items()},
                **({k: m[k] for k in ("top1", "top5") if k in m}),
                "parameters": parameters,
                "networks_per_image": networks,
                "images_per_s": _rate(n, seconds),
                **({"self_paced_scales": scales} if scales else {}),
            }
        )

    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run))
    gen_scores, targets, gen_seconds = run_model(generalist, GENERALIST, targets=True, how=activation(GENERALIST, loss))
    targets = verified_targets(targets, samples)
    gen_params = count_parameters(generalist)
    add(GENERALIST, "generalist", gen_scores, gen_params, 1, gen_seconds)

    specialists = load_specialists(run)
    oracle = np.zeros_like(gen_scores)
    spec_times, spec_params = [], 0
    for v, model in enumerate(specialists):
        start, end = run.taxonomy.vertical_ranges[v]
        scores, _, seconds = run_model(model, f"specialist {v}", (start, end))
        oracle[:, start:end] = scores[:, : end - start]
        spec_times.append(seconds)
        spec_params += count_parameters(model)
    spec_seconds = sum(spec_times)
    K = len(specialists) * run.cfg.specialists.folds  # networks: cross-fitted verticals run every fold's
    add("specialists_oracle", ORACLE, oracle, spec_params, K, spec_seconds)
    if teachers is not None and not all(teachers.specialist_teaches):
        # The labelled-only control's scores, with the blocks of the verticals its specialist teaches overwritten
        # by the specialist's: under teacher choice, one more (images x classes) matrix for this row.
        reference = teachers.load_reference()
        chosen, _, seconds = run_model(reference, GROUND_TRUTH_LABELLED)
        parameters = count_parameters(reference)
        for v, own in enumerate(teachers.specialist_teaches):
            if own:
                start, end = run.taxonomy.vertical_ranges[v]
                chosen[:, start:end] = oracle[:, start:end]
                parameters += count_parameters(specialists[v])
                seconds += spec_times[v]
        networks = sum(teachers.specialist_teaches) * run.cfg.specialists.folds + 1
        add("teachers_chosen", CHOSEN, chosen, parameters, networks, seconds)
        del chosen
    for start, end in run.taxonomy.vertical_ranges:  # the ensemble, in place: gated by the generalist
        oracle[:, start:end] *= gen_scores[:, start:end].max(axis=1, keepdims=True)
    add("specialists_ensemble", ENSEMBLE, oracle, spec_params + gen_params, K + 1, spec_seconds + gen_seconds)
    del oracle, gen_scores

    still_training = []  # a stage still training (or stopped) has a best checkpoint too, which is not a result
    for stage in STAGES[1:]:
        stage_dir = run.stage_dir(stage.name)
        if not best_weights(stage_dir).is_file():
            continue
        if not stage_complete(stage_dir):
            still_training.append(stage.name)
        else:
            model = load_stage(stage_dir, new_model(run, stage.name))
            scores, _, seconds = run_model(model, stage.name, how=activation(stage.name, loss))
            add(stage.name, stage.title, scores, count_parameters(model), 1, seconds, output_scales(model, run))
            del scores

    floor = metrics_from_ap(vertical_floor_ap(targets, run.taxonomy), run.taxonomy, n)
    return {
        "split": split,
        "images": n,
        "models": models,
        "floor": {k: floor[k] for k in METRICS},
        "unfinished": still_training,
    }


def compare_splits(run: Run, progress: bool = False, teachers: ChosenTeachers | None = None) -> dict[str, Any]:
    """The comparison on test (the record; its keys at the top level) with the comparison on val beside it (key
    `val`, what chooses); the strongest baseline chosen on val and the gap closed on test (`gaps`)."""
    test = compare(run, "test", progress=progress, teachers=teachers)
    val = compare(run, "val", progress=progress, teachers=teachers) if run.splits["val"] else None
    result = {**test, "val": val, **gaps(test, val)}
    if teachers is not None and STUDENT in {m["stage"] for m in test["models"]}:
        ids = [v.id for v in run.taxonomy.verticals]
        result["student_by_teacher"] = by_teacher(test, val, dict(zip(ids, teachers.specialist_teaches, strict=True)))
    return result


def baselines(rows: dict[str, Any]) -> list[str]:
    """The stages among `rows` the student must beat: the generalist and every control, in the stages' order."""
    return [s.name for s in STAGES if (s.name == GENERALIST or s.control) and s.name in rows]


def by_teacher(test: dict[str, Any], val: dict[str, Any] | None, specialist_teaches: dict[str, bool]) -> list[dict]:
    """Under teacher choice: per baseline, the student's per-vertical AP minus the baseline's, averaged over the
    verticals its specialists teach and over those the labelled-only control teaches, on val and test, with the
    verticals where the student leads on test. The self-training control learns the student's own targets in the
    control-taught verticals, so its difference there is what training noise alone moves; in the specialist-taught
    verticals, the difference is what the specialists add."""
    rows = {m["stage"]: m for m in test["models"]}
    val_rows = {m["stage"]: m for m in val["models"]} if val is not None else {}
    groups = {
        teacher: [vid for vid, mine in specialist_teaches.items() if mine == own]
        for teacher, own in (("specialist", True), ("labelled-only control", False))
    }
    out = []
    for name in baselines(rows):
        for teacher, group in groups.items():
            if not group:
                continue
            entry: dict[str, Any] = {"baseline": name, "teacher": teacher, "verticals": len(group)}
            for split, table in (("test", rows), ("val", val_rows)):
                if name not in table:
                    entry[split] = None
                    continue
                diffs = [table[STUDENT]["per_vertical_AP"][vid] - table[name]["per_vertical_AP"][vid] for vid in group]
                diffs = [d for d in diffs if d == d]  # a vertical without images of its classes scores NaN
                entry[split] = float(np.mean(diffs)) if diffs else None
                if split == "test":
                    entry["test_wins"] = sum(d > 0 for d in diffs)
            out.append(entry)
    return out


def gaps(test: dict[str, Any], val: dict[str, Any] | None) -> dict[str, Any]:
    """The strongest baseline (generalist or control, by val mAP) and the share of the baseline -> specialists
    (oracle-routed) gap the student closed on test: overall, from the generalist, and per vertical; with a teacher
    chosen per vertical, also the share of the baseline -> teachers-as-chosen gap."""
    rows = {m["stage"]: m for m in test["models"]}
    if STUDENT not in rows:
        return {}
    if val is not None:
        val_rows = {m["stage"]: m for m in val["models"]}
        strongest = max(baselines(rows), key=lambda name: val_rows[name]["mAP"])
        chosen_on = "val mAP"
    else:
        strongest, chosen_on = GENERALIST, "no val split: the generalist"
    student, oracle = rows[STUDENT], rows["specialists_oracle"]

    def closed(base: dict[str, Any]) -> dict[str, float | None]:
        return {k: gap_closed(student[k], base[k], oracle[k]) for k in METRICS}

    base = rows[strongest]
    per_vertical = {
        vid: gap_closed(student["per_vertical_AP"][vid], base["per_vertical_AP"][vid], oracle["per_vertical_AP"][vid])
        for vid in student["per_vertical_AP"]
    }
    gap = {"from_strongest_baseline": closed(base), "from_generalist": closed(rows[GENERALIST])}
    # The specialists' lead (test, points) over the strongest baseline bounds what their knowledge can add to the
    # student; the lead over the generalist is the paper's. A benchmark in the paper's regime has both large.
    headroom = {
        "over_strongest_baseline": {k: oracle[k] - base[k] for k in METRICS},
        "over_generalist": {k: oracle[k] - rows[GENERALIST][k] for k in METRICS},
    }
    if "teachers_chosen" in rows:  # the teachers the student learned from, where some are not specialists
        chosen = rows["teachers_chosen"]
        gap["to_chosen_teachers"] = {k: gap_closed(student[k], base[k], chosen[k]) for k in METRICS}
        headroom["chosen_teachers_over_strongest_baseline"] = {k: chosen[k] - base[k] for k in METRICS}
    return {
        "strongest_baseline": {"stage": strongest, "model": base["model"], "chosen_on": chosen_on},
        "gap_closed": gap,
        "gap_closed_per_vertical": per_vertical,
        "headroom": headroom,
    }


def gap_closed(student: float, baseline: float, specialists: float) -> float | None:
    """The share of the baseline -> specialists gap the student closed (the paper, from its generalist: 25%)."""
    if any(x is None or x != x for x in (student, baseline, specialists)):
        return None
    gap = specialists - baseline
    return (student - baseline) / gap if gap > 0 else None
