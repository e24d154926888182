"""The student's loss: sigmoid cross-entropy against the teachers' soft targets, optionally mixed with the truth.

Summed over classes and averaged over images, like the ground-truth loss. Each class's term is multiplied by its
vertical's weight (`vertical_weights`, equal here), the interface through which pacing strategies plug in. The
modes are defined as cross-entropy terms (`loss_terms`; `sparse_loss_terms` the same for the sampled loss's blocks,
whose targets are sparse), summed over their entries in a few passes (`kc.cross_entropy`); `entry_losses` gives their
values entry by entry, as torch's own cross-entropy computes them (the reference in tests and benchmarks).
"""

from __future__ import annotations

from typing import Any

import torch

from kc.cross_entropy import SparseTerm, Term, entry_values, summed_terms
from kc.distill.targets import SoftTargets


def loss_terms(
    targets: torch.Tensor,
    truth: torch.Tensor,
    distill_weight: torch.Tensor | float,
    *,
    mode: str = "none",
    truth_weight: float = 0.5,
    temperature: float = 1.0,
    has_truth: torch.Tensor | None = None,
) -> dict[str, Term]:
    """The loss's named terms: `distillation` (weighted by `distill_weight`) and, in mode weighted, `ground_truth`.

    mode none: targets z* (the paper); max: targets max(y, z*); weighted: (1-w) KD + w GT. `has_truth` (rows, 1)
    bool: which rows' `truth` is a label; the others (unlabeled images, whose label is only the generalist's guess
    that routes them to a teacher) learn the soft targets alone, as in mode none. None: every row's is."""
    if mode == "max":
        raised = torch.maximum(targets, truth)
        targets = raised if has_truth is None else torch.where(has_truth, raised, targets)
    if mode != "weighted":
        return {"distillation": Term(distill_weight, targets, temperature)}
    distill_share, truth_share = weighted_shares(truth_weight, has_truth)
    return {
        "distillation": Term(distill_share * distill_weight, targets, temperature),
        "ground_truth": Term(truth_share, truth),
    }


def sparse_loss_terms(
    target_columns: torch.Tensor,
    target_values: torch.Tensor,
    truth_columns: torch.Tensor,
    distill_weight: torch.Tensor,
    *,
    mode: str = "none",
    truth_weight: float = 0.5,
    temperature: float = 1.0,
    has_truth: torch.Tensor | None = None,
) -> dict[str, SparseTerm]:
    """`loss_terms` for rows whose targets are sparse (the sampled loss's blocks): the soft targets' `target_columns`
    and `target_values` (P, K) and the labels' `truth_columns` (P, L), -1 where none, one `distill_weight` and
    `has_truth` a row (P,). The same terms, entry for entry."""
    labels = (truth_columns >= 0).float()
    if mode == "max":
        # max(z, y) is z but at the labels, where y = 1: there, add 1 - z (z: the soft target, 0 if not kept)
        same = (truth_columns.unsqueeze(2) == target_columns.unsqueeze(1)) & (target_columns.unsqueeze(1) >= 0)
        raised = labels * (1 - (same * target_values.unsqueeze(1)).sum(dim=2))
        if has_truth is not None:
            raised = raised * has_truth.unsqueeze(1)
        columns = torch.cat([target_columns, truth_columns], dim=1)
        return {"distillation": SparseTerm(distill_weight, columns, torch.cat([target_values, raised], 1), temperature)}
    if mode != "weighted":
        return {"distillation": SparseTerm(distill_weight, target_columns, target_values, temperature)}
    distill_share, truth_share = weighted_shares(truth_weight, has_truth)
    return {
        "distillation": SparseTerm(distill_share * distill_weight, target_columns, target_values, temperature),
        "ground_truth": SparseTerm(truth_share * torch.ones_like(distill_weight), truth_columns, labels),
    }


def weighted_shares(
    truth_weight: float, has_truth: torch.Tensor | None
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Mode weighted's shares of the distillation and of the truth: 1 - w and w where the label is truth, 1 and 0
    where it is not (`has_truth` False: an unlabeled image); None: every label is truth."""
    if has_truth is None:
        return 1 - truth_weight, truth_weight
    return torch.where(has_truth, 1 - truth_weight, 1.0), truth_weight * has_truth.float()


def entry_losses(logits: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """The loss of each (image, class) entry, by named term (`loss_terms`' arguments after the logits)."""
    return {name: entry_values(logits, term) for name, term in loss_terms(*args, **kwargs).items()}


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
    """The loss over every class (the paper's), by named term: `loss_terms` summed, averaged over images.
    `has_truth` (B,) bool: which images' labels are truth (`loss_terms`)."""
    logits = student_logits.float()
    terms = loss_terms(
        soft.values,
        ground_truth,
        distillation_weights(soft, vertical_of_class, vertical_weights),
        mode=mode,
        truth_weight=truth_weight,
        temperature=temperature,
        has_truth=None if has_truth is None else has_truth.unsqueeze(1),
    )
    return {name: total / logits.shape[0] for name, total in summed_terms(logits, terms).items()}


def distillation_weights(
    soft: SoftTargets, vertical_of_class: torch.Tensor, vertical_weights: torch.Tensor
) -> torch.Tensor | float:
    """Each entry's weight in the distillation term: its vertical's weight where its target is defined, 0
    elsewhere. Kept as small as it is (a number, or one per class) so the sums need no (B, C) product."""
    if not bool(soft.defined.all()):  # unselected: ignore
        return vertical_weights[vertical_of_class].unsqueeze(0) * soft.defined
    if bool((vertical_weights == 1).all()):
        return 1.0
    return vertical_weights[vertical_of_class].unsqueeze(0)


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
