"""The student's loss: sigmoid cross-entropy against the teachers' soft targets, optionally mixed with the truth.

Summed over classes and averaged over images, like the ground-truth loss. Each class's term is multiplied by its
vertical's weight (`vertical_weights`, equal here), the interface through which pacing strategies plug in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kc.distill.targets import SoftTargets


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
    """mode none: targets z* (the paper); max: targets max(y, z*); weighted: (1-w) KD + w GT."""
    logits = student_logits.float()
    targets = torch.maximum(soft.values, ground_truth) if mode == "max" else soft.values
    t = temperature
    per_entry = F.binary_cross_entropy_with_logits(logits / t, targets, reduction="none") * (t * t)
    weights = vertical_weights[vertical_of_class].unsqueeze(0) * soft.defined
    loss = (per_entry * weights).sum() / logits.shape[0]
    if mode == "weighted":
        truth = F.binary_cross_entropy_with_logits(logits, ground_truth, reduction="sum") / logits.shape[0]
        loss = (1 - truth_weight) * loss + truth_weight * truth
    return loss
