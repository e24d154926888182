"""The soft-target cache: same targets as the online teachers, reopened, resumed per shard, stale caches refused."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_config
from kc.config import config_from_dict
from kc.data.dataset import ImageDataset, collate
from kc.distill.cache import build_cache
from kc.distill.cache_format import cache_dir
from kc.distill.cached_teachers import CachedTeachers
from kc.distill.targets import OnlineTeachers
from kc.errors import CheckpointError
from kc.pipeline import run_pipeline
from kc.run import prepare_run


class Crash(Exception):
    pass


@pytest.fixture
def run(tmp_path, tiny_benchmark):
    return prepare_run(config_from_dict(tiny_config(tiny_benchmark, tmp_path / "run")), progress=False)


def teachers(run, seed=0, other=True):
    """Stand-in specialists: fixed random linear models over the pixels, with an 'other' output."""
    torch.manual_seed(seed)
    sizes = [run.taxonomy.vertical_size(v) for v in range(run.taxonomy.num_verticals)]
    return [nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, n + int(other))) for n in sizes]


def train_batches(run, batch_size=10):
    dataset = ImageDataset(run.splits["train"], run.image_root, run.cfg.data, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, shuffle=False)
    return list(loader)


@pytest.mark.parametrize(("top_k", "temperature", "unselected"), [(2, 1.0, "zero"), (3, 2.0, "ignore")])
def test_cached_targets_equal_online_targets_on_the_same_images(run, top_k, temperature, unselected):
    models = teachers(run)
    digests = [f"d{v}" for v in range(len(models))]
    build_cache(run, run.splits["train"], models, digests, top_k=3, device=torch.device("cpu"), batch_size=7)
    online = OnlineTeachers(models, run.taxonomy, top_k, temperature, unselected)
    cached = CachedTeachers(run, run.splits["train"], digests, top_k, temperature, unselected)
    reopened = CachedTeachers(run, run.splits["train"], digests, top_k, temperature, unselected)
    for batch in train_batches(run):
        a = online(batch["images"], batch["labels"])
        b = cached(batch["images"], batch["labels"], batch["index"])
        torch.testing.assert_close(b.values, a.values, rtol=0, atol=1e-6)
        assert torch.equal(b.defined, a.defined) and torch.equal(b.selected, a.selected)
        assert ((b.values > 0).sum(dim=1) <= top_k * b.selected.sum(dim=1)).all()
        torch.testing.assert_close(reopened(batch["images"], batch["labels"], batch["index"]).values, b.values)
    shards = json.loads((cache_dir(run) / "index.json").read_text())["shards"]
    assert sorted(shards) == ["0", "1", "2"] and all(s["images"] > 0 for s in shards.values())


def test_building_resumes_per_shard_and_rebuilds_only_stale_teachers(run, tmp_path):
    models = teachers(run)
    digests = ["a", "b", "c"]
    built = []

    def crash_after_first(v):
        built.append(v)
        if len(built) == 1:
            raise Crash

    with pytest.raises(Crash):
        build_cache(
            run, run.splits["train"], models, digests, top_k=3, device=torch.device("cpu"), on_shard=crash_after_first
        )
    assert list(json.loads((cache_dir(run) / "index.json").read_text())["shards"]) == ["0"]
    build_cache(run, run.splits["train"], models, digests, top_k=3, device=torch.device("cpu"), on_shard=built.append)
    assert built == [0, 1, 2]  # the finished shard was not rebuilt
    files = {p.name: p.read_bytes() for p in cache_dir(run).glob("*.npy")}

    retrained = teachers(run, seed=1)
    build_cache(
        run,
        run.splits["train"],
        [models[0], retrained[1], models[2]],
        ["a", "b2", "c"],
        top_k=3,
        device=torch.device("cpu"),
        on_shard=built.append,
    )
    assert built[3:] == [1]  # only the teacher whose weights changed
    after = {p.name: p.read_bytes() for p in cache_dir(run).glob("*.npy")}
    assert after["teacher_000.logits.npy"] == files["teacher_000.logits.npy"]
    assert after["teacher_001.logits.npy"] != files["teacher_001.logits.npy"]


def test_a_stale_or_short_cache_is_refused_with_the_fix(run):
    build_cache(run, run.splits["train"], teachers(run), ["a", "b", "c"], top_k=2, device=torch.device("cpu"))
    with pytest.raises(CheckpointError, match="built from other specialist weights .*`kc cache-targets RUN`"):
        CachedTeachers(run, run.splits["train"], ["a", "B", "c"], 2, 1.0)
    with pytest.raises(CheckpointError, match="fewer than student.top_k=3 .* --top-k 3"):
        CachedTeachers(run, run.splits["train"], ["a", "b", "c"], 3, 1.0)
    run.splits["train"] = run.splits["train"][:-1]  # the training split changed
    with pytest.raises(CheckpointError, match="other training images"):
        CachedTeachers(run, run.splits["train"], ["a", "b", "c"], 2, 1.0)


def test_pipeline_with_cached_teachers(tmp_path, tiny_benchmark):
    data = tiny_config(tiny_benchmark, tmp_path / "run")
    epochs = {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "checkpoint_every_steps": 4}
    data["specialists"] = dict(epochs)
    data["student"] = {**epochs, "teachers": "cache", "top_k": 2}
    data["control"] = False
    run = prepare_run(config_from_dict(data), progress=False)
    result = run_pipeline(run, progress=False, verbose=False)
    assert (cache_dir(run) / "index.json").is_file()
    assert "cache" in json.loads((run.dir / "timings.json").read_text())
    student = next(m for m in result["models"] if m["model"] == "student")
    assert 0 <= student["mAP"] <= 100


@pytest.mark.parametrize("how", ["truncated", "zero bytes", "bit flipped"])
def test_a_damaged_cache_array_is_refused_naming_it(run, how):
    from test_integrity import damage

    models = teachers(run)
    digests = [f"d{v}" for v in range(len(models))]
    build_cache(run, run.splits["train"], models, digests, top_k=3, device=torch.device("cpu"), batch_size=7)
    CachedTeachers(run, run.splits["train"], digests, 3, 1.0)  # intact: opens
    damage(cache_dir(run) / "teacher_001.logits.npy", how)
    with pytest.raises(CheckpointError, match=r"teacher_001.logits.npy: damaged"):
        CachedTeachers(run, run.splits["train"], digests, 3, 1.0)


def test_cached_targets_of_multi_label_images_are_each_selected_teachers_top_k():
    """Every (image, selected vertical) pair gets sigmoid(logit / T) of its teacher's top k at those classes, 0
    elsewhere, whatever the mix of verticals in the batch (images of one, two or three verticals)."""
    from kc.taxonomy import ClassInfo, Taxonomy, Vertical

    sizes = [4, 2, 5]
    verticals = [Vertical(f"v{v}", f"v{v}") for v in range(3)]
    taxonomy = Taxonomy(verticals, [ClassInfo(f"c{v}{i}", "", f"v{v}") for v, n in enumerate(sizes) for i in range(n)])
    starts = [0, 4, 6]
    rng = np.random.default_rng(0)
    images = [[0], [4, 7], [1, 2, 5, 10], [6], [3, 8], [5]]  # class indices per training image
    rows, logits, classes = [], [], []
    for v, n in enumerate(sizes):
        mine = np.array([i for i, labels in enumerate(images) if any(starts[v] <= c < starts[v] + n for c in labels)])
        k = min(3, n)
        rows.append(mine)
        logits.append(np.sort(rng.normal(size=(len(mine), k)).astype(np.float32), axis=1)[:, ::-1].copy())
        classes.append(np.stack([rng.permutation(n)[:k] for _ in mine]).astype(np.int32))
    teachers = CachedTeachers.from_arrays(taxonomy, rows, logits, classes, top_k=2, temperature=2.0)
    order = [2, 0, 5, 1, 4, 3]  # a batch in another order than the training split
    labels = torch.full((len(order), 4), -1, dtype=torch.long)
    for b, i in enumerate(order):
        labels[b, : len(images[i])] = torch.tensor(images[i])
    targets = teachers(torch.zeros(len(order), 1), labels, torch.tensor(order))
    expected = torch.zeros(len(order), sum(sizes))
    for b, i in enumerate(order):
        for v, n in enumerate(sizes):
            if any(starts[v] <= c < starts[v] + n for c in images[i]):
                at = int(np.searchsorted(rows[v], i))
                for j in range(2):
                    expected[b, starts[v] + classes[v][at, j]] = torch.sigmoid(torch.tensor(logits[v][at, j] / 2.0))
    torch.testing.assert_close(targets.values, expected, rtol=0, atol=1e-6)
    assert targets.selected.sum().item() == sum(len(r) for r in rows)
