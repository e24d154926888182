"""The stages of a run, each a thin definition on top of the one trainer: model, data, loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kc.data.dataset import ImageDataset, dense_targets
from kc.errors import DataError
from kc.evaluate.metrics import classification_metrics
from kc.evaluate.predict import predict
from kc.io import atomic_write_json
from kc.models.classifier import Classifier, build_classifier
from kc.run import Run
from kc.train.checkpoint import load_weights
from kc.train.trainer import Trainer, TrainResult, resolve_device

GENERALIST = "generalist"


def ground_truth_loss(kind: str, num_classes: int) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """bce: sigmoid cross-entropy summed over classes, averaged over images. softmax: cross-entropy."""

    def bce(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["images"]).float()
        targets = dense_targets(batch["labels"], num_classes)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]

    def softmax(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["images"]).float(), batch["labels"][:, 0])

    return bce if kind == "bce" else softmax


def _check_single_label(run: Run) -> None:
    for split, samples in run.splits.items():
        for s in samples:
            if len(s.labels) != 1:
                raise DataError(
                    f"{s.where}: has {len(s.labels)} labels, but loss 'softmax' needs exactly one per image "
                    f"({split} split); use loss: bce for multi-label data"
                )


def validation_fn(
    run: Run, activation: str, device: torch.device, batch_size: int
) -> Callable[[nn.Module], dict[str, Any]] | None:
    if not run.splits["val"]:
        return None

    def validate(model: nn.Module) -> dict[str, Any]:
        scores, targets, _ = predict(
            model,
            run.splits["val"],
            run.image_root,
            run.cfg.data,
            run.taxonomy.num_classes,
            batch_size=batch_size,
            device=device,
            activation=activation,
        )
        m = classification_metrics(scores, targets, run.taxonomy)
        return {k: v for k, v in m.items() if isinstance(v, (int, float))}

    return validate


def build_stage_model(run: Run, stage: str) -> Classifier:
    torch.manual_seed(run.cfg.seed)
    if stage == GENERALIST:
        return build_classifier(run.cfg.model, run.taxonomy.num_classes)
    raise ValueError(f"unknown stage '{stage}'")


def train_generalist(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Callable[[int], None] | None = None
) -> TrainResult:
    """Backbone + head over all classes, trained on the ground truth alone."""
    cfg = run.cfg
    tcfg = cfg.generalist
    if tcfg.loss == "softmax":
        _check_single_label(run)
    device = resolve_device(cfg.device)
    model = build_stage_model(run, GENERALIST)
    train_set = ImageDataset(run.splits["train"], run.image_root, cfg.data, train=True, seed=cfg.seed)
    activation = "sigmoid" if tcfg.loss == "bce" else "softmax"
    trainer = Trainer(
        model,
        tcfg,
        run.stage_dir(GENERALIST),
        train_set,
        ground_truth_loss(tcfg.loss, run.taxonomy.num_classes),
        validation_fn(run, activation, device, tcfg.eval_batch_size),
        seed=cfg.seed,
        device=device,
        fingerprint=run.taxonomy.fingerprint() + str(cfg.model.model_dump(mode="json")),
        num_workers=cfg.data.num_workers,
        progress=progress,
        verbose=verbose,
        on_step=on_step,
        name=GENERALIST,
    )
    return trainer.fit()


def evaluate_stage(run: Run, stage: str = GENERALIST, split: str = "test", progress: bool = True) -> dict[str, Any]:
    """Score a stage's best checkpoint on a split; write RUN/<stage>/metrics_<split>.json and return the metrics."""
    samples = run.splits[split]
    if not samples:
        raise DataError(f"{run.dir}: the '{split}' split is empty; nothing to evaluate")
    device = resolve_device(run.cfg.device)
    model = build_stage_model(run, stage)
    load_weights(run.stage_dir(stage) / "checkpoints" / "best.safetensors", model)
    tcfg = run.cfg.generalist
    activation = "sigmoid" if tcfg.loss == "bce" else "softmax"
    scores, targets, images_per_s = predict(
        model,
        samples,
        run.image_root,
        run.cfg.data,
        run.taxonomy.num_classes,
        batch_size=tcfg.eval_batch_size,
        device=device,
        activation=activation,
        progress=progress,
        desc=f"evaluating {stage} on {split}",
    )
    metrics = classification_metrics(scores, targets, run.taxonomy)
    metrics.update(
        {
            "stage": stage,
            "split": split,
            "inference_images_per_s": images_per_s,
            "parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device),
        }
    )
    atomic_write_json(run.stage_dir(stage) / f"metrics_{split}.json", metrics)
    return metrics
