"""kc_convnet: a small CNN for small images that trains quickly on a CPU, registered as a timm model.

Registered with timm so that it is created like any other backbone: ``timm.create_model("kc_convnet",
num_classes=0)``. Stages of (conv3x3-norm-ReLU) x depth, each but the first halving the resolution, then global
average pooling.
"""

from __future__ import annotations

import math

import torch
from timm.models import register_model
from torch import nn


def _norm(kind: str, width: int) -> nn.Module:
    """batch: BatchNorm (statistics of the batch, per process under DDP); group: GroupNorm in up to 8 groups
    (each image on its own, so a step does not depend on how the batch is split across processes)."""
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, width), width)
    raise ValueError(f"norm: '{kind}' is not one of batch, group")


class ConvNet(nn.Module):
    def __init__(
        self,
        widths: tuple[int, ...] = (24, 48, 96),
        depth: int = 2,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        norm: str = "batch",
        **_: object,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for i, width in enumerate(widths):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                layers += [
                    nn.Conv2d(prev, width, 3, stride, 1, bias=False),
                    _norm(norm, width),
                    nn.ReLU(inplace=True),
                ]
                prev = width
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def kc_convnet(pretrained: bool = False, **kwargs: object) -> ConvNet:
    if pretrained:
        raise ValueError("kc_convnet has no published weights; name a local file in model.pretrained instead")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return ConvNet(**kwargs)
