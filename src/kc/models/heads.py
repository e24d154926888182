"""Classification heads over a backbone feature vector.

`DenseHead` is the paper's generalist head: FC(s1)-FC(s2) (each Linear-ReLU; Linear-LeakyReLU as an option) then
the output layer over all classes (FC4096-FC512 on Inception-V2 in the paper). Other heads (structurally connected)
plug in beside it: a head maps (B, in_features) -> (B, num_classes) logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.01  # model.head.activation leaky_relu: PyTorch's default negative slope

# Verticals with at least this many classes get their own matmul on views of the weights (no copy); smaller ones
# are bucketed (StructuredHead) or their weight rows gathered (DenseHead.subset_logits). Measured
# (docs/BENCHMARKS.md): at 100K classes in 20 verticals the views make the FC-SC head 1.4x the dense head instead of
# 4x; for hundreds of verticals of ~140 classes, buckets are 2.5x faster than a matmul each.
OWN_MATMUL_CLASSES = 512


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The index that puts values gathered in `order` back in their original places."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


@dataclass
class ClassBlocks:
    """Logits a sampled loss needs per (image, vertical) pair: for image `rows[p]`, the classes `classes[p]` of
    one vertical in order, padded with -1 to the width S of the group (a sampled loss pads each group of pairs to
    its own widest vertical, not to the largest vertical of all). The classifier sets padding's logits to 0."""

    rows: torch.Tensor  # (P,)
    classes: torch.Tensor  # (P, S)


def hidden_activation(name: str, inplace: bool = True) -> nn.Module:
    """The hidden layers' nonlinearity (`model.head.activation`)."""
    if name == "relu":
        return nn.ReLU(inplace=inplace)
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE, inplace=inplace)
    raise ValueError(f"head activation '{name}' is not relu or leaky_relu")


class DenseHead(nn.Module):
    def __init__(
        self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0, activation: str = "relu"
    ):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for width in hidden:
            layers += [nn.Linear(prev, width), hidden_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = width
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(prev, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(features))

    def class_logits(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of `classes` (K,) alone: only those rows of the output layer are computed."""
        return F.linear(self.hidden(features), self.out.weight[classes], self.out.bias[classes])

    def subset_logits(
        self, features: torch.Tensor, columns: torch.Tensor, blocks: list[ClassBlocks]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, K) logits of `columns` for every image and, per group of `blocks`, (P, S) logits of its classes
        (padding: any value, set to 0 by the classifier) for its rows' images alone: only the output rows asked for
        are computed."""
        hidden = self.hidden(features)
        weight, bias = self.out.weight, self.out.bias
        column_logits = F.linear(hidden, weight[columns], bias[columns])
        return column_logits, [
            self._gathered(hidden, b) if b.classes.shape[1] < OWN_MATMUL_CLASSES else self._by_vertical(hidden, b)
            for b in blocks
        ]

    def _gathered(self, hidden: torch.Tensor, block: ClassBlocks) -> torch.Tensor:
        """Narrow rows: each entry's weight row gathered, one bmm for the group."""
        # index_select, not indexing: its gradient is an index_add, several times faster on CPU than the
        # accumulating index_put that indexing's gradient is
        classes = block.classes.clamp(min=0).reshape(-1)
        rows = self.out.weight.index_select(0, classes).view(*block.classes.shape, -1)
        bias = self.out.bias.index_select(0, classes).view(block.classes.shape)
        return torch.bmm(rows, hidden[block.rows].unsqueeze(2)).squeeze(2) + bias

    def _by_vertical(self, hidden: torch.Tensor, block: ClassBlocks) -> torch.Tensor:
        """Wide rows: one matmul per vertical among them on its slice of the output weights (a row's classes are
        one vertical's, from its first entry on). Gathering a weight row per entry would copy P x S x k floats:
        470 MB a batch at verticals of 14,362 classes."""
        width = block.classes.shape[1]
        starts, vertical = torch.unique(block.classes[:, 0], return_inverse=True)
        sizes = torch.zeros_like(starts).scatter_(0, vertical, (block.classes >= 0).sum(dim=1))  # rows agree
        order = torch.argsort(vertical, stable=True)
        counts = torch.bincount(vertical, minlength=len(starts)).tolist()
        parts = []
        for start, size, rows in zip(starts.tolist(), sizes.tolist(), block.rows[order].split(counts), strict=True):
            logits = F.linear(hidden[rows], self.out.weight[start : start + size], self.out.bias[start : start + size])
            parts.append(F.pad(logits, (0, width - size)))
        if not parts:
            return hidden.new_zeros(0, width)
        return torch.cat(parts).index_select(0, inverse_permutation(order))


@torch.no_grad()
def widened(dense: DenseHead, hidden: list[int]) -> DenseHead:
    """`dense` with wider hidden layers, computing the same function until trained: each layer's first units copy
    `dense`'s, the added units keep nn.Linear's random incoming weights and read out with zero weights (so they
    change nothing at the start, and the gradient reaches their outgoing weights at once). `hidden` needs as many
    layers as `dense`, each at least as wide."""
    layers = [m for m in dense.hidden if isinstance(m, nn.Linear)]
    old = [m.out_features for m in layers]
    if len(hidden) != len(old) or any(new < was for new, was in zip(hidden, old, strict=True)):
        raise ValueError(f"cannot widen hidden layers {old} to {hidden}: as many layers, each at least as wide")
    dropout = next((m.p for m in dense.hidden if isinstance(m, nn.Dropout)), 0.0)
    activation = "leaky_relu" if any(isinstance(m, nn.LeakyReLU) for m in dense.hidden) else "relu"
    wide = DenseHead(
        layers[0].in_features if layers else dense.out.in_features, hidden, dense.out.out_features, dropout, activation
    ).to(dense.out.weight.device, dense.out.weight.dtype)
    new_layers = [m for m in wide.hidden if isinstance(m, nn.Linear)] + [wide.out]
    for mine, theirs in zip(new_layers, layers + [dense.out], strict=True):
        rows, cols = theirs.weight.shape
        mine.weight[:, cols:] = 0  # the added units of the layer below are read with zero weights
        mine.weight[:rows, :cols] = theirs.weight
        mine.bias[:rows] = theirs.bias
    return wide
