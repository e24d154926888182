"""The GPU check: kc's own stages at 100K classes on a GPU, timed, with their peak GPU memory.

    python benchmarks/gpu_check.py OUT                      # a machine with CUDA GPUs: the real check
    python benchmarks/gpu_check.py OUT --dry-run            # any machine: the same steps, tiny, on CPU (the suite)

It writes a synthetic image dataset with 100,000 classes in 20 verticals of unequal sizes (fewer training images than
classes: the check measures speed and memory, not accuracy), then runs the real commands, each under torchrun with
one process per GPU (nccl; gloo in the dry run; the trainer wraps the model in DistributedDataParallel from two
processes on, so a one-GPU machine checks the nccl set-up but not DDP's gradient exchange):

    kc generalist    resnet50, bf16 autocast, torch.compile, the 100K-class head
    kc specialists   20 specialists (bf16, not compiled: 20 compilations would cost more than they save)
    kc cache-targets the specialists' top-K logits, once
    kc distill       the student reading the cache: FC-SC head, bf16, torch.compile
    kc export        the student as TorchScript, then its inference on the GPU

and records, per stage, training images/s (the trainer's own count over its last epoch, compilation included in the
first) and peak GPU memory (`torch.cuda.max_memory_allocated`, per process), and for the export, inference images/s
(median of timed batches) and peak memory. OUT/gpu_check.json holds the figures; the table is printed too.
The dry run uses kc_convnet, 1,000 classes in 10 verticals, a few hundred 32 px images and no compile or AMP, so
that the suite checks that every step still runs. Nothing is downloaded (resnet50 starts from random weights).
Run it with the Python whose PyTorch sees the GPUs, kc installed there (`python -m pip install --no-deps -e .` where
kc's dependencies are already present, or `pip install -e .`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from kc.bench import vertical_sizes
from kc.serve.artifact import read_manifest
from kc.taxonomy import ClassInfo, Taxonomy, Vertical


@dataclass(frozen=True)
class Scale:
    classes: int
    verticals: int
    train: int
    val: int
    image_size: int
    backbone: str
    batch_size: int
    gpu_features: bool  # bf16 autocast and torch.compile
    num_workers: int


REAL = Scale(100_000, 20, 20_480, 2_048, 128, "resnet50", 256, True, 8)
DRY = Scale(1_000, 10, 256, 64, 32, "kc_convnet", 32, False, 0)


def write_dataset(root: Path, scale: Scale, seed: int = 0) -> None:
    """PNG images of random coarse colour blocks, each with one label drawn uniformly over every class; val and
    test halves of `scale.val` images."""
    rng = np.random.default_rng(seed)
    sizes = vertical_sizes(scale.classes, scale.verticals, seed)
    verticals = [Vertical(f"v{v:02d}", f"vertical {v}") for v in range(scale.verticals)]
    classes = [
        ClassInfo(f"v{v:02d}_c{i:05d}", f"class {i} of vertical {v}", f"v{v:02d}")
        for v, size in enumerate(sizes)
        for i in range(size)
    ]
    Taxonomy(verticals, classes, source="gpu check").save(root / "taxonomy.json")
    splits = ["train"] * scale.train + ["val"] * (scale.val // 2) + ["test"] * (scale.val - scale.val // 2)
    labels = rng.integers(0, scale.classes, len(splits))
    rows = ["path,labels,split"]
    (root / "images").mkdir(parents=True, exist_ok=True)
    for n, (split, label) in enumerate(zip(splits, labels, strict=True)):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((scale.image_size, scale.image_size), Image.Resampling.NEAREST)
        name = f"images/{n:06d}.png"
        image.save(root / name, compress_level=1)
        rows.append(f"{name},{classes[label].id},{split}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def write_config(path: Path, data: Path, run: Path, scale: Scale) -> None:
    gpu = scale.gpu_features
    stage = {
        "epochs": 1,
        "batch_size": scale.batch_size,
        "eval_batch_size": 512 if gpu else 64,
        "amp": gpu,
        "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001},
        "checkpoint_every_steps": 100_000,
    }
    config = {
        "run_dir": str(run),
        "seed": 0,
        "device": "auto",
        "data": {
            "manifest": str(data / "manifest.csv"),
            "taxonomy": str(data / "taxonomy.json"),
            "image_size": scale.image_size,
            "num_workers": scale.num_workers,
            "decoded_cache": True,
        },
        "model": {
            "backbone": scale.backbone,
            "head": {"hidden": [1024, 256] if gpu else [64, 16], "output_bias": "prior"},
        },
        "generalist": {**stage, "compile": gpu},
        "specialists": {**stage, "compile": False},
        "student": {
            **stage,
            "compile": gpu,
            "teachers": "cache",
            "head": {"structure": "fc-sc"},
            "self_paced": {"variant": "none"},
        },
        "control": False,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def kc_command(args: list[str], processes: int, torchrun: bool = True) -> list[str]:
    """`kc ARGS` under torchrun with `processes` processes (torchrun starts a module: kc.cli is the kc command), or
    as one plain process where torchrun's rendezvous cannot run (`--launcher none`)."""
    if not torchrun:
        return [sys.executable, "-m", "kc.cli", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [*launcher, "-m", "kc.cli", *args]


def run_step(name: str, command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"gpu check: {name} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def last_epoch(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "checkpoints" / "last.json").read_text())["history"][-1]


def stage_figures(stage_dir: Path) -> dict:
    epoch = last_epoch(stage_dir)
    return {"train_images_per_s": epoch["images_per_s"], "peak_gpu_mib": epoch.get("peak_device_mib")}


def specialist_figures(run: Path) -> dict:
    epochs = [last_epoch(d) for d in sorted((run / "specialists").iterdir()) if (d / "checkpoints").is_dir()]
    peaks = [e["peak_device_mib"] for e in epochs if "peak_device_mib" in e]
    return {
        "train_images_per_s": statistics.median(e["images_per_s"] for e in epochs),
        "peak_gpu_mib": max(peaks) if peaks else None,
        "specialists": len(epochs),
    }


def export_figures(export_dir: Path, scale: Scale, batches: int = 20) -> dict:
    """The exported TorchScript student's inference on the device: median images/s over timed batches."""
    manifest = read_manifest(export_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torch.jit.load(str(export_dir / manifest["file"]), map_location=device).eval()
    images = torch.randn(scale.batch_size, 3, scale.image_size, scale.image_size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    with torch.no_grad():
        for n in range(batches + 3):  # 3 warm-up batches (TorchScript optimises on its first calls)
            start = time.perf_counter()
            model(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if n >= 3:
                rates.append(scale.batch_size / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"inference_images_per_s": statistics.median(rates), "peak_gpu_mib": peak, "batch": scale.batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="work folder: data, run, logs, gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny, on CPU: checks that every step runs")
    parser.add_argument("--processes", type=int, default=None, help="torchrun processes (default: one per GPU)")
    parser.add_argument(
        "--launcher",
        choices=["torchrun", "none"],
        default="torchrun",
        help="none: each stage as one plain process, without torchrun (one GPU only)",
    )
    args = parser.parse_args()

    scale = DRY if args.dry_run else REAL
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu check: no CUDA GPU here; run it with --dry-run to check the steps on CPU")
    processes = args.processes or (1 if args.dry_run else torch.cuda.device_count())
    torchrun = args.launcher == "torchrun"
    if not torchrun and processes != 1:
        raise SystemExit(f"gpu check: --launcher none runs one process, not {processes}; add --processes 1")
    out = args.out.resolve()
    data, run, log = out / "data", out / "run", out / "log.txt"
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "manifest.csv").is_file():
        write_dataset(data, scale)
    config = out / "config.yaml"
    write_config(config, data, run, scale)

    seconds = {}
    for name, command in (
        ("generalist", kc_command(["generalist", str(config), "--no-progress"], processes, torchrun)),
        ("specialists", kc_command(["specialists", str(config), "--no-progress"], processes, torchrun)),
        ("cache", kc_command(["cache-targets", str(config), "--no-progress"], processes, torchrun)),
        ("student", kc_command(["distill", str(config), "--no-progress"], processes, torchrun)),
        (
            "export",
            [sys.executable, "-m", "kc.cli", "export", str(run), "--format", "torchscript", "--parity-images", "256"],
        ),
    ):
        seconds[name] = run_step(name, command, log)
    export_dir = run / "export" / "student-torchscript"

    result = {
        "scale": asdict(scale),
        "processes": processes,
        "launcher": args.launcher,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "command_seconds": seconds,
        "generalist": stage_figures(run / "generalist"),
        "specialists": specialist_figures(run),
        "student": stage_figures(run / "student"),
        "export": export_figures(export_dir, scale),
        "date": time.strftime("%Y-%m-%d"),
        "environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    print(f"{result['device']}, {processes} process(es), {scale.classes:,} classes, {scale.backbone}")
    print("| stage | images/s | peak GPU MiB | command s |\n|---|---:|---:|---:|")
    for name, key in (
        ("generalist", "train_images_per_s"),
        ("specialists", "train_images_per_s"),
        ("student", "train_images_per_s"),
        ("export", "inference_images_per_s"),
    ):
        figures = result[name]
        print(f"| {name} | {figures[key]:,.0f} | {mib(figures['peak_gpu_mib'])} | {seconds[name]:.0f} |")


if __name__ == "__main__":
    main()
