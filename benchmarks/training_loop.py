"""The whole training loop against the step alone, on the built-in image benchmark (the demo's generalist).

    python benchmarks/training_loop.py [--rounds 3] [--workers 0 1]

Generates the default benchmark (PNG files) into a temporary folder and prepares two runs of it, one decoding
every image every epoch and one with `data.decoded_cache: true`. Then, round after round, times one epoch of each
way of feeding the demo's generalist (batch 128, AdamW, crops and flips as the demo trains):

- the step alone: forward, backward and update on one batch of random tensors, as many steps as an epoch has;
- the loop: the trainer's batches (`EpochBatches`) through the training Dataset and a DataLoader with `--workers`
  worker processes, decoding PNG files, then the same step;
- the loop reading the decoded cache instead.

Reports median images/s of each and the loop's share of the step's rate (the goal: 0.9 or more).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kc.config import ModelConfig, TrainConfig, config_from_dict
from kc.data.benchmark import PRESETS, generate_benchmark
from kc.data.dataset import ImageDataset, collate, dense_targets
from kc.demo import DEMO_CONFIG
from kc.models.classifier import build_classifier
from kc.run import Run, prepare_run
from kc.train.trainer import EpochBatches, make_optimizer


def prepared(root: Path, manifest: Path, cached: bool) -> Run:
    data = {
        "manifest": str(manifest),
        "taxonomy": str(manifest.parent / "taxonomy.json"),
        "image_size": PRESETS["default"].image_size,
        "decoded_cache": cached,
    }
    return prepare_run(config_from_dict({**DEMO_CONFIG, "run_dir": str(root / f"run-{cached}"), "data": data}), False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = generate_benchmark(root / "benchmark", PRESETS["default"], progress=False)
        runs = {cached: prepared(root, manifest, cached) for cached in (False, True)}
        run = runs[False]
        classes = run.taxonomy.num_classes
        model = build_classifier(ModelConfig.model_validate(DEMO_CONFIG["model"]), classes)
        tcfg = TrainConfig.model_validate(DEMO_CONFIG["generalist"])
        optimizer = make_optimizer(model, tcfg)
        model.train()

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            logits = model(images)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, dense_targets(labels, classes), reduction="sum"
            ) / len(images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        samples = run.splits["train"]
        steps = EpochBatches.per_epoch(len(samples), tcfg.batch_size)
        size = run.cfg.data.image_size
        random_images = torch.randn(tcfg.batch_size, 3, size, size)
        random_labels = torch.randint(0, classes, (tcfg.batch_size, 1))

        def step_alone(epoch: int) -> int:
            for _ in range(steps):
                step(random_images, random_labels)
            return steps * tcfg.batch_size

        def loop(which: Run, workers: int) -> Callable[[int], int]:
            def epoch_of(epoch: int) -> int:
                dataset = ImageDataset(which.splits["train"], which.image_root, which.cfg.data, True, 0, which.decoded)
                dataset.set_epoch(epoch)
                batches = EpochBatches(len(dataset), tcfg.batch_size, 0, epoch)
                loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers)
                images = 0
                for batch in loader:
                    step(batch["images"], batch["labels"])
                    images += len(batch["images"])
                return images

            return epoch_of

        ways = {"step alone (random tensors)": step_alone}
        for workers in args.workers:
            ways[f"loop, decoding PNGs, {workers} workers"] = loop(runs[False], workers)
            ways[f"loop, decoded cache, {workers} workers"] = loop(runs[True], workers)
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for epoch in range(args.rounds + 1):  # the first round warms up
            for name, fn in ways.items():
                start = time.perf_counter()
                images = fn(epoch)
                if epoch:
                    rates[name].append(images / (time.perf_counter() - start))
        print(
            f"default benchmark: {len(samples):,} training images of {size} px, batch {tcfg.batch_size}, "
            f"{torch.get_num_threads()} threads, medians of {args.rounds} epochs"
        )
        alone = statistics.median(rates["step alone (random tensors)"])
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"{name:>40}: {rate:8,.0f} images/s  ({rate / alone:.2f}x the step alone)")


if __name__ == "__main__":
    main()
