"""Scoring one trained stage (generalist, student or control) on a split."""

from __future__ import annotations

from typing import Any

from kc.errors import DataError, KCError
from kc.evaluate.metrics import classification_metrics
from kc.evaluate.predict import predict
from kc.io import atomic_write_json
from kc.models.classifier import count_parameters
from kc.run import Run
from kc.train.common import FULL_MODEL_STAGES, GENERALIST, STUDENT, load_stage, new_model
from kc.train.trainer import resolve_device


def evaluate_stage(run: Run, stage: str = GENERALIST, split: str = "test", progress: bool = True) -> dict[str, Any]:
    """Score a stage's best checkpoint; write RUN/<stage>/metrics_<split>.json and return the metrics."""
    if stage not in FULL_MODEL_STAGES:
        raise KCError(
            f"--stage: '{stage}' is not one of {', '.join(FULL_MODEL_STAGES)} "
            "(specialists are scored together by 'kc report')"
        )
    samples = run.splits[split]
    if not samples:
        raise DataError(f"{run.dir}: the '{split}' split is empty; nothing to evaluate")
    device = resolve_device(run.cfg.device)
    model = load_stage(run, run.stage_dir(stage), new_model(run, stage))
    tcfg = run.cfg.generalist
    activation = "sigmoid" if tcfg.loss == "bce" or stage == STUDENT else "softmax"
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
            "parameters": count_parameters(model),
            "device": str(device),
        }
    )
    atomic_write_json(run.stage_dir(stage) / f"metrics_{split}.json", metrics)
    return metrics
