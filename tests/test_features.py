"""Precomputed features: the feature benchmark, manifests naming .npy rows, and heads trained on them."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from kc.config import config_from_dict
from kc.data.dataset import ImageDataset
from kc.data.feature_benchmark import FeatureBenchmarkSpec, class_centres, generate_feature_benchmark
from kc.errors import DataError
from kc.run import prepare_run
from kc.train.generalist import train_generalist

SPEC = FeatureBenchmarkSpec(verticals=3, classes_per_vertical=8, train_per_class=20, val_images=60, test_images=60)


def feature_config(bench, run_dir, manifest="manifest.jsonl"):
    return config_from_dict(
        {
            "run_dir": str(run_dir),
            "data": {"manifest": str(bench / manifest), "taxonomy": str(bench / "taxonomy.json")},
            "model": {"backbone": "kc_features", "backbone_args": {"dim": SPEC.dim}, "head": {"hidden": [32, 16]}},
            "generalist": {"epochs": 3, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}},
        }
    )


def test_feature_benchmark_is_seeded_and_structured(tmp_path):
    a = generate_feature_benchmark(tmp_path / "a", SPEC)
    b = generate_feature_benchmark(tmp_path / "b", SPEC)
    assert (tmp_path / "a/features.npy").read_bytes() == (tmp_path / "b/features.npy").read_bytes()
    assert a.read_text() == b.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 3 * 8 * 20 + 60 + 60
    features = np.load(tmp_path / "a/features.npy")
    assert features.shape == (len(rows), SPEC.dim) and features.dtype == np.float16
    # Verticals lie far apart, a vertical's classes close together: mean distance to the own vertical's class
    # centres is below that to another vertical's.
    labels = np.array([int(r["labels"][0][1:4]) * 8 + int(r["labels"][0][-3:]) for r in rows])
    centres = np.stack([features[labels == c].astype(np.float32).mean(0) for c in range(24)])
    d = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    same = np.array([[i // 8 == j // 8 and i != j for j in range(24)] for i in range(24)])
    other = np.array([[i // 8 != j // 8 for j in range(24)] for i in range(24)])
    assert d[same].mean() < 0.5 * d[other].mean()
    # class_centres replays the generator's design: each class's training images lie around its centre
    clean = [r for r in rows if r["split"] == "train"]
    design = class_centres(SPEC)
    nearest = np.linalg.norm(features[: len(clean), None].astype(np.float32) - design[None], axis=-1).argmin(1)
    agree = np.mean(nearest == labels[: len(clean)])
    assert 0.7 < agree < 0.9, agree  # label noise 0.2 moves a fifth of the labels to another class
    assert np.mean(nearest == (labels[: len(clean)] + 1) % 24) < 0.2  # against a wrong pairing of the classes


def test_heads_train_on_feature_rows(tmp_path):
    generate_feature_benchmark(tmp_path / "bench", SPEC)
    run = prepare_run(feature_config(tmp_path / "bench", tmp_path / "run"), progress=False)
    features = np.load(tmp_path / "bench/features.npy")
    dataset = ImageDataset(run.splits["train"], run.image_root, run.cfg.data, train=True)
    x, labels, index = dataset[5]
    row = int(run.splits["train"][5].path.split("#")[1])
    assert torch.equal(x, torch.from_numpy(features[row].astype(np.float32)))  # no augmentation, no normalising
    result = train_generalist(run, progress=False, verbose=False)
    assert result.best_metric > 100 / 24 * 2  # well above chance (1/24 of the classes per image)


def test_bad_feature_rows_are_reported_with_their_line(tmp_path):
    bench = tmp_path / "bench"
    generate_feature_benchmark(bench, SPEC)
    lines = (bench / "manifest.jsonl").read_text().splitlines()
    for number, (path, why) in enumerate(
        [("features.npy#999999", "row 999999 outside its"), ("missing.npy#1", "image file not found")]
    ):
        bad = list(lines)
        bad[3] = json.dumps({"path": path, "labels": ["v000.c000"], "split": "train"})
        (bench / "bad.jsonl").write_text("\n".join(bad) + "\n")
        with pytest.raises(DataError) as err:
            prepare_run(feature_config(bench, tmp_path / f"run{number}", "bad.jsonl"), progress=False)
        assert "bad.jsonl:4" in str(err.value) and why in str(err.value)


def test_feature_noise_is_a_seeded_draw_per_epoch_on_training_rows_only(tmp_path):
    generate_feature_benchmark(tmp_path / "bench", SPEC)
    cfg = feature_config(tmp_path / "bench", tmp_path / "run")
    run = prepare_run(cfg, progress=False)
    noisy_cfg = cfg.data.model_copy(update={"augment": cfg.data.augment.model_copy(update={"feature_noise": 0.5})})
    clean = ImageDataset(run.splits["train"], run.image_root, cfg.data, train=True, seed=3)[7][0]
    train = ImageDataset(run.splits["train"], run.image_root, noisy_cfg, train=True, seed=3)
    first = train[7][0]
    assert torch.equal(train[7][0], first)  # the same view within an epoch (workers, resumes)
    assert 0.3 < (first - clean).std() < 0.7  # noise of the configured size
    train.set_epoch(1)
    assert not torch.allclose(train[7][0], first)  # a fresh draw each epoch
    evaluation = ImageDataset(run.splits["train"], run.image_root, noisy_cfg, train=False, seed=3)
    assert torch.equal(evaluation[7][0], clean)  # val, test and teachers' caches read the rows as they are


def test_a_batch_of_feature_rows_is_the_rows_read_one_by_one(tmp_path):
    """The DataLoader reads a batch at once (`__getitems__`: one gather per array); the tensors are those of
    `__getitem__`, rows of two arrays and seeded feature noise included."""
    generate_feature_benchmark(tmp_path / "bench", SPEC)
    cfg = feature_config(tmp_path / "bench", tmp_path / "run")
    run = prepare_run(cfg, progress=False)
    np.save(tmp_path / "bench/other.npy", np.random.default_rng(0).normal(size=(5, SPEC.dim)).astype(np.float16))
    samples = list(run.splits["train"][:6]) + [dataclasses.replace(run.splits["train"][0], path="other.npy#3")]
    noisy = cfg.data.model_copy(update={"augment": cfg.data.augment.model_copy(update={"feature_noise": 0.5})})
    for data_cfg in (cfg.data, noisy):
        dataset = ImageDataset(samples, run.image_root, data_cfg, train=True, seed=2)
        indices = [6, 2, 0, 5, 2]
        for (x, labels, index), i in zip(dataset.__getitems__(indices), indices, strict=True):
            one_x, one_labels, one_index = dataset[i]
            assert torch.equal(x, one_x) and torch.equal(labels, one_labels) and index == one_index == i
    bad = ImageDataset([dataclasses.replace(samples[0], path="other.npy#5")], run.image_root, cfg.data, train=False)
    with pytest.raises(IndexError, match="row 5 outside its 5 rows"):
        bad.__getitems__([0])


def test_feature_rows_are_checked_per_array(tmp_path):
    from kc.data.features import feature_problems

    generate_feature_benchmark(tmp_path / "bench", SPEC)
    rows = len(np.load(tmp_path / "bench/features.npy", mmap_mode="r"))
    (tmp_path / "bench/cut.npy").write_bytes((tmp_path / "bench/features.npy").read_bytes()[:500])
    paths = [
        "features.npy#0",
        "features.npy#-1",
        f"features.npy#{rows}",
        "missing.npy#0",
        "features.npy#x",
        "cut.npy#0",
    ]
    problems = feature_problems(tmp_path / "bench", paths)
    assert problems[0] is None
    assert "row -1 outside" in problems[1] and f"row {rows} outside its {rows} rows" in problems[2]
    assert problems[3] == "file not found" and "must be a row number" in problems[4]
    assert problems[5]  # a truncated array cannot be mapped
