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
) -> dict[str, torch.Tensor]:
    """The loss of each (image, class) entry, by named term: `distillation` (times `distill_weight`) and, in mode
    weighted, `ground_truth`; the loss is their sum.

    mode none: targets z* (the paper); max: targets max(y, z*); weighted: (1-w) KD + w GT."""
    t = temperature
    distill_targets = torch.maximum(targets, truth) if mode == "max" else targets
    terms = F.binary_cross_entropy_with_logits(logits / t, distill_targets, reduction="none") * (t * t)
    terms = terms * distill_weight
    if mode != "weighted":
        return {"distillation": terms}
    truth_terms = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    return {"distillation": (1 - truth_weight) * terms, "ground_truth": truth_weight * truth_terms}


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
) -> dict[str, torch.Tensor]:
    """The loss over every class (the paper's), by named term: `entry_losses` summed, averaged over images."""
    logits = student_logits.float()
    weights = vertical_weights[vertical_of_class].unsqueeze(0) * soft.defined
    terms = entry_losses(
        logits, soft.values, ground_truth, weights, mode=mode, truth_weight=truth_weight, temperature=temperature
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
