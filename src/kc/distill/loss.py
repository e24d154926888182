"""The student's loss: sigmoid cross-entropy against the teachers' soft targets, optionally mixed with the truth.

Summed over classes and averaged over images, like the ground-truth loss. Each class's term is multiplied by its
vertical's weight (`vertical_weights`, equal here), the interface through which pacing strategies plug in.
"""

from __future__ import annotations

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
) -> torch.Tensor:
    """The loss of each (image, class) entry: the distillation term (times `distill_weight`) mixed with the truth.

    mode none: targets z* (the paper); max: targets max(y, z*); weighted: (1-w) KD + w GT."""
    t = temperature
    distill_targets = torch.maximum(targets, truth) if mode == "max" else targets
    terms = F.binary_cross_entropy_with_logits(logits / t, distill_targets, reduction="none") * (t * t)
    terms = terms * distill_weight
    if mode == "weighted":
        truth_terms = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
        terms = (1 - truth_weight) * terms + truth_weight * truth_terms
    return terms


def distillation_loss(
    student_logits: torch.Tensor,
    soft: SoftTargets,
    ground_truth: torch.Tensor,
    vertical_of_class: torch.Tensor,
    vertical_weights: torch.Tensor,
    *,
    mode: str = "max",
    truth_weight: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The loss over every class (the paper's): `entry_losses` summed, averaged over images."""
    logits = student_logits.float()
    weights = vertical_weights[vertical_of_class].unsqueeze(0) * soft.defined
    terms = entry_losses(
        logits, soft.values, ground_truth, weights, mode=mode, truth_weight=truth_weight, temperature=temperature
    )
    return terms.sum() / logits.shape[0]
