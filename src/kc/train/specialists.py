"""Specialists: one per vertical, initialised from the generalist, trained on that vertical's images.

Each specialist keeps the generalist's backbone and hidden layers and the rows of its output layer for the
vertical's classes (optionally plus an 'other' output). Its training set is every training image with a label in
the vertical plus, as all-negative examples, `negatives_per_image` times as many images of other verticals, drawn
once with the run's seed (Hinton et al. 2015 used half and half).

Cross-fitted (specialists.folds K > 1): each vertical gets K specialists, the f-th trained on the training images
outside fold f (`kc.stages.training_fold_of`), so that the soft-target cache can teach every image by one that
never saw it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from kc.cross_entropy import summed_bce
from kc.data.dataset import dense_targets
from kc.data.samples import Sample
from kc.distributed import resolve_device
from kc.errors import KCError
from kc.models.classifier import restrict_outputs
from kc.run import Run
from kc.stages import (
    GENERALIST,
    best_weights,
    file_digest,
    load_stage,
    new_generalist_model,
    specialist_blocks,
    specialist_dir,
    training_fold_of,
)
from kc.train.common import fit_stage, validation_fn, with_measured_scales
from kc.train.trainer import LossFn, TrainResult


def specialist_samples(
    samples: list[Sample],
    start: int,
    end: int,
    negatives_per_image: float,
    seed: int,
    own: np.ndarray | None = None,
) -> list[Sample]:
    """The vertical's images (a label in [start, end)) plus a seeded draw of other images as negatives. `own`: the
    vertical's sample indices, ascending, if already known (`vertical_members`): saves a pass over every sample."""
    if own is None:
        own = np.array([i for i, s in enumerate(samples) if any(start <= c < end for c in s.labels)], dtype=np.int64)
    others = np.setdiff1d(np.arange(len(samples)), own, assume_unique=True)
    count = min(len(others), round(negatives_per_image * len(own)))
    pick = np.random.default_rng([seed, start]).choice(len(others), size=count, replace=False)
    return [samples[i] for i in own] + [samples[i] for i in others[np.sort(pick)]]


def vertical_members(samples: list[Sample], vertical_of_class: list[int], num_verticals: int) -> list[np.ndarray]:
    """Per vertical, the ascending indices of the samples with a label in it: one pass for all specialists (at 1,000
    verticals, a pass per specialist cost more than training it)."""
    members: list[list[int]] = [[] for _ in range(num_verticals)]
    for i, sample in enumerate(samples):
        for v in sorted({vertical_of_class[c] for c in sample.labels}):
            members[v].append(i)
    return [np.array(m, dtype=np.int64) for m in members]


