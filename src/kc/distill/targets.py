"""Soft targets for the student, as the paper builds them.

For each image, the verticals of its ground-truth labels select its teachers. Teacher v gives probabilities
sigma(t / T) over v's classes; the top K are kept and the rest set to 0. Classes of verticals no teacher was
selected for get target 0 (``unselected: zero``, the paper), or carry no distillation loss at all
(``unselected: ignore``): `SoftTargets.defined` says which entries the loss may use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kc.taxonomy import Taxonomy


@dataclass
class SoftTargets:
    values: torch.Tensor  # (B, C) target probabilities, 0 outside the kept top-K of selected teachers
    defined: torch.Tensor  # (B, C) bool: entries the distillation loss is computed on
    selected: torch.Tensor  # (B, V) bool: the teachers each image was taught by


def selected_verticals(labels: torch.Tensor, vertical_of_class: torch.Tensor, num_verticals: int) -> torch.Tensor:
    """(B, L) padded label indices -> (B, V) bool: the verticals of each image's labels."""
    selected = torch.zeros(labels.shape[0], num_verticals + 1, dtype=torch.bool, device=labels.device)
    verticals = torch.where(labels >= 0, vertical_of_class[labels.clamp(min=0)], num_verticals)
    selected.scatter_(1, verticals, True)
    return selected[:, :num_verticals]


def keep_top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest entries of each row."""
    if k >= probs.shape[1]:
        return probs
    top = probs.topk(k, dim=1)
    return torch.zeros_like(probs).scatter_(1, top.indices, top.values)


class OnlineTeachers:
    """The specialists, frozen in eval mode, run on the images that select them (one batched pass per teacher)."""

    def __init__(
        self, teachers: list[nn.Module], taxonomy: Taxonomy, top_k: int, temperature: float, unselected: str = "zero"
    ):
        if len(teachers) != taxonomy.num_verticals:
            raise ValueError(f"{len(teachers)} teachers for {taxonomy.num_verticals} verticals")
        self.teachers = teachers
        for t in teachers:
            t.eval().requires_grad_(False)
        self.ranges = taxonomy.vertical_ranges
        self.vertical_of_class = torch.tensor(taxonomy.vertical_of_class)
        self.num_classes = taxonomy.num_classes
        self.top_k = top_k
        self.temperature = temperature
        self.unselected = unselected

    def to(self, device: torch.device) -> OnlineTeachers:
        self.teachers = [t.to(device) for t in self.teachers]
        self.vertical_of_class = self.vertical_of_class.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor | None = None
    ) -> SoftTargets:
        selected = selected_verticals(labels, self.vertical_of_class, len(self.teachers))
        values = torch.zeros(images.shape[0], self.num_classes, device=images.device)
        for v in selected.any(dim=0).nonzero().flatten().tolist():
            rows = selected[:, v].nonzero().flatten()
            start, end = self.ranges[v]
            logits = self.teachers[v](images[rows]).float()[:, : end - start]  # an 'other' output is not a class
            values[rows, start:end] = keep_top_k(torch.sigmoid(logits / self.temperature), self.top_k)
        if self.unselected == "zero":
            defined = torch.ones_like(values, dtype=torch.bool)
        else:
            defined = selected[:, self.vertical_of_class]
        return SoftTargets(values, defined, selected)
