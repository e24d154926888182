import csv
from dataclasses import replace

import pytest

from kc.data.benchmark import PRESETS, generate_benchmark
from kc.errors import DataError
from kc.taxonomy import Taxonomy

SMALL = replace(PRESETS["tiny"], train_per_class=3, val_per_class=1, test_per_class=1)


def rows(out):
    with open(out / "manifest.csv") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    generate_benchmark(tmp_path / "a", SMALL, progress=False)
    generate_benchmark(tmp_path / "b", SMALL, progress=False)
    generate_benchmark(tmp_path / "c", replace(SMALL, seed=1), progress=False)
    first = rows(tmp_path / "a")[0]["path"]
    assert (tmp_path / "a" / first).read_bytes() == (tmp_path / "b" / first).read_bytes()
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "c" / first).read_bytes()
    assert (tmp_path / "a" / "manifest.csv").read_text() == (tmp_path / "b" / "manifest.csv").read_text()


def test_layout_taxonomy_and_counts(tmp_path):
    generate_benchmark(tmp_path, SMALL, progress=False)
    tax = Taxonomy.load(tmp_path / "taxonomy.json")
    assert tax.num_verticals == 3 and tax.num_classes == 12
    r = rows(tmp_path)
    assert len(r) == 12 * 5
    assert {x["split"] for x in r} == {"train", "val", "test"}
    assert all(x["labels"] in tax.class_index for x in r)
    # Re-running is a no-op; a different spec in the same place is refused.
    generate_benchmark(tmp_path, SMALL, progress=False)
    with pytest.raises(DataError, match=r"another spec \(differs in: seed\)"):
        generate_benchmark(tmp_path, replace(SMALL, seed=5), progress=False)  # message names the key: seed


def test_multilabel_images_carry_two_verticals(tmp_path):
    generate_benchmark(tmp_path, replace(SMALL, multilabel_fraction=0.5), progress=False)
    tax = Taxonomy.load(tmp_path / "taxonomy.json")
    multi = [x["labels"].split(";") for x in rows(tmp_path) if ";" in x["labels"]]
    assert 10 < len(multi) < 50
    for labels in multi:
        assert len(labels) == 2
        assert len({tax.classes[tax.class_index[c]].vertical for c in labels}) == 2


def test_invalid_spec(tmp_path):
    with pytest.raises(DataError, match="fine_bits"):
        generate_benchmark(tmp_path, replace(SMALL, fine_bits=0), progress=False)


def test_bytes_do_not_depend_on_the_process(tmp_path):
    """Python randomises str hashes per process: nothing in the generator may depend on them."""
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from kc.data.benchmark import PRESETS, generate_benchmark; "
        "from dataclasses import replace; "
        "generate_benchmark(Path(sys.argv[1]), replace(PRESETS['tiny'], train_per_class=1, val_per_class=1, "
        "test_per_class=1), progress=False)"
    )
    for name, seed in (("a", "1"), ("b", "2")):
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / name)],
            check=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": seed},
        )
    paths = sorted((tmp_path / "a" / "images").rglob("*.png"))
    assert len(paths) == 12 * 3
    for path in paths:
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_label_noise_swaps_training_labels_within_the_vertical_only(tmp_path):
    spec = replace(SMALL, train_per_class=10, label_noise=0.3)
    generate_benchmark(tmp_path / "noisy", spec, progress=False)
    generate_benchmark(tmp_path / "clean", replace(spec, label_noise=0.0), progress=False)
    noisy, clean = rows(tmp_path / "noisy"), rows(tmp_path / "clean")
    assert [r["path"] for r in noisy] == [r["path"] for r in clean]
    changed = 0
    for n, c in zip(noisy, clean, strict=True):
        assert (tmp_path / "noisy" / n["path"]).read_bytes() == (tmp_path / "clean" / c["path"]).read_bytes()
        if n["labels"] != c["labels"]:
            changed += 1
            assert n["split"] == "train"
            assert n["labels"].split(".")[0] == c["labels"].split(".")[0]  # same vertical, other class
    assert 20 < changed < 55  # about 30% of the 120 training labels (expected 36)
