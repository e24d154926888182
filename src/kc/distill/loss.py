"""The student's loss: sigmoid cross-entropy against the teachers' soft targets, optionally mixed with the truth.

Summed over classes and averaged over images, like the ground-truth loss. Each class's term is multiplied by its
vertical's weight (`vertical_weights`, equal here), the interface through which pacing strategies plug in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kc.distill.targets import SoftTargets


def entry_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    truth: torch.Tensor,
    distill_weight: torch.Tensor,
    *,
    mode: str = "none",
    truth_weight: float = 0.5,
    temperature: float = 1.0,
    has_truth: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The loss of each (image, class) entry, by named term: `distillation` (times `distill_weight`) and, in mode
    weighted, `ground_truth`; the loss is their sum.

    mode none: targets z* (the paper); max: targets max(y, z*); weighted: (1-w) KD + w GT. `has_truth` (rows, 1)
    bool: which rows' `truth` is a label; the others (unlabeled images, whose label is only the generalist's guess
    that routes them to a teacher) learn the soft targets alone, as in mode none. None: every row's is."""
    t = temperature
    if mode == "max":
        raised = torch.maximum(targets, truth)
        distill_targets = raised if has_truth is None else torch.where(has_truth, raised, targets)
    else:
        distill_targets = targets
    terms = F.binary_cross_entropy_with_logits(logits / t, distill_targets, reduction="none") * (t * t)
    terms = terms * distill_weight
    if mode != "weighted":
        return {"distillation": terms}
    truth_terms = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    if has_truth is None:
        return {"distillation": (1 - truth_weight) * terms, "ground_truth": truth_weight * truth_terms}
    distill_share = torch.where(has_truth, 1 - truth_weight, 1.0)
    return {"distillation": distill_share * terms, "ground_truth": truth_weight * has_truth * truth_terms}


def distillation_terms(
    student_logits: torch.Tensor,
    soft: SoftTargets,
    ground_truth: torch.Tensor,
    vertical_of_class: torch.Tensor,
    vertical_weights: torch.Tensor,
    *,
    mode: str = "max",
    truth_weight: float = 0.5,
    temperature: float = 1.0,
    has_truth: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The loss over every class (the paper's), by named term: `entry_losses` summed, averaged over images.
    `has_truth` (B,) bool: which images' labels are truth (`entry_losses`)."""
    logits = student_logits.float()
    weights = vertical_weights[vertical_of_class].unsqueeze(0) * soft.defined
    terms = entry_losses(
        logits,
        soft.values,
        ground_truth,
        weights,
        mode=mode,
        truth_weight=truth_weight,
        temperature=temperature,
        has_truth=None if has_truth is None else has_truth.unsqueeze(1),
    )
    return {name: entries.sum() / logits.shape[0] for name, entries in terms.items()}


def distillation_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
    """`distillation_terms` summed: the loss as one number."""
    return sum_terms(distillation_terms(*args, **kwargs))


def sum_terms(loss: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss given as named terms, summed (a loss given as one tensor, as it is)."""
    if not isinstance(loss, dict):
        return loss
    total = torch.zeros((), device=next(iter(loss.values())).device)
    for value in loss.values():
        total = total + value
    return total
