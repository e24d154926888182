"""Self-paced scales (kc.models.self_paced) computed three ways, forward and backward, side by side:

- now: class-major, the loss's row-major gradient copied into class-major order once before the backward;
- strided gradient: class-major, that gradient used as it comes (strided through the transposed view; kc until the
  later 2026-12-04 change);
- row-major: the formula along the columns of a row-major tensor (kc before the first 2026-12-04 change).

    python benchmarks/self_paced_layout.py [--preset paper-10k] [--batch 256] [--rounds 9] [--threads 2]

The logits come as the structured (FC-SC, SC-SC) heads give them: the transpose of a (classes, batch) tensor; and,
for the dense head, row-major. The backward starts from a dense row-major gradient, as a loss over the (B, classes)
logits gives it (a `.sum()` would give a broadcast one, which hides the layout's cost). Rounds are interleaved, way
after way; medians after a warm-up round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kc.data.feature_benchmark import FEATURE_PRESETS
from kc.models.self_paced import SelfPacedScales
from kc.numerics import flush_subnormals_in_this_process


def row_major_scales(layer: SelfPacedScales, logits: torch.Tensor) -> torch.Tensor:
    """The centred formula as computed before: per-vertical sums along dim 1 of the (B, classes) logits."""
    voc, scale = layer.vertical_of_class, layer.per_class_scale()

    def per_vertical_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(values.shape[0], layer.num_verticals).index_add_(1, voc, values)

    mean = (per_vertical_sum(logits) / layer.sizes).index_select(1, voc)
    centred = logits - mean
    norms = per_vertical_sum(centred * centred).clamp_min(layer.eps * layer.eps).sqrt()
    return mean + centred / norms.index_select(1, voc) * scale


class StridedGradientScales(SelfPacedScales):
    """The layer as it was before its gradient was made class-major: the transposed view alone."""

    def _row_major_view(self, class_major: torch.Tensor) -> torch.Tensor:
        return class_major.t()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper-10k", choices=sorted(FEATURE_PRESETS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    flush_subnormals_in_this_process()
    torch.set_num_threads(args.threads)
    sizes = FEATURE_PRESETS[args.preset].vertical_sizes()
    vertical_of_class = [v for v, n in enumerate(sizes) for _ in range(n)]
    layer = SelfPacedScales(vertical_of_class, "vertical", init="sqrt", centred=True)
    strided = StridedGradientScales(vertical_of_class, "vertical", init="sqrt", centred=True)
    class_major = torch.randn(len(vertical_of_class), args.batch, generator=torch.Generator().manual_seed(0)) * 5
    # (B, classes) logits either way: a transposed view (the structured heads') or row-major (the dense head's)
    inputs = {"structured head (transposed)": class_major.t(), "dense head (row-major)": class_major.t().contiguous()}
    ways = {
        "now": layer,
        "strided gradient": strided,
        "row-major": lambda x: row_major_scales(layer, x),
    }
    gradient = torch.randn(args.batch, len(vertical_of_class), generator=torch.Generator().manual_seed(1))

    def step(way, x: torch.Tensor) -> float:
        x = x.detach().requires_grad_()  # keeps the strides
        start = time.perf_counter()
        way(x).backward(gradient)
        return time.perf_counter() - start

    times = {(w, i): [] for w in ways for i in inputs}
    for round_ in range(args.rounds + 1):
        for w, way in ways.items():
            for i, x in inputs.items():
                seconds = step(way, x)
                if round_:
                    times[(w, i)].append(seconds)
    with torch.no_grad():
        x = class_major.t()
        assert torch.allclose(layer(x), row_major_scales(layer, x), atol=1e-4), "the ways disagree"
        assert torch.equal(layer(x), strided(x)), "the ways disagree"
    print(
        f"{args.preset}: {len(vertical_of_class):,} classes in {len(sizes)} verticals, batch {args.batch}, "
        f"{args.threads} threads, medians of {args.rounds} rounds (forward + backward)"
    )
    for i in inputs:
        medians = {w: statistics.median(times[(w, i)]) for w in ways}
        cells = "   ".join(f"{w} {m * 1000:7.1f} ms ({m / medians['now']:4.2f}x)" for w, m in medians.items())
        print(f"  {i:30s} {cells}")


if __name__ == "__main__":
    main()
