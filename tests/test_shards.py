"""WebDataset shards: kc make-shards, training from shards, splitting them across workers and processes, bad shards."""

import io
import json
import tarfile

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from conftest import tiny_config
from kc.cli import app
from kc.config import load_config
from kc.data.dataset import ImageDataset, collate
from kc.errors import DataError
from kc.run import prepare_run
from kc.train.generalist import train_generalist
from kc.train.trainer import EpochBatches

runner = CliRunner()


def shard_config(tmp_path, manifest_config):
    data = yaml.safe_load(manifest_config.read_text())
    data["data"] = {"shards": str(tmp_path / "shards"), "image_size": 16}
    data["run_dir"] = str(tmp_path / "from-shards")
    path = tmp_path / "shards.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def both(tmp_path, tiny_benchmark):
    """A manifest config, the shards made from it (3 shards of 100) and a config that reads them."""
    manifest_config = tmp_path / "manifest.yaml"
    manifest_config.write_text(yaml.safe_dump(tiny_config(tiny_benchmark, tmp_path / "from-manifest")))
    result = runner.invoke(
        app, ["make-shards", str(manifest_config), "--out", str(tmp_path / "shards"), "--shard-size", "100"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 3 shards" in result.output
    return load_config(manifest_config), load_config(shard_config(tmp_path, manifest_config))


def test_shards_hold_the_manifests_samples_splits_and_image_bytes(both):
    from_manifest, from_shards = (prepare_run(cfg, progress=False) for cfg in both)
    assert from_shards.taxonomy.fingerprint() == from_manifest.taxonomy.fingerprint()
    for split in ("train", "val", "test"):
        a, b = from_manifest.splits[split], from_shards.splits[split]
        assert [s.labels for s in a] == [s.labels for s in b]
        assert all(t.path.startswith("shard-") and ".tar/" in t.path for t in b)
        images = [
            ImageDataset(x, run.image_root, run.cfg.data, train=False)
            for x, run in ((a, from_manifest), (b, from_shards))
        ]
        for i in range(0, len(a), 7):
            assert torch.equal(images[0][i][0], images[1][i][0])


def test_training_from_shards_equals_training_from_the_manifest(both):
    weights = []
    for cfg in both:
        run = prepare_run(cfg, progress=False)
        weights.append(load_file(str(train_generalist(run, progress=False, verbose=False).best_weights)))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_batches_split_across_loader_workers_and_processes_without_overlap_or_loss(both):
    run = prepare_run(both[1], progress=False)
    dataset = ImageDataset(run.splits["train"], run.image_root, run.cfg.data, train=True)
    n, batch = len(dataset), 16
    steps = EpochBatches.per_epoch(n, batch)
    seen = []
    for rank in range(2):  # 2 processes, each reading its part of every batch with 2 loader workers
        sampler = EpochBatches(n, batch, seed=0, epoch=1, rank=rank, world=2)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate)
        parts = [b["index"].tolist() for b in loader]
        assert len(parts) == steps and all(len(p) == batch // 2 for p in parts)
        seen.append(parts)
    everything = [i for rank in seen for part in rank for i in part]
    assert len(everything) == len(set(everything)) == steps * batch  # no image twice
    whole = list(EpochBatches(n, batch, seed=0, epoch=1))
    assert [a + b for a, b in zip(*seen, strict=True)] == whole  # nothing lost: the two parts are the batch


def test_an_interrupted_conversion_resumes_and_keeps_finished_shards(tmp_path, both):
    shards = tmp_path / "shards"
    kept = (shards / "shard-000000.tar").stat().st_mtime_ns
    (shards / "shard-000002.tar").unlink()
    (shards / "shards.json").unlink()
    result = runner.invoke(
        app, ["make-shards", str(tmp_path / "manifest.yaml"), "--out", str(shards), "--shard-size", "100"]
    )
    assert result.exit_code == 0, result.output
    assert (shards / "shard-000000.tar").stat().st_mtime_ns == kept
    assert (shards / "shard-000002.tar").is_file() and not list(shards.glob(".*.tmp"))
    assert json.loads((shards / "shards.json").read_text())["images"] == 228


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_shards_written_by_other_tools_and_bad_shards(tmp_path, tiny_benchmark, both):
    shards = tmp_path / "shards"
    (shards / "shards.json").unlink()  # a plain folder of WebDataset tars reads as well, in name order
    cfg = both[1]
    cfg.run_dir = tmp_path / "plain"
    assert len(prepare_run(cfg, progress=False).splits["train"]) == len(
        prepare_run(both[0], progress=False).splits["train"]
    )

    png = next(tiny_benchmark.rglob("*.png")).read_bytes()
    with tarfile.open(shards / "zz-extra.tar", "w") as tar:
        add(tar, "a.png", png)
        add(tar, "a.json", json.dumps({"labels": ["no-such-class"]}).encode())
        add(tar, "b.png", png)  # no labels
        add(tar, "c.png", png)
        add(tar, "c.json", b"{not json")
    with pytest.raises(DataError) as err:
        prepare_run(cfg.model_copy(update={"run_dir": tmp_path / "bad"}), progress=False)
    text = str(err.value)
    assert "zz-extra.tar:a: unknown class id 'no-such-class'" in text
    assert "zz-extra.tar:b: no b.json with a 'labels' list" in text
    assert "zz-extra.tar:c.json: not valid JSON" in text

    (shards / "zz-extra.tar").write_bytes((shards / "shard-000000.tar").read_bytes()[:5000])  # truncated
    with pytest.raises(DataError, match="zz-extra.tar"):
        prepare_run(cfg.model_copy(update={"run_dir": tmp_path / "cut"}), progress=False)
