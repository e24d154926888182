"""Sigmoid cross-entropy of one logits tensor against several targets at once, summed, in few passes over memory.

At 10,000 classes a batch's logits are 2.56 million entries, and each elementwise pass over them costs about a
millisecond on a CPU. `F.binary_cross_entropy_with_logits` is a composite of about five such passes forward and as
many backward, and the student's loss (truth and teachers, two targets, weights and masks) took some forty: more
than half of its training step (docs/BENCHMARKS.md). The entry loss is affine in its target,

    T^2 * bce(x / T, t) = T^2 * softplus(x / T) - T * t * x,

so every term sum_i c_i * T_i^2 * bce(x / T_i, t_i) is one softplus per distinct temperature and two dot products,
and the gradient, sum_i c_i * T_i * (sigmoid(x / T_i) - t_i), needs no intermediate kept from the forward pass but
the logits. Where the targets are sparse (a teacher's top K of a vertical's thousands of classes, an image's
labels) and the weight is one per row, `summed_sparse_terms` sums the softplus part per row and the target part over
the few entries that have one: no dense target, weight or mask is formed at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Term:
    """c * T^2 * bce(x / T, target), summed over entries. `weight` broadcasts against the logits: a number, one
    per row (B, 1), one per class (C,) or (1, C), or one per entry; `target` is dense, of the logits' shape."""

    weight: torch.Tensor | float
    target: torch.Tensor
    temperature: float = 1.0


def summed_terms(logits: torch.Tensor, terms: dict[str, Term]) -> dict[str, torch.Tensor]:
    """Each term's sum over all entries, differentiable in `logits` (weights and targets are constants)."""
    names = list(terms)
    for name in names:
        if terms[name].target.shape != logits.shape:
            raise ValueError(
                f"term {name!r}: target of shape {tuple(terms[name].target.shape)}, logits of shape "
                f"{tuple(logits.shape)}; a target is dense, one value per entry"
            )
    weights = [torch.as_tensor(terms[n].weight, dtype=logits.dtype, device=logits.device) for n in names]
    targets = [terms[n].target.to(logits.dtype) for n in names]
    temperatures = [float(terms[n].temperature) for n in names]
    # Row-major like the targets: a head that computes its outputs class by class hands them over transposed, and
    # elementwise passes over two differently laid out tensors run several times slower (8.4 against 0.6 ms).
    sums = _SummedTerms.apply(logits.contiguous(), temperatures, *weights, *targets)
    return {name: sums[i] for i, name in enumerate(names)}


def summed_bce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """sum(weight * bce(logits, targets)) over every entry: one term."""
    return summed_terms(logits, {"bce": Term(weight, targets)})["bce"]


def entry_values(logits: torch.Tensor, term: Term) -> torch.Tensor:
    """The term's value at each entry (what `summed_terms` sums, as torch's own cross-entropy computes it)."""
    t = term.temperature
    return F.binary_cross_entropy_with_logits(logits / t, term.target, reduction="none") * (t * t) * term.weight


