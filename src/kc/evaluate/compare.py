"""Scores for every model a run has, measured side by side on the test split, and the comparison.

Models (rows of the comparison):

- **generalist** — one network over all classes.
- **specialists (oracle-routed)** — each vertical's classes scored by its own specialist, on every test image. No
  router makes mistakes for it, so it is the upper reference: K networks per image.
- **specialists (ensemble)** — what a deployment of the specialists would run: the generalist as router and every
  specialist on every image, merged by the rule score(c) = p_specialist(c) * max_{c' in v} p_generalist(c') for a
  class c of vertical v (the specialist's belief, gated by how present the generalist thinks the vertical is):
  K + 1 networks per image.
- **student** — one network, the knowledge of the K specialists concentrated into it.
- **control** — the generalist trained on for the student's epochs on the ground truth: same compute, no teachers.

Images/s are the forward passes alone (decoding excluded), with the same batch size and threads for every model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kc.evaluate.metrics import classification_metrics, verified_targets
from kc.evaluate.predict import predict
from kc.models.classifier import count_parameters
from kc.models.self_paced import SelfPacedScales
from kc.run import Run
from kc.train.common import (
    CONTROL,
    GENERALIST,
    STUDENT,
    best_weights,
    load_specialists,
    load_stage,
    new_generalist_model,
    new_model,
)
from kc.train.trainer import resolve_device


def output_scales(model: torch.nn.Module, run: Run) -> dict[str, float] | None:
    scales = getattr(model, "output_scales", None)
    if not isinstance(scales, SelfPacedScales) or scales.variant == "none":
        return None
    return {v.id: float(g) for v, g in zip(run.taxonomy.verticals, scales.per_vertical_scale(), strict=True)}


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def compare(run: Run, split: str = "test", progress: bool = False) -> dict[str, Any]:
    """Every model scored on `split` and reduced to its metrics before the next is scored: at most the generalist's
    scores, the targets and one more (images x classes) matrix are held at once (at 100K classes, 1.6 GB each for
    4,000 images)."""
    samples = run.splits[split]
    device = resolve_device(run.cfg.device)
    C, n = run.taxonomy.num_classes, len(samples)
    batch_size = run.cfg.generalist.eval_batch_size

    def run_model(
        model: torch.nn.Module, desc: str, classes: tuple[int, int] = (0, C), targets: bool = False
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
            first_class=classes[0],
            with_targets=targets,
            progress=progress,
            desc=desc,
        )
        return scores, truth, n / rate if rate else 0.0

    models: list[dict[str, Any]] = []

    def add(name: str, scores: np.ndarray, parameters: int, networks: int, seconds: float, scales=None) -> None:
        m = classification_metrics(scores, targets, run.taxonomy)
        models.append(
            {
                "model": name,
                "mean_per_vertical_AP": m["mean_per_vertical_AP"],
                "mAP": m["mAP"],
                "per_vertical_AP": {k: v["ap"] for k, v in m["per_vertical"].items()},
                **({k: m[k] for k in ("top1", "top5") if k in m}),
                "parameters": parameters,
                "networks_per_image": networks,
                "images_per_s": _rate(n, seconds),
                **({"self_paced_scales": scales} if scales else {}),
            }
        )

    generalist = load_stage(run, run.stage_dir(GENERALIST), new_generalist_model(run))
    gen_scores, targets, gen_seconds = run_model(generalist, "generalist", targets=True)
    targets = verified_targets(targets, samples)
    gen_params = count_parameters(generalist)
    add("generalist", gen_scores, gen_params, 1, gen_seconds)

    specialists = load_specialists(run)
    oracle = np.zeros_like(gen_scores)
    spec_seconds, spec_params = 0.0, 0
    for v, model in enumerate(specialists):
        start, end = run.taxonomy.vertical_ranges[v]
        scores, _, seconds = run_model(model, f"specialist {v}", (start, end))
        oracle[:, start:end] = scores[:, : end - start]
        spec_seconds += seconds
        spec_params += count_parameters(model)
    K = len(specialists)
    add("specialists (oracle-routed)", oracle, spec_params, K, spec_seconds)
    for start, end in run.taxonomy.vertical_ranges:  # the ensemble, in place: gated by the generalist
        oracle[:, start:end] *= gen_scores[:, start:end].max(axis=1, keepdims=True)
    add("specialists (ensemble)", oracle, spec_params + gen_params, K + 1, spec_seconds + gen_seconds)
    del oracle, gen_scores

    for stage in (STUDENT, CONTROL):
        if best_weights(run.stage_dir(stage)).is_file():
            model = load_stage(run, run.stage_dir(stage), new_model(run, stage))
            scores, _, seconds = run_model(model, stage)
            name = "student" if stage == STUDENT else "control (generalist + student's epochs)"
            add(name, scores, count_parameters(model), 1, seconds, output_scales(model, run))
            del scores

    result: dict[str, Any] = {"split": split, "images": n, "models": models}
    by_name = {m["model"]: m for m in models}
    if "student" in by_name:
        g, s, o = by_name["generalist"], by_name["student"], by_name["specialists (oracle-routed)"]
        result["gap_closed"] = {k: gap_closed(s[k], g[k], o[k]) for k in ("mean_per_vertical_AP", "mAP")}
    return result


def gap_closed(student: float, generalist: float, specialists: float) -> float | None:
    """The share of the generalist -> specialists gap the student closed (the paper: 25%)."""
    gap = specialists - generalist
    return (student - generalist) / gap if gap > 0 else None
