"""Scoring one trained stage (generalist, student or control) on a split."""

from __future__ import annotations

from typing import Any

from kc import distributed
from kc.distributed import resolve_device
from kc.errors import DataError, KCError
from kc.evaluate.metrics import (
    classification_metrics,
    metrics_from_ap,
    streaming_average_precision,
    verified_targets,
)
from kc.evaluate.predict import predict, predict_batches
from kc.io import atomic_write_json
from kc.models.classifier import count_parameters
from kc.run import Run
from kc.stages import FULL_MODEL_STAGES, GENERALIST, activation, load_stage, new_model

# Above this many bytes of (images x classes) scores, AP is computed streaming (two passes over the model's outputs,
# memory O(labels + batch)) instead of from the score matrix; both give the same AP.
MAX_SCORE_BYTES = 2 * 2**30


def evaluate_stage(
    run: Run,
    stage: str = GENERALIST,
    split: str = "test",
    progress: bool = True,
    max_score_bytes: int = MAX_SCORE_BYTES,
) -> dict[str, Any]:
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
    model = load_stage(run.stage_dir(stage), new_model(run, stage))
    tcfg = run.cfg.generalist
    C = run.taxonomy.num_classes
    how = activation(stage, tcfg.loss)
    options = {"batch_size": tcfg.eval_batch_size, "device": device, "activation": how, "progress": progress}
    images_per_s: float | None = None
    if len(samples) * C * 4 > max_score_bytes:

        def batches():
            start = 0
            for scores, targets, _ in predict_batches(model, samples, run.image_root, run.cfg.data, C, **options):
                yield scores, verified_targets(targets, samples[start : start + len(targets)])
                start += len(targets)

        metrics = metrics_from_ap(streaming_average_precision(batches, C), run.taxonomy, len(samples))
        metrics["streaming"] = True
    else:
        scores, targets, images_per_s = predict(
            model, samples, run.image_root, run.cfg.data, C, desc=f"evaluating {stage} on {split}", **options
        )
        metrics = classification_metrics(scores, verified_targets(targets, samples), run.taxonomy)
    metrics.update(
        {
            "stage": stage,
            "split": split,
            "inference_images_per_s": images_per_s,
            "parameters": count_parameters(model),
            "device": str(device),
        }
    )
    if distributed.is_main():
        atomic_write_json(run.stage_dir(stage) / f"metrics_{split}.json", metrics)
    return metrics
