"""A structured head's training step on a subset of classes: every class then the subset kept, against the subset alone.

    python benchmarks/structured_subset.py [--preset paper-100k] [--batch 512] [--negatives 4096] [--drawn 3]
                                           [--rounds 7]

The head of the `paper-*` feature benchmarks (FC32-FC16 widths on 128-d features) in each student structure, over
the preset's verticals (paper-100k: 100,000 classes in 20 verticals of 897 to 14,362). Two losses a sampled step
computes: the ground truth's over the batch's positive classes plus `--negatives` drawn others (a control's
`generalist.sampled_negatives`), and the student's over each image's own vertical plus `--drawn` drawn verticals
(`student.sampled_verticals`), one label per image at random. Each is timed (forward, backward) both ways:
`head(features)` over every class with the subset indexed out afterwards (what a structured head did before
2026-12-04), and `head.class_logits` / `head.subset_logits`, which compute the subset's logits alone. Rounds
interleave the two so that the machine's drift hits both alike; the first is a warm-up; medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kc.data.feature_benchmark import FEATURE_PRESETS
from kc.models.heads import ClassBlocks
from kc.models.structured import StructuredHead


def timed(step) -> float:
    start = time.perf_counter()
    step().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper-100k", choices=sorted(FEATURE_PRESETS))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--negatives", type=int, default=4096)
    parser.add_argument("--drawn", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    sizes = FEATURE_PRESETS[args.preset].vertical_sizes()
    starts = torch.tensor([sum(sizes[:v]) for v in range(len(sizes))])
    N, M = sum(sizes), len(sizes)
    features = torch.randn(args.batch, 128)
    labels = torch.randint(0, N, (args.batch,))
    negatives = torch.randperm(N)[: args.negatives]
    classes = torch.unique(torch.cat([labels, negatives]))
    # the student's subset: each image's own vertical as a block, drawn verticals as columns
    verticals = torch.bucketize(labels, starts, right=True) - 1
    width = max(sizes[v] for v in verticals.tolist())
    offsets = torch.arange(width)
    own_sizes = torch.tensor(sizes)[verticals]
    blocks = torch.where(offsets < own_sizes.unsqueeze(1), starts[verticals].unsqueeze(1) + offsets, 0)
    real = offsets < own_sizes.unsqueeze(1)
    rows = torch.arange(args.batch)
    drawn = torch.randperm(M)[: args.drawn].tolist()
    columns = torch.cat([torch.arange(sizes[v]) + starts[v] for v in drawn])
    print(f"{args.preset}: {N:,} classes in {M} verticals, batch {args.batch}, threads {torch.get_num_threads()}")
    print(
        f"  ground truth: {len(classes):,} classes; student: blocks {args.batch} x {width:,}, {len(columns):,} columns"
    )

    def steps_of(head: StructuredHead) -> dict:
        def every_class():
            logits = head(features)
            return logits[:, columns], logits[rows.unsqueeze(1), blocks]

        def student_loss(column_logits, block_logits):
            return column_logits.square().mean() + block_logits[real].square().mean()

        one_group = [ClassBlocks(rows, blocks)]  # one group: every row padded to the largest vertical

        def student_subset_loss(column_logits, block_logits):
            return student_loss(column_logits, block_logits[0])

        return {
            "ground truth, every class": lambda: head(features)[:, classes].square().mean(),
            "ground truth, subset": lambda: head.class_logits(features, classes).square().mean(),
            "student, every class": lambda: student_loss(*every_class()),
            "student, subset": lambda: student_subset_loss(*head.subset_logits(features, columns, one_group)),
        }

    for structure in ("fc-sc", "sc-sc"):
        head = StructuredHead(128, [32, 16], sizes, structure)
        steps = steps_of(head)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for round_ in range(args.rounds + 1):
            for name, step in steps.items():
                head.zero_grad()
                seconds = timed(step)
                if round_:
                    times[name].append(seconds)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for loss in ("ground truth", "student"):
            full, subset = medians[f"{loss}, every class"], medians[f"{loss}, subset"]
            print(
                f"  {structure} {loss}: every class {full * 1000:.1f} ms, subset {subset * 1000:.1f} ms, "
                f"{full / subset:.1f}x faster"
            )


if __name__ == "__main__":
    main()
