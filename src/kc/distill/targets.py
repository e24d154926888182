"""Soft targets for the student, as the paper builds them.

For each image, the verticals of its ground-truth labels select its teachers. Teacher v gives probabilities
sigma(t / T) over v's classes; the top K are kept and the rest set to 0. Classes of verticals no teacher was
selected for get target 0 (``unselected: zero``, the paper), or carry no distillation loss at all
(``unselected: ignore``): `SoftTargets.defined` says which entries the loss may use.

Teachers give their targets as `BlockTargets`, one row per (image, selected vertical) pair holding the K classes
of that vertical it keeps and their targets (sparse, as the cache stores them): what the sampled student loss
reads. `SoftTargets` spreads them over every class (the full loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kc.models.classifier import ClassSubset
from kc.models.heads import ClassBlocks
from kc.taxonomy import Taxonomy


@dataclass
class SoftTargets:
    values: torch.Tensor  # (B, C) target probabilities, 0 outside the kept top-K of selected teachers
    defined: torch.Tensor  # (B, C) bool: entries the distillation loss is computed on
    selected: torch.Tensor  # (B, V) bool: the teachers each image was taught by


@dataclass
class BlockTargets:
    rows: torch.Tensor  # (P,) the image of each (image, selected vertical) pair, ascending
    verticals: torch.Tensor  # (P,) the pair's vertical, ascending within an image
    classes: torch.Tensor  # (P, K) long: the classes kept (top K), as indices within the vertical; -1: none
    values: torch.Tensor  # (P, K) their target probabilities; 0 where the class is -1 (every other class: 0)
    selected: torch.Tensor  # (B, V) bool: the teachers each image was taught by


def selected_verticals(labels: torch.Tensor, vertical_of_class: torch.Tensor, num_verticals: int) -> torch.Tensor:
    """(B, L) padded label indices -> (B, V) bool: the verticals of each image's labels."""
    selected = torch.zeros(labels.shape[0], num_verticals + 1, dtype=torch.bool, device=labels.device)
    verticals = torch.where(labels >= 0, vertical_of_class[labels.clamp(min=0)], num_verticals)
    selected.scatter_(1, verticals, True)
    return selected[:, :num_verticals]