def _weighted_sum(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum(weight * values), `weight` broadcast against `values`, without materialising their product: values are
    first summed over the dimensions along which the weight is constant."""
    if weight.dim() == 0:
        return weight * values.sum()
    if weight.shape == values.shape:
        return torch.dot(weight.reshape(-1), values.reshape(-1))
    weight = weight.reshape((1,) * (values.dim() - weight.dim()) + tuple(weight.shape))
    constant = [d for d in range(values.dim()) if weight.shape[d] == 1]
    return (weight * values.sum(dim=constant, keepdim=True)).sum()


class _SummedTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperatures: list[float], *weights_and_targets: torch.Tensor):
        n = len(temperatures)
        weights, targets = weights_and_targets[:n], weights_and_targets[n:]
        ctx.temperatures = temperatures
        ctx.save_for_backward(logits, *weights, *targets)
        softplus: dict[float, torch.Tensor] = {}  # one pass per distinct temperature, shared by its terms
        sums = []
        for c, t, temp in zip(weights, targets, temperatures, strict=True):
            if temp not in softplus:
                softplus[temp] = F.softplus(logits / temp if temp != 1.0 else logits)
            sums.append(temp * temp * _weighted_sum(c, softplus[temp]) - temp * _weighted_sum(c, t * logits))
        return torch.stack(sums) if sums else logits.new_zeros(0)

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor):
        logits, *saved = ctx.saved_tensors
        n = len(ctx.temperatures)
        weights, targets = saved[:n], saved[n:]
        grad: torch.Tensor | None = None
        sigmoid: dict[float, torch.Tensor] = {}
        for i, (c, t, temp) in enumerate(zip(weights, targets, ctx.temperatures, strict=True)):
            if temp not in sigmoid:
                sigmoid[temp] = torch.sigmoid(logits / temp if temp != 1.0 else logits)
            scale = grad_sums[i] * temp * c  # d(term)/dx = c * T * (sigmoid(x / T) - t)
            if grad is None:
                grad = (sigmoid[temp] - t).mul_(scale)
            else:
                grad.addcmul_(sigmoid[temp] - t, scale)
        return (grad if grad is not None else torch.zeros_like(logits), None, *([None] * (2 * n)))


@dataclass
class SparseTerm:
    """c * T^2 * bce(x / T, target), summed over a row's entries, for logits (P, S) whose targets are 0 but at a few
    entries: `weight` c, one per row (P,); `columns` (P, J) where the target is not 0 (-1: none) and `values` (P, J)
    the target there. A column may appear more than once in a row: its values add up."""

    weight: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor
    temperature: float = 1.0


def summed_sparse_terms(
    logits: torch.Tensor, sizes: torch.Tensor, terms: dict[str, SparseTerm]
) -> dict[str, torch.Tensor]:
    """Each term's sum over the entries of row p before `sizes[p]` (the rest is padding), differentiable in
    `logits`: sum_p c_p * (T^2 * sum_s softplus(x_ps / T) - T * sum_j t_pj * x_p,col_pj). One softplus pass per
    distinct temperature, summed per row, and one gather of the entries with targets."""
    padded = bool((sizes < logits.shape[1]).any())
    valid = torch.arange(logits.shape[1], device=logits.device) < sizes.unsqueeze(1) if padded else None
    row_sums = {t: _RowSoftplus.apply(logits, valid, t) for t in {float(term.temperature) for term in terms.values()}}
    # One gather for every term's target entries: its gradient is one scatter into the logits' shape.
    names = list(terms)
    columns = torch.cat([terms[n].columns for n in names], dim=1)
    coefficients = torch.cat(
        [
            (terms[n].weight.unsqueeze(1) * terms[n].temperature) * terms[n].values * (terms[n].columns >= 0)
            for n in names
        ],
        dim=1,
    )
    products = logits.gather(1, columns.clamp(min=0)) * coefficients
    widths = [terms[n].columns.shape[1] for n in names]
    out = {}
    for name, product in zip(names, products.split(widths, dim=1), strict=True):
        term = terms[name]
        t = float(term.temperature)
        out[name] = t * t * torch.dot(term.weight, row_sums[t]) - product.sum()
    return out


class _RowSoftplus(torch.autograd.Function):
    """(P,): sum over each row's valid entries of softplus(x / T); `valid` (P, S) bool, or None: every entry."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, valid: torch.Tensor | None, temperature: float):
        values = F.softplus(logits / temperature if temperature != 1.0 else logits)
        if valid is not None:
            values.masked_fill_(~valid, 0.0)
        ctx.temperature = temperature
        ctx.save_for_backward(logits, valid)
        return values.sum(dim=1)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        logits, valid = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.sigmoid(logits / t if t != 1.0 else logits).mul_((grad_rows / t).unsqueeze(1))
        if valid is not None:
            grad.masked_fill_(~valid, 0.0)
        return grad, None, None
