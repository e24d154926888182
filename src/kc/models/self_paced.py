"""Self-paced output scales (the paper's self-paced learning): each vertical's logits learn at their own pace.

For each vertical v, the block x_v of logits over v's classes is L2-normalised and multiplied by a scale:
y_v = gamma_v * x_v / ||x_v||. Because the gradient reaching x_v scales with gamma_v, a trainable gamma_v acts as the
vertical's own learned learning rate. Variants: `vertical` (one scalar per vertical, the paper's best), `class`
(one scale per class), `fixed` (gamma_v = init, not trained), `none` (logits unchanged).

`centred` keeps each image's block mean m_v outside the normalisation: y_v = m_v + gamma_v (x_v - m_v) / ||x_v - m_v||.
A prior-biased model says "this vertical is absent" through the common level of the block; the paper's formula
divides that level out, so absent verticals' blocks keep only their shape and the ranking of images across
verticals is lost (10K classes: val mAP 72.8 -> 27.2 at the start), while the centred one keeps it and still gives
each vertical a learned scale of its within-vertical contrast.

`running` divides each vertical's block by a running average (over training batches, not followed by the gradient)
of its norm instead of each image's own: y_v = gamma_v * x_v / r_v. Every image of a vertical gets the same divisor,
so no ranking of images changes (a per-class monotone map, which leaves every class's AP as it was), and gamma_v is
the vertical's gain: its gradient still scales the vertical's learning, the pace the paper learns. The average
starts at `running_start` (the student's: the generalist's measured block norms), so with gamma started there too
(init 'generalist') the student starts exactly as the generalist, and with init 'sqrt' at the paper's block norm
sqrt(N_v). In eval mode the average is a constant (exported as one).

Batched over verticals: the per-vertical squared norms are one `index_add_` over the class -> vertical map, so the
cost does not grow with the number of verticals (no Python loop); computed class-major (see `_scale`).
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
        centred: bool = False,
        running: bool = False,
        running_start: torch.Tensor | None = None,
        momentum: float = 0.01,
    ):
        super().__init__()
        if centred and running:
            raise ValueError("self-paced scales: centred and running are two normalisations; choose one")
        self.centred = centred
        self.running = running
        self.momentum = momentum
        if variant not in VARIANTS:
            raise ValueError(f"self-paced variant '{variant}' is not one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.eps = eps
        voc = torch.tensor(vertical_of_class, dtype=torch.long)
        self.num_verticals = int(voc.max()) + 1 if len(voc) else 0
        self.register_buffer("vertical_of_class", voc, persistent=False)
        sizes = torch.bincount(voc, minlength=self.num_verticals).float()
        self.register_buffer("sizes", sizes, persistent=False)
        if isinstance(init, torch.Tensor):  # one value per vertical (e.g. the generalist's block norms)
            per_vertical = init.detach().float().clone()
        else:
            per_vertical = sizes.sqrt() if init == "sqrt" else torch.full_like(sizes, float(init))
        if variant == "none":
            return
        if running:  # persistent: saved with the weights, so resume and exports read the same divisor
            start_norm = per_vertical if running_start is None else running_start.detach().float()
            self.register_buffer("running_norm", start_norm.clamp_min(eps).clone())
        start = per_vertical if variant in ("vertical", "fixed") else per_vertical[voc]
        if init_noise > 0:
            start = start + init_noise * torch.randn_like(start)
        if variant == "fixed":
            self.register_buffer("gamma", start.clone())
        else:
            self.gamma = nn.Parameter(start.clone())

    def per_class_scale(self) -> torch.Tensor:
        if self.variant in ("vertical", "fixed"):
            return self.gamma.index_select(0, self.vertical_of_class)  # gradient: an index_add (see _scale)
        return self.gamma

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
        scale = self.per_class_scale()[classes]
        if self.running:  # read only: the running norms follow whole columns (forward, scale_columns), which
            # see every image of the batch, as the full loss does; a block row is one (image, vertical) pair
            return logits / self.running_norm[self.vertical_of_class[classes[:, :1]]] * scale
        if not self.centred:
            norms = (logits * logits).sum(dim=1, keepdim=True).clamp_min(self.eps * self.eps).sqrt()
            return logits / norms * scale
        size = self.sizes[self.vertical_of_class[classes[:, :1]]]  # (P, 1): the row's vertical's classes
        inside = torch.arange(logits.shape[1], device=logits.device) < size
        mean = logits.sum(dim=1, keepdim=True) / size  # padding holds 0
        centred = (logits - mean) * inside
        norms = (centred * centred).sum(dim=1, keepdim=True).clamp_min(self.eps * self.eps).sqrt()
        return (mean + centred / norms * scale) * inside

    def _scale(self, logits: torch.Tensor, vertical_of_column: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # Computed class-major, (columns, B): the structured heads' logits are the transpose of such a tensor (so
        # this is a view), and per-vertical sums then add whole contiguous rows. Along the columns of a row-major
        # (B, columns) tensor the centred scales took 5x as long at 10K classes (docs/BENCHMARKS.md).
        x = logits.t().contiguous()
        scale = scale.unsqueeze(1)

        def per_vertical_sum(values: torch.Tensor) -> torch.Tensor:
            sums = torch.zeros(self.num_verticals, values.shape[1], device=values.device, dtype=values.dtype)
            return sums.index_add_(0, vertical_of_column, values)

        def per_column(values: torch.Tensor) -> torch.Tensor:
            # (V, B) -> (columns, B): index_select, whose gradient is an index_add, not indexing, whose gradient
            # is the slower accumulating index_put
            return values.index_select(0, vertical_of_column)

        if self.running:
            if self.training:
                self._track(per_vertical_sum(x * x).sqrt().mean(dim=1), vertical_of_column)
            return self._row_major_view(x / self.running_norm[vertical_of_column].unsqueeze(1) * scale)
        mean = None
        if self.centred:  # whole verticals: each block's columns are its vertical's classes
            mean = per_column(per_vertical_sum(x) / self.sizes.to(x.dtype).unsqueeze(1))
            x = x - mean
        norms = per_vertical_sum(x * x).clamp_min(self.eps * self.eps).sqrt()
        scaled = x / per_column(norms) * scale
        return self._row_major_view(scaled if mean is None else mean + scaled)

    def _row_major_view(self, class_major: torch.Tensor) -> torch.Tensor:
        """(columns, B) -> its (B, columns) transpose, a view. The loss's gradient comes back row-major, so
        through the view it reaches the class-major tensors strided; every elementwise op of the backward then
        walks memory across rows (at 10K classes a centred control's step took 4x the one without scales). One copy
        into class-major order first keeps them contiguous (docs/BENCHMARKS.md)."""
        if self.training and class_major.requires_grad:
            class_major.register_hook(torch.Tensor.contiguous)
        return class_major.t()

    @torch.no_grad()
    def _track(self, batch_norms: torch.Tensor, vertical_of_column: torch.Tensor) -> None:
        """Move the running norm of each vertical among the columns toward `batch_norms` (V,), the batch's mean
        block norm (others hold 0 and stay as they were)."""
        seen = torch.zeros(self.num_verticals, dtype=torch.bool, device=batch_norms.device)
        seen[vertical_of_column] = True
        target = batch_norms.detach().to(self.running_norm).clamp_min(self.eps)
        self.running_norm[seen] = torch.lerp(self.running_norm[seen], target[seen], self.momentum)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, verticals={self.num_verticals}, centred={self.centred}, running={self.running}"
