"""Shared fixtures: a tiny built-in benchmark and a config for it. Everything seeded, offline, CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kc.data.benchmark import PRESETS, generate_benchmark

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 verticals x 4 classes of 16x16 images; returns the directory holding manifest.csv and taxonomy.json."""
    out = tmp_path_factory.mktemp("bench") / "tiny"
    generate_benchmark(out, PRESETS["tiny"], progress=False)
    return out


def tiny_config(bench: Path, run_dir: Path, **generalist: Any) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "seed": 0,
        "data": {
            "manifest": str(bench / "manifest.csv"),
            "taxonomy": str(bench / "taxonomy.json"),
            "image_size": 16,
        },
        "model": {
            "backbone": "kc_convnet",
            "backbone_args": {"widths": [8, 16], "depth": 1},
            "head": {"hidden": [32, 16], "dropout": 0.1},
        },
        "generalist": {
            "epochs": 2,
            "batch_size": 16,
            "eval_batch_size": 64,
            "checkpoint_every_steps": 2,
            "optimizer": {"name": "sgd", "lr": 0.05},
            **generalist,
        },
    }
