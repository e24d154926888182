"""Classification heads over a backbone feature vector.

`DenseHead` is the paper's generalist head: FC(s1)-FC(s2) (each Linear-ReLU; Linear-LeakyReLU as an option) then
the output layer over all classes (FC4096-FC512 on Inception-V2 in the paper). Other heads (structurally connected)
plug in beside it: a head maps (B, in_features) -> (B, num_classes) logits.
"""

from __future__ import annotations

import torch
from torch import nn

LEAKY_SLOPE = 0.01  # model.head.activation leaky_relu: PyTorch's default negative slope


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
