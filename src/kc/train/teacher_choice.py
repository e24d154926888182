"""Which model teaches each vertical (`student.teacher_choice`).

The paper teaches every vertical by its specialist. Where a specialist is weaker than the student's own head
trained on the labels, the student, which follows its teacher vertical by vertical, is pulled below what the labels
alone would give it (measured at 10K classes: docs/BENCHMARKS.md). With `teacher_choice: better_on_val` each
vertical is taught by its specialist only where that specialist's val AP on the vertical's classes beats the
labelled-only ground-truth control's (`control_ground_truth_labelled`, the student's head on the labelled images,
trained first), by more than `student.teacher_choice_margin` AP points; elsewhere by that control's block of the
vertical's classes. A choice on val, as every choice.
With `student.reference_run` the reference is another run's labelled-only control (same data and taxonomy): `kc
ablate` points each variant at its run's, so that every variant learns from the same teachers.

    RUN/teacher_choice.json   per vertical: both val APs and the teacher chosen, with the digests of the weights
                              they were measured on and the margin (measured again when any changes)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from kc import distributed
from kc.config import load_config
from kc.distributed import resolve_device
from kc.errors import CheckpointError, ConfigError
from kc.evaluate.stage import evaluate_stage
from kc.io import atomic_write_json, read_json
from kc.models.classifier import LogitMean
from kc.run import Run, prepare_run, stage_path
from kc.stages import (
    GROUND_TRUTH_LABELLED,
    best_weights,
    file_digest,
    load_fold_specialists,
    load_specialists,
    load_stage,
    new_model,
    specialist_digest,
)
from kc.train.common import validation_fn

CHOICE = "teacher_choice.json"
REFERENCE = GROUND_TRUTH_LABELLED  # the student's head on the labelled images alone


class VerticalBlock(nn.Module):
    """A full-vocabulary model's logits of one vertical's classes: a teacher in a specialist's place."""

    def __init__(self, model: nn.Module, start: int, end: int):
        super().__init__()
        self.model, self.start, self.end = model, start, end

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # the model computes the vertical's classes alone where it can (at 100K classes a tenth of the work)
        classes = torch.arange(self.start, self.end, device=images.device)
        return self.model(images, classes=classes)


def chooses(run: Run) -> bool:
    return run.cfg.student.teacher_choice == "better_on_val"


def specialist_teaches(run: Run) -> list[bool]:
    """Per vertical, whether its specialist teaches it (always, under `teacher_choice: specialists`)."""
    if not chooses(run):
        return [True] * run.taxonomy.num_verticals
    return [row["teacher"] == "specialist" for row in teacher_choice(run)]


def teacher_choice(run: Run) -> list[dict]:
    """RUN/teacher_choice.json's rows: per vertical its id, the val AP of its specialist and of the reference on its
    classes, and the teacher chosen. A vertical without val images to compare on keeps its specialist."""
    return _choice_record(run)["verticals"]


def reference_dir(run: Run) -> Path:
    """The stage directory of the labelled-only control the specialists are compared with: this run's, or
    `student.reference_run`'s."""
    other = run.cfg.student.reference_run
    return run.stage_dir(REFERENCE) if other is None else stage_path(other, REFERENCE)


def reference_run(run: Run) -> Run:
    """The run whose labelled-only control is the reference: `run` itself, or `student.reference_run`, opened with
    its own config (its head and scales may differ from this run's) and checked to cover the same classes and val
    images."""
    other = run.cfg.student.reference_run
    if other is None:
        return run
    if not (other / "config.yaml").is_file():
        raise ConfigError(f"student.reference_run: {other} is not a run directory (no config.yaml)")
    ref = prepare_run(load_config(other / "config.yaml", {"run_dir": str(other)}), progress=False)
    for what, same in (
        ("classes", ref.taxonomy.fingerprint() == run.taxonomy.fingerprint()),
        ("val images", [s.path for s in ref.splits["val"]] == [s.path for s in run.splits["val"]]),
    ):
        if not same:
            raise ConfigError(
                f"student.reference_run: {other} has other {what} than {run.dir}; give a run of the same data"
            )
    return ref


