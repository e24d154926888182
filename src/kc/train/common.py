"""What the training stages share: the ground-truth loss, validation, and where the student and controls start."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kc.config import SelfPacedConfig, TrainConfig
from kc.cross_entropy import summed_bce
from kc.data.dataset import ImageDataset, collate, dense_targets
from kc.data.samples import Sample
from kc.distributed import resolve_device
from kc.errors import DataError
from kc.evaluate.metrics import average_precision, classification_metrics, verified_targets
from kc.evaluate.predict import predict
from kc.models.classifier import Classifier
from kc.run import Run
from kc.stages import (
    GENERALIST,
    STAGE,
    best_weights,
    file_digest,
    load_specialists,
    load_stage,
    new_generalist_model,
    specialist_dir,
    with_self_paced_scales,
    with_student_head,
)
from kc.train.trainer import LossFn, StepCallback, Trainer, TrainResult, ValidateFn
from kc.train.unlabeled import student_training_samples


def fit_stage(
    run: Run,
    *,
    name: str,
    stage_dir: Path,
    model: nn.Module,
    tcfg: TrainConfig,
    samples: list[Sample],
    loss: LossFn,
    validate: ValidateFn | None,
    seed: int,
    fingerprint: str,
    progress: bool,
    verbose: bool,
    on_step: StepCallback | None,
    scalars: Callable[[nn.Module], dict[str, float]] | None = None,
    lr_multipliers: dict[str, float] | None = None,
) -> TrainResult:
    """Train one stage's `model` on `samples` (augmented and seeded as the run's data settings say) with `tcfg`,
    in `stage_dir`, on the run's device: the one place where a stage's Trainer is made. `fingerprint` names what the
    stage was made from (a resumed checkpoint must match it)."""
    cfg = run.cfg
    train_set = ImageDataset(samples, run.image_root, cfg.data, train=True, seed=seed, decoded=run.decoded)
    trainer = Trainer(
        model,
        tcfg,
        stage_dir,
        train_set,
        loss,
        validate,
        seed=seed,
        device=resolve_device(cfg.device),
        fingerprint=fingerprint,
        num_workers=cfg.data.num_workers,
        progress=progress,
        verbose=verbose,
        on_step=on_step,
        name=name,
        scalars=scalars,
        lr_multipliers=lr_multipliers,
    )
    return trainer.fit()


def sampled_bce(num_classes: int, negatives: int) -> LossFn:
    """Sigmoid cross-entropy over the batch's positive classes plus `negatives` other classes drawn uniformly
    (torch's RNG: resumed runs draw the same), the drawn terms scaled by (all other classes / drawn) so that the loss
    estimates the full one without bias. Memory grows with the classes kept, not the vocabulary (partial FC)."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        device = labels.device
        positive = torch.zeros(num_classes, dtype=torch.bool, device=device)
        positive[labels[labels >= 0]] = True
        others = (~positive).nonzero().flatten()
        drawn = others[torch.randperm(len(others))[:negatives].to(device)]
        classes = torch.cat([positive.nonzero().flatten(), drawn])
        column = torch.full((num_classes + 1,), -1, dtype=torch.long, device=device)
        column[classes] = torch.arange(len(classes), device=device)
        targets = torch.zeros(labels.shape[0], len(classes) + 1, device=device)
        targets.scatter_(1, column[labels.clamp(min=-1)] % (len(classes) + 1), 1.0)  # padding lands in the extra
        weights = torch.ones(len(classes), device=device)
        weights[len(classes) - len(drawn) :] = len(others) / max(1, len(drawn))
        logits = model(batch["images"], classes=classes).float()
        return summed_bce(logits, targets[:, : len(classes)], weights) / logits.shape[0]

    return loss


def ground_truth_loss(kind: str, num_classes: int, sampled_negatives: int | None = None) -> LossFn:
    """bce: sigmoid cross-entropy summed over classes, averaged over images (over sampled classes when
    `sampled_negatives` is set). softmax: cross-entropy."""
    if kind == "bce" and sampled_negatives is not None:
        return sampled_bce(num_classes, sampled_negatives)

    def bce(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["images"]).float()
        targets = dense_targets(batch["labels"], num_classes)
        return summed_bce(logits, targets) / logits.shape[0]

    def softmax(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["images"]).float(), batch["labels"][:, 0])

    return bce if kind == "bce" else softmax


def check_single_label(run: Run) -> None:
    for split, samples in run.splits.items():
        for s in samples:
            if len(s.labels) != 1:
                raise DataError(
                    f"{s.where}: has {len(s.labels)} labels, but loss 'softmax' needs exactly one per image "
                    f"({split} split); use loss: bce for multi-label data"
                )


