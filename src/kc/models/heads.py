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
        (padding: any class, dropped by the caller) for its rows' images alone: only the output rows asked for are
        computed."""
        hidden = self.hidden(features)
        weight, bias = self.out.weight, self.out.bias
        column_logits = F.linear(hidden, weight[columns], bias[columns])
        block_logits = []
        for block in blocks:
            # index_select, not indexing: its gradient is an index_add, several times faster on CPU than the
            # accumulating index_put that indexing's gradient is, for the P x S rows (about 50,000 at 100K classes)
            classes = block.classes.clamp(min=0).reshape(-1)
            rows = weight.index_select(0, classes).view(*block.classes.shape, -1)
            block_bias = bias.index_select(0, classes).view(block.classes.shape)
            block_logits.append(torch.bmm(rows, hidden[block.rows].unsqueeze(2)).squeeze(2) + block_bias)
        return column_logits, block_logits