def specialist_loss(start: int, end: int, num_classes: int, other_output: bool) -> LossFn:
    """Sigmoid cross-entropy over the vertical's classes (+ 'other': 1 on images with none of them)."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["images"]).float()
        targets = dense_targets(batch["labels"], end - start, first_class=start)
        if other_output:
            targets = torch.cat([targets, (targets.sum(dim=1, keepdim=True) == 0).float()], dim=1)
        return summed_bce(logits, targets) / logits.shape[0]

    return loss


def vertical_number(run: Run, vertical: str) -> int:
    if vertical not in run.taxonomy.vertical_index:
        known = ", ".join(v.id for v in run.taxonomy.verticals[:20])
        raise KCError(f"--only: '{vertical}' is not a vertical of this run (verticals: {known})")
    return run.taxonomy.vertical_index[vertical]


def fold_training_samples(run: Run, fold: int | None) -> list[Sample]:
    """What a specialist of fold `fold` trains on: the training split without that fold's images (the whole split
    for fold None, without folds)."""
    train = run.splits["train"]
    if fold is None:
        return train
    return [s for s, f in zip(train, training_fold_of(run), strict=True) if f != fold]


def specialist_folds(run: Run) -> list[int | None]:
    """The folds each vertical has a specialist for: [None] without folds, else 0 .. folds-1."""
    folds = run.cfg.specialists.folds
    return [None] if folds == 1 else list(range(folds))


def specialist_training_samples(
    run: Run, vertical: int, fold_samples: list[Sample], own: np.ndarray | None = None
) -> list[Sample]:
    """The images one specialist trains on: `specialist_samples` of its fold's training images (`fold_samples`,
    from `fold_training_samples`, computed once per fold: at 1,000 verticals a pass per specialist costs more
    than training it)."""
    scfg = run.cfg.specialists
    start, end = run.taxonomy.vertical_ranges[vertical]
    return specialist_samples(fold_samples, start, end, scfg.negatives_per_image, scfg.stage_seed(run.cfg.seed), own)


def train_specialist(
    run: Run,
    vertical: int,
    fold: int | None = None,
    *,
    progress: bool = True,
    verbose: bool = True,
    on_step: Callable[[int], None] | None = None,
    own: np.ndarray | None = None,
    fold_samples: list[Sample] | None = None,
) -> TrainResult:
    """One vertical's specialist (of fold `fold`, when cross-fitted); `fold_samples`: the fold's training images
    if already known (`fold_training_samples`), `own` as in `specialist_samples`, indices into them."""
    cfg, scfg = run.cfg, run.cfg.specialists
    start, end = run.taxonomy.vertical_ranges[vertical]
    device = resolve_device(cfg.device)
    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run))
    model = restrict_outputs(generalist, start, end, scfg.other_output)
    fold_samples = fold_samples if fold_samples is not None else fold_training_samples(run, fold)
    samples = specialist_training_samples(run, vertical, fold_samples, own)
    scaled = scfg.self_paced.variant != "none"
    if scaled:
        model = with_measured_scales(run, model, scfg.self_paced, samples, specialist_blocks(run, vertical))
    name = f"specialist {run.taxonomy.verticals[vertical].id}" + ("" if fold is None else f" fold {fold}")
    return fit_stage(
        run,
        name=name,
        stage_dir=specialist_dir(run, vertical, fold),
        model=model,
        tcfg=scfg,
        samples=samples,
        loss=specialist_loss(start, end, run.taxonomy.num_classes, scfg.other_output),
        validate=validation_fn(run, device, scfg.eval_batch_size, classes=(start, end)),
        seed=scfg.stage_seed(cfg.seed) + vertical,
        fingerprint=f"{run.taxonomy.fingerprint()}:{vertical}:"
        + ("" if fold is None else f"fold {fold}/{scfg.folds}:")
        + file_digest(best_weights(run.stage_dir(GENERALIST)))
        + (str(scfg.self_paced.model_dump()) if scaled else ""),  # unchanged for runs without scales
        progress=progress,
        verbose=verbose,
        on_step=on_step,
        scalars=(lambda m: {"gamma": float(m.output_scales.per_vertical_scale()[0])}) if scaled else None,
        lr_multipliers={"output_scales.": scfg.self_paced.lr_multiplier} if scaled else None,
    )


def shard_verticals(run: Run, shard: str) -> list[int]:
    """'I/N' -> the verticals v with v % N == I."""
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise KCError(f"--shard: '{shard}' is not I/N (e.g. 0/4)") from None
    if not 0 <= index < count:
        raise KCError(f"--shard: {shard}: I must lie in [0, N)")
    return [v for v in range(run.taxonomy.num_verticals) if v % count == index]


def train_specialists(
    run: Run,
    only: str | None = None,
    shard: str | None = None,
    *,
    progress: bool = True,
    verbose: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, TrainResult]:
    """Train every vertical's specialist (or one, or a shard of them) in turn; finished ones are skipped, an
    interrupted one resumes."""
    if only is not None:
        verticals = [vertical_number(run, only)]
    elif shard is not None:
        verticals = shard_verticals(run, shard)
    else:
        verticals = list(range(run.taxonomy.num_verticals))
    tax = run.taxonomy
    results = {}
    for fold in specialist_folds(run):
        fold_samples = fold_training_samples(run, fold)
        members = vertical_members(fold_samples, tax.vertical_of_class, tax.num_verticals)
        for v in verticals:
            key = tax.verticals[v].id + ("" if fold is None else f"/fold_{fold}")
            kw = {"progress": progress, "verbose": verbose, "on_step": on_step, "own": members[v]}
            kw["fold_samples"] = fold_samples
            results[key] = train_specialist(run, v, fold, **kw)
    return results
