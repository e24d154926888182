"""`kc bench`: the figures the method is judged by, measured side by side in one process, as ratios.

1. Inference: images/s of the student, the generalist and the specialists' ensemble (every specialist on every
   image), forward passes on the same preprocessed batches, interleaved (goals: student >= 0.9 x generalist, and
   >= 0.9 x K x ensemble, i.e. the student really is one network).
2. Training: one epoch of the student reading the soft-target cache, of the student with online teachers, and of
   the generalist's architecture on ground truth, interleaved (goal: cache <= 1.15 x generalist).
3. Head cost at 1K, 10K and 100K classes in 20 verticals (the paper's count): dense FC-FC against FC-SC, forward +
   backward (goal: FC-SC <= 1.3 x FC-FC at equal output size), and against a per-vertical loop.
4. Peak memory of one training step of the run's student architecture with a 100K-class head (fresh subprocess).

Work files (the cache, links to the run's data and teachers) go to RUN/bench/, so the run itself is untouched.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from kc.config import load_config
from kc.data.dataset import ImageDataset, collate
from kc.distill.cached_teachers import CachedTeachers
from kc.distill.loss import sum_terms
from kc.distill.targets import OnlineTeachers
from kc.models.heads import DenseHead
from kc.models.structured import StructuredHead
from kc.run import Run, prepare_run
from kc.stages import (
    CONTROL,
    GENERALIST,
    STUDENT,
    load_specialists,
    load_stage,
    new_generalist_model,
)
from kc.train.common import ground_truth_loss, start_from_generalist
from kc.train.student import cache_targets, student_loss
from kc.train.teacher_choice import online_teachers, teacher_digests
from kc.train.trainer import make_optimizer
from kc.train.unlabeled import student_training_samples

SHARED = ("taxonomy.json", "data", "generalist", "specialists")


# ------------------------------------------------------------------------------------------------- heads
def vertical_sizes(num_classes: int, verticals: int, seed: int = 0) -> list[int]:
    """`verticals` sizes summing to `num_classes`, drawn log-uniformly over a 16x range."""
    weights = 4 ** np.random.default_rng(seed).uniform(-1, 1, verticals)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * num_classes)).astype(int)
    sizes[np.argmax(sizes)] += num_classes - sizes.sum()
    return sizes.tolist()


def build_head(kind: str, sizes: list[int], features: int, hidden: list[int]) -> nn.Module:
    """fc-fc, fc-sc, fc-sc(x) (x = half the block), sc-sc; a trailing ' naive' loops over verticals instead."""
    torch.manual_seed(0)
    if kind == "fc-fc":
        return DenseHead(features, hidden, sum(sizes))
    structure = kind.split()[0].replace("(x)", "")
    head = StructuredHead(features, hidden, sizes, structure, hidden[-1] // 2 if "(x)" in kind else 0)
    if kind.endswith("naive"):
        head.blocks.forward = head.blocks.loop
    return head


def head_step(head: nn.Module, features: torch.Tensor) -> None:
    head.zero_grad(set_to_none=True)
    head(features).square().mean().backward()


def saved_activation_mib(head: nn.Module, features: torch.Tensor) -> float:
    """Memory the forward keeps for the backward (each tensor storage counted once)."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        head(features).square().mean().backward()
    return sum(storages.values()) / 2**20


