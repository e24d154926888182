"""The controls a student's gain is measured against, each started from the trained generalist as the student is.

- **same compute** (`control`): the generalist, in the student's head structure, trained on with the ground truth
  for the student's epochs, batch, optimizer and schedule: what extra training alone gives.
- **self-distillation** (`control_self_distillation`): the student's exact recipe with the generalist as the only
  teacher (`kc.train.student.train_self_distillation`): what distillation gives without the specialists.
- **ground truth with the student's head** (`control_ground_truth`): the student's head and self-paced scales
  trained on the ground truth: what the head and scales give without teachers.
- **total compute** (`control_total_compute`): the same-compute control given the image-steps every specialist and
  the student took together (those that stopped at their val plateau counted to where they stopped), so that it
  has spent what the whole method spent after the generalist; bounded by its own val plateau
  (`controls.total_compute_patience`), since that budget can be many times the student's.
- **ground truth, labelled images only** (`control_ground_truth_labelled`): with unlabeled images
  (`data.unlabeled`), on which the other controls self-train, the ground-truth control without them: the
  strongest honest baseline may be one that ignores them. Its epochs are over fewer images, so it gets as many as
  hold the student's optimizer steps (20 student epochs over twice as many unlabeled as labelled images: 60),
  times `controls.ground_truth_labelled_steps`: a control that learns from fewer images can need more steps to
  reach its plateau, and the strongest baseline must be trained to it.
- **self-training** (`control_self_training`): with unlabeled images, the student's exact recipe taught by the
  labelled-only control alone (`kc.train.student.train_self_training`): a model trained on the labels teaching
  itself on the unlabeled images. Under `teacher_choice: better_on_val` the student differs from it only in the
  verticals a specialist teaches, so the gap between them is what the specialists add.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from kc.checkpoint import CheckpointDir
from kc.config import TrainConfig
from kc.run import Run
from kc.stages import (
    CONTROL,
    GROUND_TRUTH,
    GROUND_TRUTH_LABELLED,
    SELF_DISTILLATION,
    SELF_TRAINING,
    STUDENT,
    TOTAL_COMPUTE,
    specialist_dir,
    stage_complete,
)
from kc.train.generalist import train_on_ground_truth
from kc.train.specialists import (
    fold_training_samples,
    specialist_folds,
    specialist_training_samples,
    vertical_members,
)
from kc.train.student import scale_training, train_self_distillation, train_self_training, train_student
from kc.train.teacher_choice import chooses, reference_dir
from kc.train.trainer import EpochBatches, TrainResult
from kc.train.unlabeled import student_training_samples


def control_config(run: Run) -> TrainConfig:
    """The student's epochs, batch, optimizer and schedule, with the generalist's ground-truth loss."""
    fields = run.cfg.student.model_dump(include=set(TrainConfig.model_fields))
    return TrainConfig.model_validate({**fields, "loss": run.cfg.generalist.loss})


def image_steps(stage_dir: Path, samples: int, cfg: TrainConfig) -> int:
    """Images a stage's training passed through the network: the steps it took (a finished stage may have stopped
    at its val plateau; an unfinished one counts its whole budget) times the images in each."""
    if stage_complete(stage_dir):
        steps = CheckpointDir(stage_dir / "checkpoints").read_state()["step"]
    else:
        steps = cfg.epochs * EpochBatches.per_epoch(samples, cfg.batch_size)
    return steps * min(cfg.batch_size, samples)


def total_compute_epochs(run: Run) -> int:
    """Epochs of the control's batch that hold as many image-steps as every specialist and the student together
    took (the generalist's own are shared by every model, so they cancel)."""
    tax, scfg = run.taxonomy, run.cfg.specialists
    specialists = 0
    for fold in specialist_folds(run):  # cross-fitted: every fold's specialists count
        fold_samples = fold_training_samples(run, fold)
        members = vertical_members(fold_samples, tax.vertical_of_class, tax.num_verticals)
        for v in range(tax.num_verticals):
            samples = len(specialist_training_samples(run, v, fold_samples, members[v]))
            specialists += image_steps(specialist_dir(run, v, fold), samples, scfg)
    student_samples = len(student_training_samples(run))  # the control's epochs are over the same images
    spent = specialists + image_steps(run.stage_dir(STUDENT), student_samples, run.cfg.student)
    if chooses(run):  # the labelled-only control was then one of the student's teachers: its steps count too
        labelled = labelled_control_config(run)
        spent += image_steps(reference_dir(run), len(run.splits["train"]), labelled)
    control = control_config(run)
    per_epoch = EpochBatches.per_epoch(student_samples, control.batch_size) * min(control.batch_size, student_samples)
    return max(1, math.ceil(spent / per_epoch))


def total_compute_config(run: Run) -> TrainConfig:
    return control_config(run).model_copy(
        update={"epochs": total_compute_epochs(run), "patience": run.cfg.controls.total_compute_patience}
    )


Progress = Callable[[int], None] | None


def train_control(run: Run, *, progress: bool = True, verbose: bool = True, on_step: Progress = None) -> TrainResult:
    """The same-compute control: the generalist trained on for as many epochs as the student gets."""
    kw = {"progress": progress, "verbose": verbose, "on_step": on_step}
    return train_on_ground_truth(run, CONTROL, control_config(run), **kw)


def train_ground_truth_control(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Progress = None
) -> TrainResult:
    """The student's head and self-paced scales (their LR multiplier included) on the ground truth."""
    kw = {"progress": progress, "verbose": verbose, "on_step": on_step}
    scales = scale_training(run.cfg.student.self_paced, run.taxonomy)
    return train_on_ground_truth(run, GROUND_TRUTH, control_config(run), **scales, **kw)


def labelled_control_config(run: Run) -> TrainConfig:
    """The student's recipe over the labelled images alone, its epochs holding `controls.ground_truth_labelled_steps`
    times the student's optimizer steps."""
    control = control_config(run)
    student_steps = control.epochs * EpochBatches.per_epoch(len(student_training_samples(run)), control.batch_size)
    steps = student_steps * run.cfg.controls.ground_truth_labelled_steps
    per_epoch = EpochBatches.per_epoch(len(run.splits["train"]), control.batch_size)
    return control.model_copy(update={"epochs": max(1, math.ceil(steps / per_epoch))})


def train_ground_truth_labelled_control(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Progress = None
) -> TrainResult:
    """The ground-truth control on the labelled training split only (its stage trains on no unlabeled image), for
    `labelled_control_config`'s epochs."""
    kw = {"progress": progress, "verbose": verbose, "on_step": on_step}
    scales = scale_training(run.cfg.student.self_paced, run.taxonomy)
    return train_on_ground_truth(run, GROUND_TRUTH_LABELLED, labelled_control_config(run), **scales, **kw)


def train_total_compute_control(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Progress = None
) -> TrainResult:
    kw = {"progress": progress, "verbose": verbose, "on_step": on_step}
    return train_on_ground_truth(run, TOTAL_COMPUTE, total_compute_config(run), **kw)


# How each full-vocabulary stage after the generalist trains (the stage table is kc.stages.STAGES).
TRAIN: dict[str, Callable[..., TrainResult]] = {
    STUDENT: train_student,
    CONTROL: train_control,
    SELF_DISTILLATION: train_self_distillation,
    GROUND_TRUTH: train_ground_truth_control,
    TOTAL_COMPUTE: train_total_compute_control,
    GROUND_TRUTH_LABELLED: train_ground_truth_labelled_control,
    SELF_TRAINING: train_self_training,
}
