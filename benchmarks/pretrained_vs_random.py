"""Fine-tuning from pretrained weights against the same network from random weights, seed by seed.

    python benchmarks/pretrained_vs_random.py examples/fashion-mnist-pretrained.yaml --seed 0 --seed 1 --seed 2

The config's `model.backbone` is a `local-dir:PATH` folder (timm's layout, `kc convert-weights` writes one); the
random arm is the same config with `model.backbone` set to that folder's architecture, so the two differ in the
initial backbone weights alone (same head, data, preprocessing, schedule and seed). Each arm's generalist trains
to its val plateau; the best epoch is chosen on val, and test is scored once per model. Runs go to
RUN/seed_<n>/{pretrained,random} and resume. Prints val (what chose) and test (the record): mean ± std over seeds,
the paired difference (pretrained - random) and wins; writes RUN/pretrained_vs_random.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from kc.config import load_config
from kc.evaluate.stage import evaluate_stage
from kc.hub_layout import LOCAL_DIR, local_dir_config
from kc.io import atomic_write_json
from kc.run import prepare_run
from kc.stages import GENERALIST
from kc.train.generalist import train_generalist

ARMS = ("pretrained", "random")


def arm_config(config: Path, arm: str, seed: int):
    base = load_config(config)
    if not base.model.backbone.startswith(LOCAL_DIR):
        raise SystemExit(f"{config}: model.backbone must be a local-dir:PATH folder of pretrained weights")
    architecture = local_dir_config(base.model.backbone)["architecture"]
    run_dir = base.run_dir / f"seed_{seed}" / arm
    overrides = {"seed": seed, "run_dir": str(run_dir)}
    if arm == "random":
        overrides["model"] = {"backbone": architecture}
    return load_config(config, overrides), architecture


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--seed", type=int, action="append", required=True, help="repeat for several seeds")
    args = parser.parse_args()

    results: dict[int, dict[str, dict]] = {}
    for seed in args.seed:
        results[seed] = {}
        for arm in ARMS:
            cfg, architecture = arm_config(args.config, arm, seed)
            run = prepare_run(cfg, progress=False)
            trained = train_generalist(run, progress=False)
            val = evaluate_stage(run, GENERALIST, "val", progress=False)
            test = evaluate_stage(run, GENERALIST, "test", progress=False)
            results[seed][arm] = {
                "best_epoch": trained.best_epoch,
                "epochs": len(trained.history),
                "val": {k: val[k] for k in ("mAP", "top1")},
                "test": {k: test[k] for k in ("mAP", "top1")},
            }
            print(
                f"seed {seed} {arm}: best epoch {trained.best_epoch}, val mAP {val['mAP']:.2f}, test mAP "
                f"{test['mAP']:.2f}, test top-1 {test['top1']:.2f}",
                flush=True,
            )

    seeds = list(results)
    lines = [f"{architecture}, {len(seeds)} seeds ({', '.join(map(str, seeds))})", ""]
    lines += ["| split | metric | pretrained | random | paired difference | wins |", "|---|---|---:|---:|---:|---:|"]
    for split in ("val", "test"):
        for metric in ("mAP", "top1"):
            values = {arm: [results[s][arm][split][metric] for s in seeds] for arm in ARMS}
            diffs = [p - r for p, r in zip(values["pretrained"], values["random"], strict=True)]
            lines.append(
                f"| {split} | {metric} | {mean_std(values['pretrained'])} | {mean_std(values['random'])} | "
                f"{mean_std(diffs)} | {sum(d > 0 for d in diffs)}/{len(diffs)} |"
            )
    print("\n".join(lines))
    root = load_config(args.config).run_dir
    atomic_write_json(root / "pretrained_vs_random.json", {"architecture": architecture, "seeds": results})
    print(f"wrote {root / 'pretrained_vs_random.json'}")


if __name__ == "__main__":
    main()
