"""Training steps of the student (every class vs sampled verticals) against the generalist's, side by side.

    python benchmarks/student_steps.py RUN_DIR [--sampled-verticals 40] [--steps 8] [--json out.json]

RUN_DIR is a run whose generalist and soft-target cache are built (e.g. the 100K feature run of docs/BENCHMARKS.md),
or, with `--synthetic`, a run directory (or config) of which only the data is needed: the models start from random
weights and the cache holds random top-K logits for each training image's verticals, written and memory-mapped
as `kc cache-targets` writes them (a step's cost does not depend on the values), and the sampled student is timed
a second time with its targets read by the previous cache reader (benchmarks/cache_lookup.py).
On the same batches of the run's training data (batch = student.batch_size), the script times optimizer steps of:
the generalist's loss as configured (e.g. `generalist.sampled_negatives`), the student's loss over every class (the
paper), and the student's loss over each image's verticals plus N drawn ones (`student.sampled_verticals`), all
from the cache; with `--padded-too`, also that loss with each image's own vertical padded to the largest. Steps
are interleaved, model after model, so that the machine's drift hits all alike; the first round is a warm-up.
Reports median step seconds, the ratios to the generalist step, and epoch estimates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cache_lookup import Shards, previous_blocks, synthetic_shards  # benchmarks/cache_lookup.py, beside this script
from torch.utils.data import DataLoader

from kc.config import load_config
from kc.data.dataset import ImageDataset, collate
from kc.distill.cached_teachers import CachedTeachers
from kc.distill.loss import sum_terms
from kc.distill.sampled import SampledVerticalsLoss
from kc.distill.targets import BlockTargets
from kc.run import prepare_run
from kc.stages import CONTROL, STUDENT, best_weights, file_digest, new_model, specialist_dir
from kc.train.common import ground_truth_loss, start_from_generalist
from kc.train.specialists import vertical_members
from kc.train.student import student_loss
from kc.train.trainer import make_optimizer
from kc.train.unlabeled import student_training_samples


def synthetic_teachers(run, folder: Path) -> tuple[CachedTeachers, CachedTeachers]:
    """Random top-K logits (descending) and distinct classes for every (training image, vertical) pair of the run,
    in the cache's layout, memory-mapped; read by the current reader and by the previous one."""
    tax, scfg = run.taxonomy, run.cfg.student
    members = vertical_members(run.splits["train"], tax.vertical_of_class, tax.num_verticals)
    rows, logits, classes = synthetic_shards(folder, members, tax.vertical_sizes(), scfg.top_k)
    teachers = CachedTeachers.from_arrays(tax, rows, logits, classes, scfg.top_k, scfg.temperature, scfg.unselected)
    previous = PreviousReader.from_arrays(tax, rows, logits, classes, scfg.top_k, scfg.temperature, scfg.unselected)
    previous.shards = (rows, logits, classes)
    return teachers, previous


class PreviousReader(CachedTeachers):
    """The cache reader before 2026-12-02 (benchmarks/cache_lookup.py), to measure the current one against."""

    shards: Shards

    def blocks(self, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor) -> BlockTargets:
        return previous_blocks(self, self.shards, labels, sample_index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sampled-verticals", type=int, default=40)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (after one warm-up step)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--synthetic", action="store_true", help="random weights and a random cache (see above)")
    parser.add_argument("--skip-full", action="store_true", help="leave out the student's loss over every class")
    parser.add_argument(
        "--padded-too",
        action="store_true",
        help="also the sampled student with every row of its own verticals padded to the largest (before 2026-12-04)",
    )
    args = parser.parse_args()

    config = args.run_dir / "config.yaml" if args.run_dir.is_dir() else args.run_dir
    run = prepare_run(load_config(config), progress=False)
    scfg, tax = run.cfg.student, run.taxonomy
    if args.synthetic:
        work = tempfile.TemporaryDirectory()  # the synthetic cache, removed when the script ends
        teachers, previous = synthetic_teachers(run, Path(work.name))

        def start(stage: str) -> torch.nn.Module:
            return new_model(run, stage)
    else:
        digests = [file_digest(best_weights(specialist_dir(run, v))) for v in range(tax.num_verticals)]
        teachers = CachedTeachers(
            run, student_training_samples(run), digests, scfg.top_k, scfg.temperature, scfg.unselected
        )

        def start(stage: str) -> torch.nn.Module:
            return start_from_generalist(run, stage)

    weights, cpu = torch.ones(tax.num_verticals), torch.device("cpu")
    gcfg = run.cfg.generalist
    setups = {"generalist": (start(CONTROL), ground_truth_loss(gcfg.loss, tax.num_classes, gcfg.sampled_negatives))}
    for name, drawn in (
        ("student, every class", None),
        (f"student, {args.sampled_verticals} drawn verticals", args.sampled_verticals),
    ):
        if name == "student, every class" and args.skip_full:
            continue
        scfg.sampled_verticals = drawn
        setups[name] = (start(STUDENT), student_loss(scfg, tax.num_classes, teachers, weights, cpu))
    if args.padded_too:  # the same sampled student, every row of its own verticals padded to the largest vertical
        setups[f"student, {drawn} drawn verticals, rows padded to the largest"] = (
            start(STUDENT),
            SampledVerticalsLoss(
                teachers,
                weights,
                drawn,
                mode=scfg.ground_truth,
                truth_weight=scfg.ground_truth_weight,
                temperature=scfg.temperature,
                unselected=scfg.unselected,
                max_padding=1.0,
            ).terms,
        )
    if args.synthetic:  # the same sampled student, its targets read as before
        setups[f"student, {drawn} drawn verticals, previous reader"] = (
            start(STUDENT),
            student_loss(scfg, tax.num_classes, previous, weights, cpu),
        )
    optimizers = {name: make_optimizer(model, scfg) for name, (model, _) in setups.items()}

    dataset = ImageDataset(run.splits["train"], run.image_root, run.cfg.data, train=True, seed=0)
    loader = iter(DataLoader(dataset, batch_size=scfg.batch_size, shuffle=True, collate_fn=collate))
    batches = [next(loader) for _ in range(args.steps + 1)]
    times: dict[str, list[float]] = {name: [] for name in setups}
    for i, batch in enumerate(batches):
        for name, (model, loss_fn) in setups.items():
            model.train()
            start = time.perf_counter()
            loss = sum_terms(loss_fn(model, batch))
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    steps_per_epoch = -(-len(run.splits["train"]) // scfg.batch_size)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "run": str(args.run_dir),
        "classes": tax.num_classes,
        "verticals": tax.num_verticals,
        "batch_size": scfg.batch_size,
        "step_seconds": median,
        "vs_generalist": {name: s / median["generalist"] for name, s in median.items()},
        "epoch_minutes": {name: s * steps_per_epoch / 60 for name, s in median.items()},
    }
    print(
        f"{tax.num_classes:,} classes in {tax.num_verticals:,} verticals, batch {scfg.batch_size}, "
        f"{args.steps} steps each (medians)"
    )
    for name in setups:
        print(
            f"  {name:55s} {median[name]:8.3f} s/step  {result['vs_generalist'][name]:6.2f}x generalist  "
            f"{result['epoch_minutes'][name]:7.1f} min/epoch"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
