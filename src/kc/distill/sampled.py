"""The student's loss over sampled verticals (`student.sampled_verticals`): its cost follows the verticals a step
touches, not the vocabulary.

The full loss (`distillation_loss`) sums, for every image, a term per class. Split by vertical, an image's terms on
the verticals its labels select carry its soft targets (and its truth); on every other vertical they are the loss of
target 0 (`unselected: zero`; `ignore` and the truth of `weighted` likewise see only 0 there). This loss keeps each
image's own verticals whole and, for the others, draws m of the M verticals uniformly per step, shared by the batch:
an image's terms on drawn verticals it does not select are scaled by M / m. Each vertical is drawn with probability
m / M, so the loss is an unbiased estimate of the full one, and with m >= M it is the full loss exactly.

Whole verticals, not single classes, are drawn because the self-paced scales normalise each vertical's block of
logits: with whole blocks they are computed exactly as over every class. The model computes only those logits
(`ClassSubset`): B x (classes of the drawn verticals) plus, per image, its own verticals' classes, in groups of
verticals of similar size, each padded to its own widest (`width_groups`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kc.cross_entropy import summed_sparse_terms
from kc.distill.loss import sparse_loss_terms, sum_terms
from kc.distill.targets import Teachers
from kc.models.classifier import ClassSubset
from kc.models.heads import ClassBlocks


class SampledVerticalsLoss:
    """The loss function (model, batch) -> loss of `student.sampled_verticals` (see the module's docstring)."""

    def __init__(
        self,
        teachers: Teachers,
        vertical_weights: torch.Tensor,
        drawn: int,
        *,
        mode: str,
        truth_weight: float,
        temperature: float,
        unselected: str,
        labelled_images: int | None = None,
        max_padding: float = 0.2,
    ):
        """`labelled_images`: training indices from this one on are unlabeled images, whose label only routes them
        to a teacher and is not truth (`loss_terms`' has_truth); None: every image's label is truth.
        `max_padding`: the most of a row of an image's own vertical that may be padding (`width_groups`); 1 pads
        every row to the largest vertical in the batch."""
        self.teachers = teachers
        self.labelled_images = labelled_images
        self.vertical_weights = vertical_weights
        self.num_verticals = teachers.num_verticals
        # Verticals an image does not select only add terms of target 0: the distillation's (unselected: zero) or
        # the truth's (weighted). Where neither applies there is nothing to draw.
        self.negative_distill = 1.0 if unselected == "zero" else 0.0
        negatives_count = unselected == "zero" or mode == "weighted"
        self.drawn = min(drawn, self.num_verticals) if negatives_count else 0
        self.options = {"mode": mode, "truth_weight": truth_weight, "temperature": temperature}
        groups = width_groups(teachers.vertical_sizes, max_padding)
        self.vertical_group, self.num_groups = torch.tensor(groups, dtype=torch.long), max(groups, default=-1) + 1

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum_terms(self.terms(model, batch))

    def terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss by named term (`loss_terms`'), each averaged over images."""
        images, labels = batch["images"], batch["labels"]
        t = self.teachers
        device = labels.device
        targets = t.blocks(images, labels, batch["index"])
        groups = self._pair_groups(targets.verticals)
        # Drawn verticals, whole: torch's RNG, so a resumed run draws the same.
        drawn = torch.randperm(self.num_verticals)[: self.drawn].to(device)
        sizes = t.sizes[drawn]
        column_vertical = torch.repeat_interleave(drawn, sizes)
        first_column = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)  # each column's block start
        columns = t.starts[column_vertical] + torch.arange(len(column_vertical), device=device) - first_column
        blocks = [ClassBlocks(targets.rows[pairs], self._block_classes(targets.verticals[pairs])) for pairs in groups]
        column_logits, block_logits = model(images, classes=ClassSubset(columns, blocks))
        has_truth = None if self.labelled_images is None else batch["index"].to(device) < self.labelled_images

        truth = self._truth_columns(labels, targets.rows, targets.verticals)
        terms = {}
        for pairs, block, logits in zip(groups, blocks, block_logits, strict=True):
            verticals = targets.verticals[pairs]
            own = sparse_loss_terms(
                targets.classes[pairs],
                targets.values[pairs],
                truth[pairs],
                self.vertical_weights[verticals],
                **self.options,
                has_truth=None if has_truth is None else has_truth[block.rows],
            )
            # The softplus part per row over the vertical's classes (padding left out), the targets' few entries
            # apart (kc.cross_entropy): no dense target or weight is formed.
            for name, value in summed_sparse_terms(logits.float(), t.sizes[verticals], own).items():
                terms[name] = terms[name] + value if name in terms else value
        if len(columns):
            slot = torch.repeat_interleave(torch.arange(len(drawn), device=device), sizes)  # column -> drawn vertical
            drawn_terms = self._drawn_terms(
                column_logits.float(), targets.selected[:, drawn], slot, column_vertical, has_truth
            )
            for name, value in drawn_terms.items():
                terms[name] = terms[name] + value if name in terms else value
        return {name: value / labels.shape[0] for name, value in terms.items()}

    def _pair_groups(self, verticals: torch.Tensor) -> list[torch.Tensor]:
        """The (image, vertical) pairs (indices into `verticals`, ascending) in groups of verticals of similar
        size (`width_groups`), each group padded to its own widest vertical: at 100K classes in 20 verticals,
        padding every pair to the largest vertical (14,362 classes) made 43% of the loss's entries padding."""
        group = self.vertical_group.to(verticals.device)[verticals]
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=self.num_groups).tolist()
        return [pairs for pairs in order.split(counts) if len(pairs)]

    def _block_classes(self, verticals: torch.Tensor) -> torch.Tensor:
        """(P, S): each pair's vertical's classes in order, -1 beyond its size, S the largest of them."""
        t = self.teachers
        sizes = t.sizes[verticals]
        offsets = torch.arange(int(sizes.max()), device=verticals.device)
        return torch.where(offsets < sizes.unsqueeze(1), t.starts[verticals].unsqueeze(1) + offsets, -1)

    def _drawn_terms(
        self,
        logits: torch.Tensor,
        own: torch.Tensor,
        slot: torch.Tensor,
        column_vertical: torch.Tensor,
        has_truth: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """`entry_losses` over the drawn columns (B, K), scaled by M / m, for the images that do not select a column's
        vertical (`own` (B, m): which images select which drawn vertical; `slot` (K,): each column's drawn vertical).
        Every target there is 0 and BCE(x, 0) = softplus(x): each term is softplus summed over all images, less the
        few (image, drawn vertical) pairs an image selects, then weighted per column. At 100K classes these columns
        are most of the student's step, and this is a few passes over them, not one per operation of the general
        loss and its (B, K) mask. `has_truth` (B,): in mode weighted, images without truth (unlabeled) weigh their
        distillation fully and have no truth term."""
        mode, t, w = self.options["mode"], self.options["temperature"], self.options["truth_weight"]
        image, selected_slot = own.nonzero(as_tuple=True)  # few: a drawn vertical is rarely an image's own
        inside = (slot.unsqueeze(0) == selected_slot.unsqueeze(1)).to(logits.dtype)  # (n, K)

        def per_column(x: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
            """(K, J): softplus(x) summed over the images that do not select the column, once per column of
            `row_weights` (B, J), each image weighted by it: a matrix product, which forms no (B, K) product."""
            selected = (F.softplus(x[image]) * inside).t() @ row_weights[image]
            return F.softplus(x).t() @ row_weights - selected

        scale = self.num_verticals / self.drawn
        column_weights = self.vertical_weights[column_vertical]
        scaled = logits / t if t != 1.0 else logits
        if mode == "weighted" and has_truth is not None:  # a share per image: (1 - w) with truth, 1 without
            rows = torch.stack([torch.where(has_truth, 1 - w, 1.0), has_truth.to(logits.dtype)], dim=1)
            if t == 1.0:  # both terms over one softplus
                distilled, truth = per_column(logits, rows).unbind(1)
            else:
                distilled, truth = per_column(scaled, rows[:, :1])[:, 0], per_column(logits, rows[:, 1:])[:, 0]
            distill = (distilled * column_weights).sum() * (t * t) * self.negative_distill
            return {"distillation": distill * scale, "ground_truth": w * truth.sum() * scale}
        ones = logits.new_ones(logits.shape[0], 1)
        distilled = per_column(scaled, ones)[:, 0]
        distill = (distilled * column_weights).sum() * (t * t) * self.negative_distill
        terms = {"distillation": distill * (1 - w if mode == "weighted" else 1.0) * scale}
        if mode == "weighted":
            truth = distilled.sum() if t == 1.0 else per_column(logits, ones)[:, 0].sum()
            terms["ground_truth"] = w * truth * scale
        return terms

    def _truth_columns(self, labels: torch.Tensor, rows: torch.Tensor, verticals: torch.Tensor) -> torch.Tensor:
        """(P, L): the classes (within the pair's vertical) that the pair's image has as labels, -1 beyond. The
        pairs are every image's selected verticals, in ascending (row, vertical) order (`Teachers.pairs`)."""
        t = self.teachers
        image, slot = (labels >= 0).nonzero(as_tuple=True)
        classes = labels[image, slot]
        vertical = t.vertical_of_class[classes]
        # Each label's pair, found by its key; a label given twice counts once.
        pair = torch.searchsorted(rows * self.num_verticals + verticals, image * self.num_verticals + vertical)
        entries = torch.unique(pair * t.num_classes + classes - t.starts[vertical])  # sorted by pair
        pair, column = entries // t.num_classes, entries % t.num_classes
        counts = torch.bincount(pair, minlength=len(rows))
        place = torch.arange(len(entries), device=labels.device) - (torch.cumsum(counts, 0) - counts)[pair]
        columns = torch.full((len(rows), int(counts.max()) if len(entries) else 0), -1, device=labels.device)
        columns[pair, place] = column
        return columns


def width_groups(sizes: list[int], max_padding: float = 0.2) -> list[int]:
    """Each vertical's group, for padding rows of a vertical's classes to a common width: verticals taken from the
    largest down, a new group begins with the first narrower than (1 - max_padding) of its group's widest, so no
    row is more than `max_padding` padding. About log(largest / smallest) / log(1 / (1 - max_padding)) groups."""
    group, widest = [0] * len(sizes), None
    count = 0
    for v in sorted(range(len(sizes)), key=lambda v: -sizes[v]):
        if widest is None or sizes[v] < (1 - max_padding) * widest:
            widest, count = sizes[v], count + 1
        group[v] = count - 1
    return group
