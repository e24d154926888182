"""The generalist (all classes, ground truth only), and the ground-truth training every such control shares."""

from __future__ import annotations

from collections.abc import Callable

from kc.config import ModelConfig, TrainConfig
from kc.distributed import resolve_device
from kc.run import Run
from kc.stages import GENERALIST, STAGE, activation, new_generalist_model
from kc.train.common import (
    check_single_label,
    fit_stage,
    ground_truth_loss,
    start_digests,
    start_from_generalist,
    validation_fn,
)
from kc.train.trainer import TrainResult, fingerprint_data
from kc.train.unlabeled import student_training_samples, unlabeled_fingerprint


def train_on_ground_truth(
    run: Run,
    stage: str,
    tcfg: TrainConfig,
    *,
    progress: bool,
    verbose: bool,
    on_step: Callable[[int], None] | None,
    scalars: Callable | None = None,
    lr_multipliers: dict[str, float] | None = None,
) -> TrainResult:
    """Train `stage` on the ground truth with the generalist's loss: the generalist from scratch on the training
    split, a control from the trained generalist in the stage's architecture (`STAGES`) on the student's training
    images (with any unlabeled ones, labelled by the generalist)."""
    cfg = run.cfg
    if tcfg.loss == "softmax":
        check_single_label(run)
    device = resolve_device(cfg.device)
    fingerprint = run.taxonomy.fingerprint() + model_fingerprint(cfg.model)
    if stage == GENERALIST:
        model, samples = new_generalist_model(run), run.splits["train"]
    else:  # a control: the trained generalist, in the stage's architecture
        fingerprint += (
            start_digests(run)
            + str(fingerprint_data(cfg.student.head.model_dump()))
            + str(cfg.generalist.sampled_negatives)
        )
        if STAGE[stage].scales:
            fingerprint += str(cfg.student.self_paced.model_dump())
        model = start_from_generalist(run, stage)
        samples = student_training_samples(run) if STAGE[stage].unlabeled else run.splits["train"]
        if STAGE[stage].unlabeled:
            fingerprint += unlabeled_fingerprint(run)
    return fit_stage(
        run,
        name=stage,
        stage_dir=run.stage_dir(stage),
        model=model,
        tcfg=tcfg,
        samples=samples,
        loss=ground_truth_loss(tcfg.loss, run.taxonomy.num_classes, run.cfg.generalist.sampled_negatives),
        validate=validation_fn(run, device, tcfg.eval_batch_size, activation(stage, cfg.generalist.loss)),
        seed=tcfg.stage_seed(cfg.seed),
        fingerprint=fingerprint,
        progress=progress,
        verbose=verbose,
        on_step=on_step,
        scalars=scalars,
        lr_multipliers=lr_multipliers,
    )


def model_fingerprint(model: ModelConfig) -> str:
    """The model config as the checkpoints of the generalist and the controls record it."""
    return str(fingerprint_data(model.model_dump(mode="json")))


def train_generalist(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Callable[[int], None] | None = None
) -> TrainResult:
    """Backbone + head over all classes, trained on the ground truth alone."""
    return train_on_ground_truth(
        run, GENERALIST, run.cfg.generalist, progress=progress, verbose=verbose, on_step=on_step
    )
