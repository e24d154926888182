"""Self-paced output scales (the paper's self-paced learning): each vertical's logits learn at their own pace.

For each vertical v, the block x_v of logits over v's classes is L2-normalised and multiplied by a scale:
y_v = gamma_v * x_v / ||x_v||. Because the gradient reaching x_v scales with gamma_v, a trainable gamma_v acts as the
vertical's own learned learning rate. Variants: `vertical` (one scalar per vertical, the paper's best), `class`
(one scale per class), `fixed` (gamma_v = init, not trained), `none` (logits unchanged).

Batched over verticals: the per-vertical squared norms are one `index_add_` over the class -> vertical map, so the
cost does not grow with the number of verticals (no Python loop).
"""

from __future__ import annotations

import torch
from torch import nn

VARIANTS = ("none", "fixed", "class", "vertical")


class SelfPacedScales(nn.Module):
    def __init__(
        self,
        vertical_of_class: list[int],
        variant: str = "vertical",
        init: str | float | torch.Tensor = "sqrt",
        init_noise: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"self-paced variant '{variant}' is not one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.eps = eps
        voc = torch.tensor(vertical_of_class, dtype=torch.long)
        self.num_verticals = int(voc.max()) + 1 if len(voc) else 0
        self.register_buffer("vertical_of_class", voc, persistent=False)
        sizes = torch.bincount(voc, minlength=self.num_verticals).float()
        if isinstance(init, torch.Tensor):  # one value per vertical (e.g. the generalist's block norms)
            per_vertical = init.detach().float().clone()
        else:
            per_vertical = sizes.sqrt() if init == "sqrt" else torch.full_like(sizes, float(init))
        if variant == "none":
            return
        start = per_vertical if variant in ("vertical", "fixed") else per_vertical[voc]
        if init_noise > 0:
            start = start + init_noise * torch.randn_like(start)
        if variant == "fixed":
            self.register_buffer("gamma", start.clone())
        else:
            self.gamma = nn.Parameter(start.clone())

    def per_class_scale(self) -> torch.Tensor:
        return self.gamma[self.vertical_of_class] if self.variant in ("vertical", "fixed") else self.gamma

    def per_vertical_scale(self) -> torch.Tensor:
        """gamma per vertical (class variant: the mean over the vertical's classes), for logs and reports."""
        if self.variant in ("vertical", "fixed"):
            return self.gamma.detach()
        sums = torch.zeros(self.num_verticals, device=self.gamma.device).index_add_(
            0, self.vertical_of_class, self.gamma.detach()
        )
        return sums / torch.bincount(self.vertical_of_class, minlength=self.num_verticals)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.variant == "none":
            return logits
        return self._scale(logits, self.vertical_of_class, self.per_class_scale())

    def scale_columns(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B, K) logits of the classes `classes` (K,), which must hold each of their verticals whole: the same
        values as forward gives those columns."""
        if self.variant == "none":
            return logits
        return self._scale(logits, self.vertical_of_class[classes], self.per_class_scale()[classes])

    def scale_blocks(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(P, S) logits, each row the whole block of one vertical's classes `classes` (P, S); padding entries
        must hold logit 0 (any class index)."""
        if self.variant == "none":
            return logits
        norms = (logits * logits).sum(dim=1, keepdim=True).clamp_min(self.eps * self.eps).sqrt()
        return logits / norms * self.per_class_scale()[classes]

    def _scale(self, logits: torch.Tensor, vertical_of_column: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        squares = torch.zeros(logits.shape[0], self.num_verticals, device=logits.device, dtype=logits.dtype)
        squares.index_add_(1, vertical_of_column, logits * logits)
        norms = squares.clamp_min(self.eps * self.eps).sqrt()
        return logits / norms[:, vertical_of_column] * scale

    def extra_repr(self) -> str:
        return f"variant={self.variant}, verticals={self.num_verticals}"
