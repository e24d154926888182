"""Student epoch with the soft-target cache vs a generalist epoch (and vs online teachers), side by side.

    python benchmarks/cache_epoch.py RUN_DIR [--rounds 3] [--work DIR] [--json out.json]

RUN_DIR is a finished run (generalist and specialists trained, e.g. by `kc demo`). The script copies what it needs
to a work directory, builds the cache there (`kc cache-targets`, timed), then trains, round after round, one epoch
of each: the generalist on ground truth, the student from the cache, the student with online teachers. Same data
loading (augmented views, as in training), same batch size and optimizer; epochs interleaved so that the machine's
drift hits all three alike. Reports median epoch seconds, the ratios to the generalist epoch (goal for the cache:
at most 1.15) and the cache's size per training image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kc.config import load_config
from kc.data.dataset import ImageDataset, collate
from kc.distill.cache import CachedTeachers, cache_bytes
from kc.distill.targets import OnlineTeachers
from kc.run import prepare_run
from kc.train.common import (
    STUDENT,
    best_weights,
    file_digest,
    ground_truth_loss,
    load_specialists,
    specialist_dir,
    start_from_generalist,
)
from kc.train.student import cache_targets, student_loss
from kc.train.trainer import make_optimizer


def one_epoch(model, loss_fn, loader, optimizer) -> float:
    model.train()
    start = time.perf_counter()
    for batch in loader:
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json")
    args = parser.parse_args()
    source = args.run_dir.resolve()
    work = (args.work or source.parent / "cache_epoch").resolve()
    if not (work / "config.yaml").is_file():
        work.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "taxonomy.json", "data", "generalist", "specialists"):
            src = source / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    run = prepare_run(load_config(work / "config.yaml", {"run_dir": str(work)}), progress=False)
    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    index = cache_targets(run, progress=False)
    build_seconds = time.perf_counter() - start

    device = torch.device("cpu")
    scfg = run.cfg.student
    digests = [file_digest(best_weights(specialist_dir(run, v))) for v in range(run.taxonomy.num_verticals)]
    weights = torch.ones(run.taxonomy.num_verticals)
    sources = {
        "cache": CachedTeachers(run, digests, scfg.top_k, scfg.temperature, scfg.unselected),
        "online": OnlineTeachers(load_specialists(run), run.taxonomy, scfg.top_k, scfg.temperature, scfg.unselected),
    }
    setups = {
        "generalist": (
            start_from_generalist(run, "control"),  # the generalist's architecture in the student's head structure
            ground_truth_loss(run.cfg.generalist.loss, run.taxonomy.num_classes),
        ),
        "student (cache)": (start_from_generalist(run, STUDENT), student_loss(run, sources["cache"], weights, device)),
        "student (online)": (
            start_from_generalist(run, STUDENT),
            student_loss(run, sources["online"], weights, device),
        ),
    }
    dataset = ImageDataset(run.splits["train"], run.image_root, run.cfg.data, train=True, seed=0)
    loader = DataLoader(dataset, batch_size=scfg.batch_size, shuffle=True, collate_fn=collate)
    optimizers = {name: make_optimizer(model, scfg) for name, (model, _) in setups.items()}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(args.rounds):
        for name, (model, loss_fn) in setups.items():
            times[name].append(one_epoch(model, loss_fn, loader, optimizers[name]))
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)

    medians = {name: statistics.median(t) for name, t in times.items()}
    size = cache_bytes(run)
    pairs = sum(s["images"] for s in index["shards"].values())
    result = {
        "epoch_seconds": medians,
        "cache_vs_generalist": medians["student (cache)"] / medians["generalist"],
        "online_vs_generalist": medians["student (online)"] / medians["generalist"],
        "cache_build_seconds": build_seconds,
        "cache_bytes": size,
        "bytes_per_training_image": size / len(run.splits["train"]),
        "bytes_per_image_teacher_pair": size / pairs,
        "top_k": index["top_k"],
        "train_images": len(run.splits["train"]),
    }
    print(f"\n{len(run.splits['train']):,} training images, batch {scfg.batch_size}, median of {args.rounds} epochs\n")
    print("| epoch | seconds | x generalist epoch |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.2f} | {seconds / medians['generalist']:.2f} |")
    print(
        f"\ncache: built in {build_seconds:.1f} s; {size / 2**20:.1f} MiB, {result['bytes_per_training_image']:,.0f} "
        f"bytes per training image (top {index['top_k']} logits + class indices per image and teacher)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