def top_k_entries(probs: torch.Tensor, k: int, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of `probs` (P, S) among its first `sizes` (P,) (the rest is padding):
    their indices, -1 where a row has fewer than k, and their values, 0 there."""
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    kept = top.indices < sizes.unsqueeze(1)
    return torch.where(kept, top.indices, -1), torch.where(kept, top.values, 0.0)


class Teachers:
    """What the online and the cached teachers share: the taxonomy's layout and the targets' settings. A subclass
    fills `blocks(images, labels, sample_index)`; calling the teachers gives dense `SoftTargets`."""

    def __init__(self, taxonomy: Taxonomy, top_k: int, temperature: float, unselected: str = "zero"):
        self.num_classes, self.num_verticals = taxonomy.num_classes, taxonomy.num_verticals
        self.starts = torch.tensor([a for a, _ in taxonomy.vertical_ranges], dtype=torch.long)
        self.vertical_sizes = taxonomy.vertical_sizes()
        self.sizes = torch.tensor(self.vertical_sizes, dtype=torch.long)
        self.vertical_of_class = torch.tensor(taxonomy.vertical_of_class, dtype=torch.long)
        self.top_k, self.temperature, self.unselected = top_k, temperature, unselected

    def to(self, device: torch.device) -> Teachers:
        self.starts, self.sizes = self.starts.to(device), self.sizes.to(device)
        self.vertical_of_class = self.vertical_of_class.to(device)
        return self

    def pairs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """selected (B, V), the pairs' rows and verticals (P,), and S, the width of their targets (the largest
        selected vertical)."""
        selected = selected_verticals(labels, self.vertical_of_class, self.num_verticals)
        rows, verticals = selected.nonzero(as_tuple=True)
        width = int(self.sizes[verticals].max()) if len(verticals) else 0
        return selected, rows, verticals, width

    def blocks(
        self, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor | None = None
    ) -> BlockTargets:
        raise NotImplementedError

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor | None = None
    ) -> SoftTargets:
        blocks = self.blocks(images, labels, sample_index)
        values = torch.zeros(labels.shape[0], self.num_classes, device=labels.device)
        kept = blocks.classes >= 0
        columns = self.starts[blocks.verticals].unsqueeze(1) + blocks.classes
        rows = blocks.rows.unsqueeze(1).expand_as(columns)
        values[rows[kept], columns[kept]] = blocks.values[kept]
        if self.unselected == "zero":
            defined = torch.ones_like(values, dtype=torch.bool)
        else:
            defined = blocks.selected[:, self.vertical_of_class]
        return SoftTargets(values, defined, blocks.selected)


class OnlineTeachers(Teachers):
    """The specialists, frozen in eval mode, run on the images that select them (one batched pass per teacher)."""

    def __init__(
        self, teachers: list[nn.Module], taxonomy: Taxonomy, top_k: int, temperature: float, unselected: str = "zero"
    ):
        if len(teachers) != taxonomy.num_verticals:
            raise ValueError(f"{len(teachers)} teachers for {taxonomy.num_verticals} verticals")
        super().__init__(taxonomy, top_k, temperature, unselected)
        self.teachers = teachers
        for t in teachers:
            t.eval().requires_grad_(False)

    def to(self, device: torch.device) -> OnlineTeachers:
        super().to(device)
        self.teachers = [t.to(device) for t in self.teachers]
        return self

    @torch.no_grad()
    def blocks(
        self, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor | None = None
    ) -> BlockTargets:
        selected, rows, verticals, width = self.pairs(labels)
        k = min(self.top_k, width)
        classes = torch.full((len(rows), k), -1, dtype=torch.long, device=labels.device)
        values = torch.zeros(len(rows), k, device=labels.device)
        for v in verticals.unique().tolist():
            pairs = (verticals == v).nonzero().flatten()
            size = self.vertical_sizes[v]
            logits = self.teachers[v](images[rows[pairs]]).float()[:, :size]  # an 'other' output is not a class
            top = torch.sigmoid(logits / self.temperature).topk(min(k, size), dim=1)
            classes[pairs, : top.indices.shape[1]] = top.indices
            values[pairs, : top.values.shape[1]] = top.values
        return BlockTargets(rows, verticals, classes, values, selected)


class GeneralistTeacher(Teachers):
    """One network over every class (the generalist) as the teacher of every vertical: each (image, selected
    vertical) pair gets the top K of that network's own probabilities on the vertical's classes. The
    self-distillation control: the student's recipe without what the specialists know."""

    def __init__(
        self, teacher: nn.Module, taxonomy: Taxonomy, top_k: int, temperature: float, unselected: str = "zero"
    ):
        super().__init__(taxonomy, top_k, temperature, unselected)
        self.teacher = teacher.eval().requires_grad_(False)

    def to(self, device: torch.device) -> GeneralistTeacher:
        super().to(device)
        self.teacher = self.teacher.to(device)
        return self

    @torch.no_grad()
    def blocks(
        self, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor | None = None
    ) -> BlockTargets:
        selected, rows, verticals, width = self.pairs(labels)
        if not len(rows):
            none = torch.zeros(0, 0, device=labels.device)
            return BlockTargets(rows, verticals, none.long(), none, selected)
        offsets = torch.arange(width, device=labels.device)
        sizes = self.sizes[verticals]
        inside = offsets < sizes.unsqueeze(1)
        classes = torch.where(inside, self.starts[verticals].unsqueeze(1) + offsets, -1)
        # The teacher computes each pair's vertical alone: at 100K classes, a twelfth of all its logits.
        _, (logits,) = self.teacher(images, classes=ClassSubset(classes.new_zeros(0), [ClassBlocks(rows, classes)]))
        block = torch.where(inside, torch.sigmoid(logits.float() / self.temperature), 0.0)
        return BlockTargets(rows, verticals, *top_k_entries(block, self.top_k, sizes), selected)
