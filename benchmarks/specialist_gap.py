"""Does the built-in benchmark put the generalist in the regime where specialists help? Measured, side by side.

    python benchmarks/specialist_gap.py [--preset default] [--label-noise X] [--verticals 2] [--extra-epochs 10]

Trains the demo's generalist on the benchmark, then for the first N verticals a specialist of the same
architecture (initialised from the generalist, output layer cut to the vertical's classes, trained on the
vertical's images plus as many other images as negatives), and, as the honest control, the generalist trained on
for the same number of extra epochs on all data. Reports AP on each vertical's classes over all test images:
specialists should beat both the generalist and the control for knowledge concentration to have anything to
concentrate. Writes the figures as JSON with --json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kc.config import TrainConfig, config_from_dict, merge, parse_override
from kc.data.benchmark import PRESETS, generate_benchmark
from kc.data.dataset import ImageDataset, dense_targets
from kc.demo import DEMO_CONFIG
from kc.evaluate.metrics import average_precision
from kc.evaluate.predict import predict
from kc.run import prepare_run
from kc.stages import GENERALIST, load_stage, new_generalist_model
from kc.train.common import ground_truth_loss
from kc.train.generalist import train_generalist
from kc.train.trainer import Trainer


def vertical_ap(ap: np.ndarray, ranges: list[tuple[int, int]], verticals: int) -> list[float]:
    return [100 * float(np.nanmean(ap[a:b])) for a, b in ranges[:verticals]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-noise", type=float, help="override the preset's training-label noise")
    parser.add_argument("--verticals", type=int, default=2, help="how many specialists to train")
    parser.add_argument("--extra-epochs", type=int, default=10, help="specialists' and control's epochs")
    parser.add_argument("--work", default="runs/specialist_gap")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args()

    work = Path(args.work)
    spec = replace(PRESETS[args.preset], seed=args.seed)
    if args.label_noise is not None:
        spec = replace(spec, label_noise=args.label_noise)
    manifest = generate_benchmark(work / "benchmark", spec, progress=False)
    data = merge(
        DEMO_CONFIG,
        {
            "run_dir": str(work / "run"),
            "seed": args.seed,
            "data": {
                "manifest": str(manifest),
                "taxonomy": str(manifest.parent / "taxonomy.json"),
                "image_size": spec.image_size,
            },
        },
    )
    for text in args.set:
        data = merge(data, parse_override(text))
    cfg = config_from_dict(data)
    run = prepare_run(cfg, progress=False)
    tax, C = run.taxonomy, run.taxonomy.num_classes
    start = time.perf_counter()
    train_generalist(run, progress=False)
    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run))
    test = run.splits["test"]
    scores, targets, _ = predict(generalist, test, run.image_root, cfg.data, C)
    gen_ap = average_precision(scores, targets)
    extra = TrainConfig.model_validate(merge(cfg.generalist.model_dump(), {"epochs": args.extra_epochs}))

    specialist_aps = []
    for v in range(args.verticals):
        a, b = tax.vertical_ranges[v]
        model = copy.deepcopy(generalist)
        out = model.head.out
        model.head.out = torch.nn.Linear(out.in_features, b - a)
        with torch.no_grad():
            model.head.out.weight.copy_(out.weight[a:b])
            model.head.out.bias.copy_(out.bias[a:b])
        own = [s for s in run.splits["train"] if any(a <= c < b for c in s.labels)]
        others = [s for s in run.splits["train"] if not any(a <= c < b for c in s.labels)]
        pick = np.random.default_rng(v).choice(len(others), min(len(others), len(own)), replace=False)
        dataset = ImageDataset(own + [others[i] for i in pick], run.image_root, cfg.data, train=True, seed=v)

        def loss_fn(m, batch, a=a, b=b):
            logits = m(batch["images"]).float()
            target = dense_targets(batch["labels"], C)[:, a:b]
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]

        stage = work / f"specialist_{v}"
        shutil.rmtree(stage, ignore_errors=True)
        Trainer(model, extra, stage, dataset, loss_fn, seed=v, progress=False, verbose=False).fit()
        s_scores, _, _ = predict(model, test, run.image_root, cfg.data, b - a)
        specialist_aps.append(100 * float(np.nanmean(average_precision(s_scores, targets[:, a:b]))))

    control = copy.deepcopy(generalist)
    shutil.rmtree(work / "control", ignore_errors=True)
    Trainer(
        control,
        extra,
        work / "control",
        ImageDataset(run.splits["train"], run.image_root, cfg.data, True, 99),
        ground_truth_loss("bce", C),
        seed=99,
        progress=False,
        verbose=False,
    ).fit()
    c_scores, _, _ = predict(control, test, run.image_root, cfg.data, C)
    ctl_ap = average_precision(c_scores, targets)

    result = {
        "preset": args.preset,
        "seed": args.seed,
        "overrides": args.set,
        "extra_epochs": args.extra_epochs,
        "generalist_mAP": 100 * float(np.nanmean(gen_ap)),
        "control_mAP": 100 * float(np.nanmean(ctl_ap)),
        "per_vertical": [
            {"vertical": tax.verticals[v].id, "generalist": g, "control": c, "specialist": s}
            for v, (g, c, s) in enumerate(
                zip(
                    vertical_ap(gen_ap, tax.vertical_ranges, args.verticals),
                    vertical_ap(ctl_ap, tax.vertical_ranges, args.verticals),
                    specialist_aps,
                    strict=True,
                )
            )
        ],
        "seconds": time.perf_counter() - start,
    }
    print(
        f"generalist mAP {result['generalist_mAP']:.2f}; control (+{args.extra_epochs} epochs) mAP "
        f"{result['control_mAP']:.2f}"
    )
    print("| vertical | generalist | control | specialist |\n|---|---:|---:|---:|")
    for row in result["per_vertical"]:
        print(f"| {row['vertical']} | {row['generalist']:.2f} | {row['control']:.2f} | {row['specialist']:.2f} |")
    means = [np.mean([r[k] for r in result["per_vertical"]]) for k in ("generalist", "control", "specialist")]
    print(f"| mean | {means[0]:.2f} | {means[1]:.2f} | {means[2]:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
