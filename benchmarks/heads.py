"""Head benchmark: dense FC-FC against structurally connected heads, batched and as a naive per-vertical loop.

    python benchmarks/heads.py [--classes 1000 10000 100000] [--repeats 7] [--json out.json]
    python benchmarks/heads.py --run RUN_DIR      # the run's whole student, forward images/s per head structure

For each vocabulary size (about 100 classes per vertical, or `--verticals M` at every size; vertical sizes drawn
log-uniformly over a 16x range), times one forward + backward of each head on a batch of backbone features, all
heads of a size interleaved round by round in one process (medians). "naive" is the same structured head with its
block-sparse output layer computed by a Python loop over verticals. Memory: the activations a step keeps for its
backward (tensor storages saved by autograd, each counted once); parameters and their gradients come on top.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kc.bench import time_heads
from kc.bench import vertical_sizes as bench_sizes
from kc.models.structured import head_name

HEADS = ("fc-fc", "fc-sc", "fc-sc naive", "fc-sc(x)", "sc-sc", "sc-sc naive")


def vertical_sizes(num_classes: int, mean: int = 100, seed: int = 0) -> list[int]:
    """About `mean` classes per vertical, sizes drawn log-uniformly over a 16x range."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < num_classes:
        sizes.append(max(1, int(round(mean * 4 ** rng.uniform(-1, 1)))))
    sizes[-1] -= sum(sizes) - num_classes
    return [s for s in sizes if s > 0]


def student_inference(run_dir: Path, batch: int, repeats: int) -> None:
    """Forward images/s of the run's student (backbone + head + self-paced scales) with each head structure,
    interleaved round by round in one process; weights are the architecture's own (speed does not depend on them)."""
    from kc.config import load_config
    from kc.models.accounting import head_structures
    from kc.run import Run
    from kc.stages import STUDENT, new_model
    from kc.taxonomy import Taxonomy

    taxonomy = Taxonomy.load(run_dir / "taxonomy.json")
    base = load_config(run_dir / "config.yaml", {"run_dir": str(run_dir)})
    models = {}
    for structure, x in head_structures(base.model.head.hidden, ("fc-fc", 0)):
        cfg = base.model_copy(deep=True)
        cfg.student.head = cfg.student.head.model_copy(update={"structure": structure, "shared_units": x})
        model = new_model(Run(cfg, run_dir, taxonomy, Path("."), {}), STUDENT).eval()
        models[head_name(structure, cfg.model.head.hidden, x)] = model
    size = base.data.image_size
    images = torch.randn(batch, 3, size, size)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(images)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - start)
    print(f"\nstudent forward, batch {batch}, median of {repeats}\n")
    print("| head | parameters | images/s |")
    print("|---|---:|---:|")
    for name, model in models.items():
        rate = batch / statistics.median(times[name])
        print(f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {rate:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--features", type=int, default=256, help="backbone feature size s_b")
    parser.add_argument("--s1", type=int, default=512)
    parser.add_argument("--s2", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--verticals", type=int, help="this many verticals at every size (default: ~100 classes each)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--run", type=Path, help="instead: forward images/s of this run's student per head structure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:
        student_inference(args.run.resolve(), 256, args.repeats)
        return

    results = []
    for num_classes in args.classes:
        sizes = vertical_sizes(num_classes) if args.verticals is None else bench_sizes(num_classes, args.verticals)
        timed = time_heads(list(HEADS), sizes, args.features, [args.s1, args.s2], args.batch, args.repeats)
        for kind, figures in timed.items():
            x = args.s2 // 2 if "(x)" in kind else 0
            row = {
                "classes": num_classes,
                "verticals": len(sizes),
                "head": kind,
                "name": head_name(kind.split()[0].replace("(x)", ""), [args.s1, args.s2], x),
                "parameters": figures["parameters"],
                "step_ms": figures["ms"],
                "vs_fc_fc": figures["ms"] / timed["fc-fc"]["ms"],
                "saved_mib": figures["activations_mib"],
            }
            results.append(row)
            print(json.dumps(row), flush=True)

    print(
        f"\nbatch {args.batch}, s_b={args.features}, s1={args.s1}, s2={args.s2}, {args.threads} threads, "
        f"median of {args.repeats}\n"
    )
    print("| classes | verticals | head | parameters | fwd+bwd ms | × FC-FC | activations MiB |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in results:
        label = r["name"] + (" (naive loop)" if r["head"].endswith("naive") else "")
        print(
            f"| {r['classes']:,} | {r['verticals']} | {label} | {r['parameters'] / 1e6:.2f}M | {r['step_ms']:.1f} | "
            f"{r['vs_fc_fc']:.2f} | {r['saved_mib']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