def time_heads(
    kinds: list[str], sizes: list[int], features: int, hidden: list[int], batch: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Median fwd+bwd ms, parameters and activation MiB of each head, timed round by round."""
    heads = {kind: build_head(kind, sizes, features, hidden) for kind in kinds}
    x = torch.randn(batch, features)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for head in heads.values():
        head_step(head, x)
    for _ in range(repeats):
        for kind, head in heads.items():
            start = time.perf_counter()
            head_step(head, x)
            times[kind].append(time.perf_counter() - start)
    return {
        kind: {
            "ms": 1000 * statistics.median(times[kind]),
            "parameters": sum(p.numel() for p in head.parameters()),
            "activations_mib": saved_activation_mib(head, x),
        }
        for kind, head in heads.items()
    }


# ----------------------------------------------------------------------------------------------- the run
def bench_workspace(run: Run) -> Run:
    """RUN/bench: the run's data and teachers linked, its own cache."""
    directory = run.dir / "bench"
    directory.mkdir(exist_ok=True)
    for name in SHARED:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(run.dir / name, target_is_directory=(run.dir / name).is_dir())
    return prepare_run(load_config(run.dir / "config.yaml", {"run_dir": str(directory)}), progress=False)


def _test_batches(run: Run, batch: int, limit: int) -> list[torch.Tensor]:
    samples = (run.splits["test"] or run.splits["val"] or run.splits["train"])[:limit]
    dataset = ImageDataset(samples, run.image_root, run.cfg.data, train=False, decoded=run.decoded)
    return [b["images"] for b in DataLoader(dataset, batch_size=batch, collate_fn=collate)]


@torch.no_grad()
def inference(run: Run, repeats: int) -> dict[str, Any]:
    batches = _test_batches(run, run.cfg.generalist.eval_batch_size, 1024)
    images = sum(len(b) for b in batches)
    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run)).eval()
    student = start_from_generalist(run, STUDENT).eval()  # speed does not depend on the weights
    specialists = [m.eval() for m in load_specialists(run)]
    models = {
        "student": lambda b: student(b),
        "generalist": lambda b: generalist(b),
        "ensemble": lambda b: [generalist(b)] + [m(b) for m in specialists],
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for forward in models.values():
        forward(batches[0])
    for _ in range(repeats):
        for name, forward in models.items():
            start = time.perf_counter()
            for b in batches:
                forward(b)
            times[name].append(time.perf_counter() - start)
    rates = {name: images / statistics.median(t) for name, t in times.items()}
    k = len(specialists)
    return {
        "images_per_s": rates,
        "specialists": k,
        "student_vs_generalist": rates["student"] / rates["generalist"],
        "student_vs_ensemble": rates["student"] / rates["ensemble"],
        "goal_student_vs_ensemble": 0.9 * k,
    }


def training(run: Run, rounds: int) -> dict[str, Any]:
    cache_targets(run, progress=False)
    scfg = run.cfg.student
    device = torch.device("cpu")
    digests = teacher_digests(run)
    weights = torch.ones(run.taxonomy.num_verticals)
    cached = CachedTeachers(run, student_training_samples(run), digests, scfg.top_k, scfg.temperature, scfg.unselected)
    online = OnlineTeachers(online_teachers(run), run.taxonomy, scfg.top_k, scfg.temperature, scfg.unselected)
    setups = {
        "generalist": (
            start_from_generalist(run, CONTROL),
            ground_truth_loss(run.cfg.generalist.loss, run.taxonomy.num_classes),
        ),
        "student (cache)": (
            start_from_generalist(run, STUDENT),
            student_loss(scfg, run.taxonomy.num_classes, cached, weights, device),
        ),
        "student (online)": (
            start_from_generalist(run, STUDENT),
            student_loss(scfg, run.taxonomy.num_classes, online, weights, device),
        ),
    }
    dataset = ImageDataset(run.splits["train"], run.image_root, run.cfg.data, train=True, seed=0, decoded=run.decoded)
    loader = DataLoader(dataset, batch_size=scfg.batch_size, shuffle=True, collate_fn=collate)
    optimizers = {name: make_optimizer(model, scfg) for name, (model, _) in setups.items()}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, (model, loss_fn) in setups.items():
            model.train()
            start = time.perf_counter()
            for batch in loader:
                loss = sum_terms(loss_fn(model, batch))
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {
        "epoch_seconds": seconds,
        "cache_vs_generalist": seconds["student (cache)"] / seconds["generalist"],
        "online_vs_generalist": seconds["student (online)"] / seconds["generalist"],
    }


def step_memory(config: Path, classes: int, batch: int, sampled_negatives: int | None = None) -> dict[str, float]:
    """Peak RSS of one AdamW ground-truth training step of the run's generalist architecture with `classes`
    outputs (over every class, or sampled negatives), measured in a fresh process (RSS after building the model and
    data, then the high-water mark after two steps)."""
    code = f"""
import json, resource, torch
from kc.config import load_config
from kc.models.classifier import build_classifier
from kc.train.common import ground_truth_loss
cfg = load_config({str(config)!r})
torch.manual_seed(0)
model = build_classifier(cfg.model, {classes})
optimizer = torch.optim.AdamW(model.parameters())
loss_fn = ground_truth_loss("bce", {classes}, {sampled_negatives!r})
batch = {{"images": torch.randn({batch}, 3, cfg.data.image_size, cfg.data.image_size),
          "labels": torch.randint(0, {classes}, ({batch}, 1))}}
statm = open("/proc/self/statm").read().split()
before = int(statm[1]) * resource.getpagesize() / 2**20
for _ in range(2):
    loss = loss_fn(model, batch)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
params = sum(p.numel() for p in model.parameters())
print(json.dumps({{"parameters": params, "rss_before_step_mib": before, "peak_rss_mib": peak}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["step_mib"] = result["peak_rss_mib"] - result["rss_before_step_mib"]
    result["classes"], result["batch"] = classes, batch
    return result


def bench(
    run: Run,
    repeats: int = 5,
    rounds: int = 3,
    head_repeats: int = 5,
    head_classes: tuple[int, ...] = (1000, 10000, 100000),
    memory_classes: int = 100_000,
) -> dict[str, Any]:
    work = bench_workspace(run)
    result: dict[str, Any] = {"inference": inference(work, repeats), "training": training(work, rounds)}
    heads = {}
    for classes in head_classes:
        sizes = vertical_sizes(classes, 20)
        timed = time_heads(["fc-fc", "fc-sc", "fc-sc naive"], sizes, 512, [512, 64], 64, head_repeats)
        heads[str(classes)] = {**timed, "sc_vs_fc": timed["fc-sc"]["ms"] / timed["fc-fc"]["ms"]}
    result["heads"] = heads
    result["memory"] = step_memory(run.dir / "config.yaml", memory_classes, run.cfg.student.batch_size)
    result["machine"] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    return result


def bench_table(r: dict[str, Any]) -> str:
    inf, tr = r["inference"], r["training"]
    rates = inf["images_per_s"]
    lines = [
        "| measure | value | goal |",
        "|---|---:|---:|",
        f"| inference images/s: student / generalist / ensemble of {inf['specialists']} + generalist | "
        f"{rates['student']:,.0f} / {rates['generalist']:,.0f} / {rates['ensemble']:,.0f} | |",
        f"| student ÷ generalist (inference) | {inf['student_vs_generalist']:.2f} | >= 0.90 |",
        f"| student ÷ ensemble (inference) | {inf['student_vs_ensemble']:.2f} | "
        f">= {inf['goal_student_vs_ensemble']:.1f} |",
        f"| training epoch s: student (cache) / student (online) / generalist | "
        f"{tr['epoch_seconds']['student (cache)']:.2f} / {tr['epoch_seconds']['student (online)']:.2f} / "
        f"{tr['epoch_seconds']['generalist']:.2f} | |",
        f"| student (cache) ÷ generalist (training epoch) | {tr['cache_vs_generalist']:.2f} | <= 1.15 |",
        f"| student (online) ÷ generalist (training epoch) | {tr['online_vs_generalist']:.2f} | |",
    ]
    for classes, h in r["heads"].items():
        lines.append(
            f"| {int(classes):,} classes, 20 verticals, batch 64: FC512-SC64 ÷ FC512-FC64 fwd+bwd "
            f"({h['fc-sc']['ms']:.1f} / {h['fc-fc']['ms']:.1f} ms; loop {h['fc-sc naive']['ms']:.1f} ms; weights "
            f"x{h['fc-sc']['parameters'] / h['fc-fc']['parameters']:.2f}) | "
            f"{h['sc_vs_fc']:.2f} | <= 1.30 |"
        )
    m = r["memory"]
    lines.append(
        f"| one training step, {m['classes']:,}-class head, batch {m['batch']} ({m['parameters'] / 1e6:.1f}M "
        "parameters): "
        f"memory above the built model | {m['step_mib']:,.0f} MiB (peak RSS {m['peak_rss_mib']:,.0f} MiB) | |"
    )
    return "\n".join(lines)
