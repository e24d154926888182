"""The generalist (all classes, ground truth only) and the control (the generalist trained on for the student's
epochs, same data and schedule: the comparison without which a student's gain may be extra training alone)."""

from __future__ import annotations

from collections.abc import Callable

from kc.config import ModelConfig, TrainConfig
from kc.data.dataset import ImageDataset
from kc.run import Run
from kc.train.common import (
    CONTROL,
    GENERALIST,
    check_single_label,
    ground_truth_loss,
    new_generalist_model,
    start_digests,
    start_from_generalist,
    validation_fn,
)
from kc.train.trainer import Trainer, TrainResult, fingerprint_data, resolve_device


def _train_on_ground_truth(
    run: Run,
    stage: str,
    tcfg: TrainConfig,
    progress: bool,
    verbose: bool,
    on_step: Callable[[int], None] | None,
) -> TrainResult:
    cfg = run.cfg
    if tcfg.loss == "softmax":
        check_single_label(run)
    device = resolve_device(cfg.device)
    fingerprint = run.taxonomy.fingerprint() + model_fingerprint(cfg.model)
    if stage == GENERALIST:
        model = new_generalist_model(run)
    else:  # the control: the trained generalist, in the student's head structure
        fingerprint += start_digests(run) + str(cfg.student.head.model_dump()) + str(cfg.generalist.sampled_negatives)
        model = start_from_generalist(run, stage)
    seed = tcfg.stage_seed(cfg.seed)
    train_set = ImageDataset(run.splits["train"], run.image_root, cfg.data, train=True, seed=seed)
    activation = "sigmoid" if tcfg.loss == "bce" else "softmax"
    trainer = Trainer(
        model,
        tcfg,
        run.stage_dir(stage),
        train_set,
        ground_truth_loss(tcfg.loss, run.taxonomy.num_classes, run.cfg.generalist.sampled_negatives),
        validation_fn(run, device, tcfg.eval_batch_size, activation),
        seed=seed,
        device=device,
        fingerprint=fingerprint,
        num_workers=cfg.data.num_workers,
        progress=progress,
        verbose=verbose,
        on_step=on_step,
        name=stage,
    )
    return trainer.fit()


def model_fingerprint(model: ModelConfig) -> str:
    """The model config as the checkpoints of the generalist and the control record it."""
    return str(fingerprint_data(model.model_dump(mode="json")))


def train_generalist(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Callable[[int], None] | None = None
) -> TrainResult:
    """Backbone + head over all classes, trained on the ground truth alone."""
    return _train_on_ground_truth(run, GENERALIST, run.cfg.generalist, progress, verbose, on_step)


def control_config(run: Run) -> TrainConfig:
    """The student's epochs, batch, optimizer and schedule, with the generalist's ground-truth loss."""
    fields = run.cfg.student.model_dump(include=set(TrainConfig.model_fields))
    return TrainConfig.model_validate({**fields, "loss": run.cfg.generalist.loss})


def train_control(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Callable[[int], None] | None = None
) -> TrainResult:
    """The generalist, from its best checkpoint, trained on for as many epochs as the student gets."""
    return _train_on_ground_truth(run, CONTROL, control_config(run), progress, verbose, on_step)
