"""`kc demo`: the main job on the built-in benchmark, end to end, with wall time per stage."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kc.config import config_from_dict, merge, parse_override
from kc.data.benchmark import PRESETS, generate_benchmark
from kc.errors import KCError
from kc.evaluate.report import metrics_table
from kc.io import atomic_write_json
from kc.run import prepare_run
from kc.train.stages import evaluate_stage, train_generalist

# The demo's generalist is small on purpose (a 4-8-16 channel CNN): on the default benchmark it is limited by
# capacity on the fine distinctions, the regime where specialists and knowledge concentration help. The numbers
# behind this choice are in docs/BENCHMARKS.md (benchmarks/specialist_gap.py).
DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "data": {"image_size": 32},
    "model": {
        "backbone": "kc_convnet",
        "backbone_args": {"widths": [4, 8, 16], "depth": 2},
        "head": {"hidden": [256, 64]},
    },
    "generalist": {
        "epochs": 30,
        "batch_size": 128,
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
    },
}


def run_demo(
    run_dir: Path,
    preset: str,
    overrides: list[str],
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    if preset not in PRESETS:
        raise KCError(f"--preset: '{preset}' is not one of {', '.join(PRESETS)}")
    run_dir = run_dir.resolve()
    timings: dict[str, float] = {}

    start = time.perf_counter()
    spec = PRESETS[preset]
    manifest = generate_benchmark(run_dir / "benchmark", spec, progress=progress)
    timings["generate benchmark"] = time.perf_counter() - start

    data = merge(
        DEMO_CONFIG,
        {
            "run_dir": str(run_dir / "run"),
            "data": {
                "manifest": str(manifest),
                "taxonomy": str(manifest.parent / "taxonomy.json"),
                "image_size": spec.image_size,
            },
        },
    )
    for text in overrides:
        data = merge(data, parse_override(text))
    cfg = config_from_dict(data, source="kc demo")

    start = time.perf_counter()
    run = prepare_run(cfg, progress=progress)
    timings["prepare data"] = time.perf_counter() - start
    start = time.perf_counter()
    train_generalist(run, progress=progress)
    timings["train generalist"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_stage(run, "generalist", "test", progress=progress)
    timings["evaluate"] = time.perf_counter() - start

    atomic_write_json(run.dir / "demo_timings.json", timings)
    echo(
        f"\nGeneralist on the built-in benchmark ({preset}: {spec.verticals} verticals x "
        f"{spec.classes_per_vertical} classes), test split, {metrics['images']} images:\n"
    )
    echo(metrics_table(metrics, run.taxonomy))
    echo("\nwall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    echo(f"run directory: {run.dir}")
    return metrics