def validation_fn(
    run: Run, device: torch.device, batch_size: int, activation: str = "sigmoid", classes: tuple[int, int] | None = None
) -> Callable[[nn.Module], dict[str, Any]] | None:
    """Metrics on the val split: over all classes, or (specialists) mAP over the classes [start, end) only."""
    if not run.splits["val"]:
        return None
    if classes is not None and not any(classes[0] <= c < classes[1] for s in run.splits["val"] for c in s.labels):
        return None  # no val image of the vertical: nothing to select on (the last epoch is kept), not a 0.0

    def validate(model: nn.Module) -> dict[str, Any]:
        # A specialist is scored on its vertical's classes alone (its 'other' output dropped): no (N, C) targets.
        first, count = (0, run.taxonomy.num_classes) if classes is None else (classes[0], classes[1] - classes[0])
        scores, targets, _ = predict(
            model,
            run.splits["val"],
            run.image_root,
            run.cfg.data,
            count,
            batch_size=batch_size,
            device=device,
            activation=activation,
            first_class=first,
        )
        targets = verified_targets(targets, run.splits["val"], first)
        if classes is not None:
            ap = average_precision(scores[:, :count], targets)
            scored = ap[~np.isnan(ap)]
            return {"mAP": 100 * float(scored.mean())} if scored.size else {}  # no metric, not a 0.0
        m = classification_metrics(scores, targets, run.taxonomy)
        return {k: v for k, v in m.items() if isinstance(v, (int, float))}

    return validate


@torch.no_grad()
def block_norms(
    run: Run,
    model: Classifier,
    images: int = 1024,
    batch_size: int = 256,
    centred: bool = False,
    samples: list[Sample] | None = None,
    vertical_of_class: list[int] | None = None,
) -> torch.Tensor:
    """Per vertical, the median over `samples` (default the student's training images; up to `images`, evenly
    spread) of the L2 norm of the vertical's block of `model`'s logits: self-paced scales that start there keep
    the typical size of its logits (not their ranking across images, which normalising each image's block
    changes: docs/BENCHMARKS.md, 100K). `vertical_of_class`: the block of each of `model`'s outputs (default the
    taxonomy's verticals; a specialist's: `specialist_blocks`)."""
    samples = student_training_samples(run) if samples is None else samples
    chosen = samples[:: max(1, len(samples) // images)][:images]
    dataset = ImageDataset(chosen, run.image_root, run.cfg.data, train=False, decoded=run.decoded)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    vertical_of_class = torch.tensor(run.taxonomy.vertical_of_class if vertical_of_class is None else vertical_of_class)
    blocks = int(vertical_of_class.max()) + 1
    was_training = model.training
    model.eval()
    norms = []
    for batch in loader:
        logits = model(batch["images"]).float()
        if centred:  # minus each image's block mean, as the centred scales normalise
            sums = torch.zeros(len(logits), blocks).index_add_(1, vertical_of_class, logits)
            sizes = torch.bincount(vertical_of_class, minlength=blocks)
            logits = logits - (sums / sizes)[:, vertical_of_class]
        squares = torch.zeros(len(logits), blocks).index_add_(1, vertical_of_class, logits**2)
        norms.append(squares.sqrt())
    model.train(was_training)
    return torch.cat(norms).median(dim=0).values.clamp_min(1e-3)


def start_from_generalist(run: Run, stage: str) -> Classifier:
    """The student or a control before training: the trained generalist, given the stage's architecture; with
    student.head.init 'specialists', each vertical's blocks then start from its specialist's top layers."""
    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run))
    model = with_student_head(run.cfg.student.head, run.cfg.model, run.taxonomy.vertical_sizes(), generalist)
    if run.cfg.student.head.init == "specialists":
        model.head.copy_from_specialists([s.head for s in load_specialists(run)])
    if not STAGE[stage].scales:
        return model
    sp = run.cfg.student.self_paced
    # measured on the images the stage trains on (the labelled-only control: without the unlabeled ones)
    samples = student_training_samples(run) if STAGE[stage].unlabeled else run.splits["train"]
    return with_measured_scales(run, model, sp, samples, run.taxonomy.vertical_of_class)


def with_measured_scales(
    run: Run, model: Classifier, sp: SelfPacedConfig, samples: list[Sample], vertical_of_class: list[int]
) -> Classifier:
    """`model` about to train, with self-paced scales `sp` over the blocks `vertical_of_class` of its outputs,
    started where `sp` says: at init 'generalist' the median (centred) block norms of `model` on `samples`, so that
    it keeps the typical size of its logits; a running normalisation from those norms too."""
    measured = None
    if sp.init == "generalist" or sp.running:
        measured = block_norms(run, model, centred=sp.centred, samples=samples, vertical_of_class=vertical_of_class)
    init = measured if sp.init == "generalist" else None
    return with_self_paced_scales(sp, vertical_of_class, model, init, measured if sp.running else None)


def start_digests(run: Run) -> str:
    """What the student or control starts from: the generalist's weights and, when blocks start from the
    specialists, theirs."""
    inputs = [best_weights(run.stage_dir(GENERALIST))]
    if run.cfg.student.head.init == "specialists":
        inputs += [best_weights(specialist_dir(run, v)) for v in range(run.taxonomy.num_verticals)]
    return "".join(file_digest(p) for p in inputs)