def require_reference(run: Run, needed_by: str) -> Path:
    """The reference's best weights; a CheckpointError saying how to train it when it is not trained yet."""
    weights = best_weights(reference_dir(run))
    if not weights.is_file():
        raise CheckpointError(
            f"{reference_dir(run)}: the labelled-only control is not trained yet ({needed_by}); train it first: "
            f"kc control {reference_dir(run).parent} --kind ground_truth_labelled (kc pipeline trains it before)"
        )
    return weights


def _choice_record(run: Run) -> dict:
    """RUN/teacher_choice.json: the rows with the digests of the weights they were measured on (measured again,
    once, on rank 0 under torchrun, when missing or made from other weights)."""
    path = run.dir / CHOICE
    wanted = {
        "reference": file_digest(
            require_reference(run, "student.teacher_choice better_on_val compares each specialist with it")
        ),
        "specialists": [specialist_digest(run, v) for v in range(run.taxonomy.num_verticals)],
        "margin": run.cfg.student.teacher_choice_margin,
    }
    saved = read_json(path) if path.is_file() else {}
    if {k: saved.get(k) for k in wanted} == wanted:
        return saved
    return distributed.on_main(lambda: _measure(run, wanted))


def _measure(run: Run, wanted: dict) -> dict:
    reference = evaluate_stage(reference_run(run), REFERENCE, "val", progress=False)["per_vertical"]
    device = resolve_device(run.cfg.device)
    rows = []
    for v, vertical in enumerate(run.taxonomy.verticals):
        validate = validation_fn(run, device, run.cfg.student.eval_batch_size, classes=run.taxonomy.vertical_ranges[v])
        folds = load_fold_specialists(run, v)
        specialist = folds[0] if len(folds) == 1 else LogitMean(folds)  # as the student is taught by it
        own = validate(specialist).get("mAP") if validate is not None else None
        other = reference[vertical.id]["ap"]
        better = own is None or math.isnan(other) or own > other + wanted["margin"]
        rows.append(
            {
                "vertical": vertical.id,
                "specialist_val_AP": own,
                "reference_val_AP": None if math.isnan(other) else other,
                "teacher": "specialist" if better else "labels",
            }
        )
    record = {**wanted, "verticals": rows}
    atomic_write_json(run.dir / CHOICE, record)
    return record


def teacher_digests(run: Run) -> list[str]:
    """What the cache and the student record of each vertical's teacher: its specialist's weights, or the
    reference's (a cache shard is one vertical's, so the reference's digest says which block it holds)."""
    if not chooses(run):
        return [specialist_digest(run, v) for v in range(run.taxonomy.num_verticals)]
    record = _choice_record(run)  # its digests are the weights' now: every file is hashed once
    return [
        digest if row["teacher"] == "specialist" else f"labels:{record['reference']}"
        for digest, row in zip(record["specialists"], record["verticals"], strict=True)
    ]


def load_reference(run: Run) -> nn.Module:
    """The reference (the labelled-only control), in the architecture of the run that trained it."""
    ref = reference_run(run)
    return load_stage(ref.stage_dir(REFERENCE), new_model(ref, REFERENCE))


def fold_teachers(run: Run, verticals: list[int]) -> list[list[nn.Module] | None]:
    """Each of `verticals`' teachers for the cache (its specialist's folds, or the reference's block); None for the
    others."""
    own = specialist_teaches(run)
    reference = None if all(own[v] for v in verticals) else load_reference(run)
    teachers: list[list[nn.Module] | None] = [None] * run.taxonomy.num_verticals
    for v in verticals:
        if own[v]:
            teachers[v] = load_fold_specialists(run, v)
        else:
            teachers[v] = [VerticalBlock(reference, *run.taxonomy.vertical_ranges[v])]
    return teachers


def online_teachers(run: Run) -> list[nn.Module]:
    """Each vertical's teacher, for online teaching."""
    specialists = load_specialists(run)
    own = specialist_teaches(run)
    if all(own):
        return specialists
    reference = load_reference(run)
    ranges = run.taxonomy.vertical_ranges
    return [s if own[v] else VerticalBlock(reference, *ranges[v]) for v, s in enumerate(specialists)]
