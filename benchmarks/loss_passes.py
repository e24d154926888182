"""The summed cross-entropy (kc.cross_entropy) against torch's elementwise one, in the student's and the ground-truth
control's training steps, side by side.

    python benchmarks/loss_passes.py RUN_DIR [--steps 10] [--json out.json]

RUN_DIR is a run whose generalist and soft-target cache are built (e.g. a `paper-10k` seed, with unlabeled images and
`student.ground_truth: weighted`). On the same batches of the student's training images, the script times optimizer
steps of the student (its loss as configured, from the cache) and of the ground-truth control (the student's head,
the generalist's loss), each computed two ways: the terms summed by `kc.cross_entropy.summed_terms` (what kc trains
with), and torch's `binary_cross_entropy_with_logits` entry by entry, then summed (what kc trained with before
2026-12-03; `kc.distill.loss.entry_losses` still computes it). Steps are interleaved, way after way, so that the
machine's drift hits all alike; the first round is a warm-up. Reports median step seconds and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kc.config import load_config
from kc.data.dataset import ImageDataset, collate, dense_targets
from kc.distill.cached_teachers import CachedTeachers
from kc.distill.loss import distillation_weights, entry_losses, sum_terms
from kc.numerics import flush_subnormals_in_this_process
from kc.run import prepare_run
from kc.stages import CONTROL, STUDENT, best_weights, file_digest, specialist_dir
from kc.train.common import ground_truth_loss, start_from_generalist
from kc.train.student import student_loss
from kc.train.trainer import make_optimizer
from kc.train.unlabeled import student_training_samples


def elementwise_student_loss(run, teachers, labelled_images):
    """The student's loss over every class as kc computed it before: torch's cross-entropy per entry, summed."""
    s, num_classes = run.cfg.student, run.taxonomy.num_classes
    weights = torch.ones(run.taxonomy.num_verticals)

    def loss(model, batch):
        images, labels = batch["images"], batch["labels"]
        soft = teachers(images, labels, batch["index"])
        has_truth = None if labelled_images is None else (batch["index"] < labelled_images).unsqueeze(1)
        logits = model(images).float()
        terms = entry_losses(
            logits,
            soft.values,
            dense_targets(labels, num_classes),
            distillation_weights(soft, teachers.vertical_of_class, weights),
            mode=s.ground_truth,
            truth_weight=s.ground_truth_weight,
            temperature=s.temperature,
            has_truth=has_truth,
        )
        return {name: entries.sum() / logits.shape[0] for name, entries in terms.items()}

    return loss


def elementwise_ground_truth_loss(num_classes):
    def loss(model, batch):
        logits = model(batch["images"]).float()
        targets = dense_targets(batch["labels"], num_classes)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per way (after one warm-up step)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    flush_subnormals_in_this_process()  # as every kc command does, before torch starts its threads

    config = args.run_dir / "config.yaml" if args.run_dir.is_dir() else args.run_dir
    run = prepare_run(load_config(config), progress=False)
    scfg, tax = run.cfg.student, run.taxonomy
    samples = student_training_samples(run)
    labelled = len(run.splits["train"]) if run.unlabeled else None
    digests = [file_digest(best_weights(specialist_dir(run, v))) for v in range(tax.num_verticals)]
    teachers = CachedTeachers(run, samples, digests, scfg.top_k, scfg.temperature, scfg.unselected)
    cpu = torch.device("cpu")
    setups = {
        "student, summed terms": (
            STUDENT,
            student_loss(scfg, tax.num_classes, teachers, torch.ones(tax.num_verticals), cpu, labelled),
        ),
        "student, elementwise": (STUDENT, elementwise_student_loss(run, teachers, labelled)),
        "ground-truth control, summed terms": (CONTROL, ground_truth_loss("bce", tax.num_classes)),
        "ground-truth control, elementwise": (CONTROL, elementwise_ground_truth_loss(tax.num_classes)),
    }
    models = {name: start_from_generalist(run, STUDENT) for name in setups}  # the student's head for all four
    optimizers = {name: make_optimizer(model, scfg) for name, model in models.items()}

    dataset = ImageDataset(samples, run.image_root, run.cfg.data, train=True, seed=0)
    loader = iter(DataLoader(dataset, batch_size=scfg.batch_size, shuffle=True, collate_fn=collate))
    batches = [next(loader) for _ in range(args.steps + 1)]
    times: dict[str, list[float]] = {name: [] for name in setups}
    for i, batch in enumerate(batches):
        for name, (_, loss_fn) in setups.items():
            model = models[name].train()
            start = time.perf_counter()
            loss = sum_terms(loss_fn(model, batch))
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        "student": median["student, elementwise"] / median["student, summed terms"],
        "ground-truth control": median["ground-truth control, elementwise"]
        / median["ground-truth control, summed terms"],
    }
    print(
        f"{tax.num_classes:,} classes, batch {scfg.batch_size}, {args.steps} steps each (medians), "
        f"{torch.get_num_threads()} threads"
    )
    for name in setups:
        print(f"  {name:40s} {median[name] * 1000:8.1f} ms/step")
    for name, ratio in ratios.items():
        print(f"  {name}: summed terms {ratio:.2f}x faster a step")
    if args.json:
        args.json.write_text(json.dumps({"step_seconds": median, "speedup": ratios}, indent=1))


if __name__ == "__main__":
    main()
