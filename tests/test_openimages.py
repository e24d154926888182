"""Open Images import on hand-written files in exactly that format; verified negatives through to evaluation."""

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from kc.cli import app
from kc.data.samples import load_manifest
from kc.evaluate.metrics import average_precision, verified_targets
from kc.taxonomy import Taxonomy

HIERARCHY = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {"LabelName": "/m/animal", "Subcategory": [{"LabelName": "/m/dog"}, {"LabelName": "/m/cat"}]},
        {
            "LabelName": "/m/vehicle",
            "Subcategory": [
                {"LabelName": "/m/car", "Subcategory": [{"LabelName": "/m/taxi"}]},
                {"LabelName": "/m/dog"},
            ],
        },
    ],
}
DESCRIPTIONS = "/m/animal,Animal\n/m/dog,Dog\n/m/cat,Cat\n/m/vehicle,Vehicle\n/m/car,Car\n/m/taxi,Taxi\n/m/x,Other\n"
LABELS = """ImageID,Source,LabelName,Confidence
img1,verification,/m/dog,1
img1,verification,/m/cat,0
img2,verification,/m/taxi,1
img2,verification,/m/animal,0
img3,verification,/m/x,1
img3,verification,/m/car,0
img4,verification,/m/cat,1
"""


def write_inputs(tmp_path):
    (tmp_path / "hierarchy.json").write_text(json.dumps(HIERARCHY))
    (tmp_path / "descriptions.csv").write_text(DESCRIPTIONS)  # headerless, as some releases ship it
    (tmp_path / "labels.csv").write_text(LABELS)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("img1", "img2", "img3"):  # img4 is missing
        Image.new("RGB", (8, 8)).save(images / f"{name}.jpg")


def imported(tmp_path, out):
    """Import the hand-written files (no split) into `out`."""
    from kc.data.openimages import import_openimages

    inputs = (tmp_path / "descriptions.csv", tmp_path / "hierarchy.json", tmp_path / "images")
    import_openimages([(tmp_path / "labels.csv", None)], *inputs, out)


def test_import_writes_taxonomy_and_manifest_with_verified_negatives(tmp_path):
    write_inputs(tmp_path)
    out = tmp_path / "kc"
    result = CliRunner().invoke(
        app,
        [
            "import-openimages",
            "--labels",
            f"{tmp_path / 'labels.csv'}:train",
            "--descriptions",
            str(tmp_path / "descriptions.csv"),
            "--hierarchy",
            str(tmp_path / "hierarchy.json"),
            "--images",
            str(tmp_path / "images"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "3 images, 2 present and 3 verified-absent labels" in result.output
    assert "dropped 1 annotations of 1 labels" in result.output and "1 images not found" in result.output

    taxonomy = Taxonomy.load(out / "taxonomy.json")
    assert [v.name for v in taxonomy.verticals] == ["Animal", "Vehicle"]
    assert {c.id: c.vertical for c in taxonomy.classes}["/m/dog"] == "vertical:/m/animal"  # first met in the DAG
    assert [taxonomy.classes[i].id for i in taxonomy.ancestors(taxonomy.class_index["/m/taxi"])] == [
        "/m/car",
        "/m/vehicle",
    ]

    samples = {s.path.split("/")[-1]: s for s in load_manifest(out / "manifest.jsonl", out, taxonomy)}
    ids = lambda idx: sorted(taxonomy.classes[i].id for i in idx)  # noqa: E731
    assert ids(samples["img1.jpg"].labels) == ["/m/dog"] and ids(samples["img1.jpg"].negatives) == ["/m/cat"]
    assert samples["img1.jpg"].split == "train"
    assert ids(samples["img3.jpg"].labels) == [] and ids(samples["img3.jpg"].negatives) == ["/m/car"]

    expanded = {s.path.split("/")[-1]: s for s in load_manifest(out / "manifest.jsonl", out, taxonomy, True)}
    assert ids(expanded["img2.jpg"].labels) == ["/m/car", "/m/taxi", "/m/vehicle"]  # present: up the hierarchy
    assert ids(expanded["img2.jpg"].negatives) == ["/m/animal", "/m/cat", "/m/dog"]  # absent: down it
    assert ids(expanded["img3.jpg"].negatives) == ["/m/car", "/m/taxi"]


def test_a_class_is_scored_only_on_images_verified_for_it(tmp_path):
    write_inputs(tmp_path)
    out = tmp_path / "kc"

    imported(tmp_path, out)
    taxonomy = Taxonomy.load(out / "taxonomy.json")
    samples = load_manifest(out / "manifest.jsonl", out, taxonomy)
    dense = np.zeros((len(samples), taxonomy.num_classes))
    for i, s in enumerate(samples):
        dense[i, list(s.labels)] = 1
    targets = verified_targets(dense, samples)
    dog, cat = taxonomy.class_index["/m/dog"], taxonomy.class_index["/m/cat"]
    # dog: verified on img1 only (present); the high-scoring unverified images do not count against it
    scores = np.full(targets.shape, 0.9)
    scores[:, dog] = [0.1, 0.9, 0.9]
    assert average_precision(scores, targets)[dog] == 1.0
    assert average_precision(scores, dense)[dog] < 1.0  # without the rule, unverified images are negatives
    assert np.isnan(average_precision(scores, targets)[cat])  # cat: verified only as absent: no positive
    assert verified_targets(dense, [s.with_split("test") for s in samples]).min() == -1


def test_verified_negatives_survive_the_run_directory(tmp_path):
    from kc.config import config_from_dict
    from kc.run import prepare_run

    write_inputs(tmp_path)
    out = tmp_path / "kc"
    imported(tmp_path, out)
    data = {"manifest": str(out / "manifest.jsonl"), "taxonomy": str(out / "taxonomy.json"), "image_size": 8}
    first = prepare_run(config_from_dict({"run_dir": str(tmp_path / "run"), "data": data}), progress=False)
    again = prepare_run(config_from_dict({"run_dir": str(tmp_path / "run"), "data": data}), progress=False)
    negatives = lambda run: sorted((s.path, s.negatives) for split in run.splits.values() for s in split)  # noqa: E731
    assert negatives(again) == negatives(first) and any(n for _, n in negatives(first))
