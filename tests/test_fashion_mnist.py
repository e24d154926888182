"""Fashion-MNIST from its original IDX files: read exactly, split seeded, refused clearly when absent or damaged."""

import csv
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kc.cli import app
from kc.data.fashion_mnist import CLASSES, VERTICALS, import_fashion_mnist
from kc.errors import DataError
from kc.taxonomy import Taxonomy


def write_idx(path, array, magic, compress):
    data = struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def tiny_source(root, train=30, test=20):
    rng = np.random.default_rng(0)
    root.mkdir()
    arrays = {}
    for split, n, compress in (("train", train, True), ("t10k", test, False)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(root / f"{split}-images-idx3-ubyte{'.gz' if compress else ''}", images, 2051, compress)
        write_idx(root / f"{split}-labels-idx1-ubyte{'.gz' if compress else ''}", labels, 2049, compress)
        arrays[split] = (images, labels)
    return arrays


def test_the_idx_files_become_pngs_a_manifest_and_a_taxonomy_of_three_verticals(tmp_path):
    arrays = tiny_source(tmp_path / "src")
    manifest = import_fashion_mnist(tmp_path / "out", tmp_path / "src", seed=0, progress=False)
    rows = list(csv.DictReader(manifest.open()))
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [30, 10, 10]
    taxonomy = Taxonomy.load(tmp_path / "out/taxonomy.json")
    assert [v.id for v in taxonomy.verticals] == list(VERTICALS) and taxonomy.num_classes == len(CLASSES) == 10
    first = rows[7]  # train image 7, label 7: a sneaker, footwear
    assert first["labels"] == "sneaker" and taxonomy.classes[taxonomy.class_index["sneaker"]].vertical == "footwear"
    pixels = np.asarray(Image.open(tmp_path / "out" / first["path"]))
    assert np.array_equal(pixels, arrays["train"][0][7])  # the image exactly, grey
    again = import_fashion_mnist(tmp_path / "again", tmp_path / "src", seed=0, progress=False)
    assert again.read_text() == manifest.read_text()  # seeded
    other = import_fashion_mnist(tmp_path / "other", tmp_path / "src", seed=1, progress=False)
    assert other.read_text() != manifest.read_text()  # another draw of the val/test halves


def test_train_per_class_keeps_a_seeded_draw_of_each_class_and_every_val_and_test_image(tmp_path):
    arrays = tiny_source(tmp_path / "src", train=60)  # 6 training images of each class
    whole = list(csv.DictReader(import_fashion_mnist(tmp_path / "whole", tmp_path / "src", progress=False).open()))
    few = import_fashion_mnist(tmp_path / "few", tmp_path / "src", progress=False, train_per_class=2)
    rows = list(csv.DictReader(few.open()))
    train = [r for r in rows if r["split"] == "train"]
    assert sorted({r["labels"] for r in train}) == sorted({r["labels"] for r in whole}) and len(train) == 20
    assert all(sum(r["labels"] == c for r in train) == 2 for c in {r["labels"] for r in train})
    # val and test are the same halves as without the option
    assert [r for r in rows if r["split"] != "train"] == [r for r in whole if r["split"] != "train"]
    kept = {tuple(np.asarray(Image.open(tmp_path / "few" / r["path"])).ravel()[:16]) for r in train}
    assert kept <= {tuple(image.ravel()[:16]) for image in arrays["train"][0]}  # real training images
    again = import_fashion_mnist(tmp_path / "again", tmp_path / "src", progress=False, train_per_class=2)
    assert again.read_text() == few.read_text()
    with pytest.raises(DataError, match="--train-per-class: 0 must be at least 1"):
        import_fashion_mnist(tmp_path / "none", tmp_path / "src", progress=False, train_per_class=0)


def test_absent_or_damaged_files_are_refused_naming_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*give --source"):
        import_fashion_mnist(tmp_path / "out", tmp_path / "nowhere", progress=False)
    tiny_source(tmp_path / "src")
    (tmp_path / "src/t10k-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2051, 20) + bytes(20))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: not an IDX label file"):
        import_fashion_mnist(tmp_path / "out", tmp_path / "src", progress=False)
    result = CliRunner().invoke(app, ["import-fashion-mnist", str(tmp_path / "out"), "--source", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Fashion-MNIST IDX file not found" in result.output


def test_the_example_config_reads_what_the_importer_writes(tmp_path):
    from kc.config import load_config
    from kc.run import prepare_run

    tiny_source(tmp_path / "src")
    out = tmp_path / "data"
    import_fashion_mnist(out, tmp_path / "src", progress=False)
    example = Path(__file__).parents[1] / "examples/fashion-mnist.yaml"
    overrides = {
        "run_dir": str(tmp_path / "run"),
        "data": {"manifest": str(out / "manifest.csv"), "taxonomy": str(out / "taxonomy.json")},
    }
    run = prepare_run(load_config(example, overrides), progress=False)
    assert {s: len(run.splits[s]) for s in ("train", "val", "test")} == {"train": 30, "val": 10, "test": 10}
    assert run.taxonomy.num_verticals == 3


def test_each_seed_imports_its_own_draw_for_the_whole_pipeline(tmp_path, monkeypatch):
    import yaml

    from kc.data import fashion_mnist
    from kc.seeds import _seed_config

    tiny_source(tmp_path / "src", train=60)  # 6 training images of each class
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "src")
    config = tmp_path / "fm.yaml"
    base = yaml.safe_load((Path(__file__).parents[1] / "examples/fashion-mnist.yaml").read_text())
    base["run_dir"] = str(tmp_path / "runs")
    config.write_text(yaml.safe_dump(base))
    drawn = {}
    for seed in (0, 1):
        cfg, _ = _seed_config(base, config, seed, "fashion-mnist", None, 2, None, progress=False)
        rows = list(csv.DictReader(open(cfg.data.manifest)))
        train = [r for r in rows if r["split"] == "train"]
        assert cfg.data.manifest == tmp_path / f"runs/seed_{seed}/benchmark/manifest.csv"
        assert len(train) == 20 and {r["labels"] for r in train} == {fashion_mnist.class_id(c) for c in CLASSES}
        drawn[seed] = sorted(Image.open(cfg.data.manifest.parent / r["path"]).tobytes() for r in rows)
    assert drawn[0] != drawn[1]  # another seed, another draw of training images


def test_seeds_refuses_label_noise_on_real_images(tmp_path):
    from kc.errors import KCError
    from kc.seeds import run_seeds

    config = tmp_path / "fm.yaml"
    config.write_text("run_dir: runs\n")
    with pytest.raises(KCError, match="--label-noise"):
        run_seeds(config, [0], "fashion-mnist", label_noise=0.2, progress=False)
    with pytest.raises(KCError, match="--train-per-class"):
        run_seeds(config, [0], None, train_per_class=5, progress=False)
