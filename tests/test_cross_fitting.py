"""Cross-fitted teachers (specialists.folds): each training image is taught by a specialist that never saw it."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from kc.checkpoint import CheckpointDir
from kc.config import config_from_dict
from kc.data.dataset import ImageDataset, collate
from kc.data.samples import Sample
from kc.data.splits import training_folds
from kc.distill.cache_format import cache_dir
from kc.errors import ConfigError
from kc.pipeline import run_pipeline
from kc.run import prepare_run
from kc.stages import load_fold_specialists, specialist_dir, training_fold_of
from kc.train.controls import total_compute_epochs
from kc.train.specialists import fold_training_samples, specialist_training_samples


def test_folds_are_seeded_balanced_and_stay_put_when_images_are_added():
    samples = [Sample(f"img/{i}.png", (0,), "train", "m.csv:1") for i in range(3000)]
    folds = training_folds(samples, 3, seed=5)
    assert training_folds(samples, 3, seed=5) == folds
    assert training_folds(samples, 3, seed=6) != folds
    counts = np.bincount(folds, minlength=3)
    assert counts.min() > 900 and counts.sum() == 3000
    more = [Sample("img/new.png", (1,), "train", "m.csv:1"), *samples[::-1]]
    assert training_folds(more, 3, seed=5)[1:] == folds[::-1]  # by path, not by position


def test_cross_fitted_teachers_need_the_cache(tiny_benchmark, tmp_path):
    data = tiny_config(tiny_benchmark, tmp_path / "run")
    data["specialists"] = {"folds": 2}
    data["student"] = {"teachers": "online"}
    with pytest.raises(ConfigError, match="specialists.folds > 1 .* student.teachers"):
        config_from_dict(data)


@pytest.fixture(scope="module")
def cross_fitted_run(tiny_benchmark, tmp_path_factory):
    data = tiny_config(tiny_benchmark, tmp_path_factory.mktemp("xfit") / "run")
    epochs = {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "checkpoint_every_steps": 4}
    data["specialists"] = {**epochs, "folds": 2}
    data["student"] = {**epochs, "top_k": 2}  # teachers: auto, which cross-fitting resolves to the cache
    data["controls"] = {"kinds": ["total_compute"]}
    run = prepare_run(config_from_dict(data), progress=False)
    return run, run_pipeline(run, progress=False, verbose=False)


def test_each_fold_specialist_trains_without_its_fold(cross_fitted_run):
    run, _ = cross_fitted_run
    fold_of = training_fold_of(run)
    assert set(fold_of) == {0, 1}
    paths = {s.path: f for s, f in zip(run.splits["train"], fold_of, strict=True)}
    for fold in (0, 1):
        kept = fold_training_samples(run, fold)
        assert kept and all(paths[s.path] != fold for s in kept)
        assert len(kept) == sum(f != fold for f in fold_of)
    for v in range(run.taxonomy.num_verticals):
        for fold in (0, 1):
            assert (specialist_dir(run, v, fold) / "checkpoints" / "best.safetensors").is_file()


def test_every_image_is_taught_by_the_specialist_of_its_fold(cross_fitted_run):
    run, _ = cross_fitted_run
    fold_of = np.array(training_fold_of(run))
    train = run.splits["train"]
    for v in range(run.taxonomy.num_verticals):
        start, end = run.taxonomy.vertical_ranges[v]
        rows = np.load(cache_dir(run) / f"teacher_{v:03d}.rows.npy")
        cached = np.load(cache_dir(run) / f"teacher_{v:03d}.logits.npy")
        members = load_fold_specialists(run, v)
        dataset = ImageDataset([train[i] for i in rows], run.image_root, run.cfg.data, train=False)
        images = collate([dataset[i] for i in range(len(dataset))])["images"]
        with torch.no_grad():
            by_fold = [m.eval()(images)[:, : end - start].topk(cached.shape[1], dim=1).values for m in members]
        own = torch.stack([by_fold[f][i] for i, f in enumerate(fold_of[rows])]).numpy()
        other = torch.stack([by_fold[1 - f][i] for i, f in enumerate(fold_of[rows])]).numpy()
        np.testing.assert_allclose(cached, own, rtol=0, atol=1e-5)
        assert not np.allclose(cached, other, atol=1e-5)  # the fold's specialist, not the other one


def test_the_report_and_the_total_compute_control_count_every_fold(cross_fitted_run):
    run, result = cross_fitted_run
    oracle = next(m for m in result["models"] if m["stage"] == "specialists_oracle")
    assert oracle["networks_per_image"] == 2 * run.taxonomy.num_verticals
    metrics = json.loads((run.dir / "metrics.json").read_text())
    specialists = next(r for r in metrics["parameters"]["models"] if r["model"].startswith("specialists"))
    assert specialists["networks"] == 2 * run.taxonomy.num_verticals

    def steps(stage_dir):
        return CheckpointDir(stage_dir / "checkpoints").read_state()["step"]

    spent = steps(run.stage_dir("student")) * 16
    for v in range(run.taxonomy.num_verticals):
        for fold in (0, 1):
            samples = len(specialist_training_samples(run, v, fold_training_samples(run, fold)))
            spent += steps(specialist_dir(run, v, fold)) * min(16, samples)
    per_epoch = (len(run.splits["train"]) // 16) * 16
    assert total_compute_epochs(run) == math.ceil(spent / per_epoch)
