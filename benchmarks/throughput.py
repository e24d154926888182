"""Training and inference images/s of a model config, measured side by side in one process.

    python benchmarks/throughput.py [--device cpu|cuda] [--repeats 5] [--json out.json]

Times whole optimizer steps (forward, backward, update) and no-grad forward passes on random tensors of the
benchmark's image size, so the figures are the model's own cost, decoding excluded. Reports medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from kc.config import ModelConfig, TrainConfig
from kc.demo import DEMO_CONFIG
from kc.models.classifier import build_classifier, count_parameters
from kc.train.trainer import make_optimizer


def measure(device: str, repeats: int, steps: int, num_classes: int, image_size: int) -> dict:
    torch.manual_seed(0)
    model_cfg = ModelConfig.model_validate(DEMO_CONFIG["model"])
    train_cfg = TrainConfig.model_validate(DEMO_CONFIG["generalist"])
    model = build_classifier(model_cfg, num_classes).to(device)
    optimizer = make_optimizer(model, train_cfg)
    bs, ebs = train_cfg.batch_size, train_cfg.eval_batch_size
    x = torch.randn(bs, 3, image_size, image_size, device=device)
    y = (torch.rand(bs, num_classes, device=device) < 1 / num_classes).float()
    xe = torch.randn(ebs, 3, image_size, image_size, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def train_steps() -> None:
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum") / bs
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def infer_steps() -> None:
        for _ in range(steps):
            model(xe)

    results = {}
    for name, fn, per_step in (("train", train_steps, bs), ("inference", infer_steps, ebs)):
        model.train(name == "train")
        fn()  # warm-up
        rates = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            rates.append(steps * per_step / (time.perf_counter() - start))
        results[f"{name}_images_per_s"] = statistics.median(rates)
    results["parameters"] = count_parameters(model)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--classes", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    res = measure(args.device, args.repeats, args.steps, args.classes, args.image_size)
    res.update(
        device=args.device,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        torch=torch.__version__,
    )
    for key, value in res.items():
        print(f"{key:>24}: {value:.0f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
