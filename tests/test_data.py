import json

import numpy as np
import pytest
from PIL import Image

from kc.data.images import check_images, decode_rgb
from kc.data.samples import Sample, load_image_folder, load_manifest
from kc.data.splits import assign_splits
from kc.errors import DataError
from kc.taxonomy import Taxonomy

TAX = {
    "verticals": ["bird", "car"],
    "classes": [
        {"id": "sparrow", "vertical": "bird"},
        {"id": "crow", "vertical": "bird"},
        {"id": "sedan", "vertical": "car"},
    ],
}


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.fixture
def taxonomy():
    return Taxonomy.from_dict(TAX)


def test_csv_manifest_multi_label(tmp_path, images, taxonomy):
    m = tmp_path / "m.csv"
    m.write_text("path,labels\n0.png,sparrow\n1.png,sparrow;sedan\n2.png,\n")
    samples = load_manifest(m, images, taxonomy)
    idx = taxonomy.class_index
    assert [s.labels for s in samples] == [
        (idx["sparrow"],),
        tuple(sorted((idx["sparrow"], idx["sedan"]))),
        (),
    ]
    assert samples[1].where == f"{m}:3"
    assert all(s.split is None for s in samples)


def test_jsonl_manifest_with_splits(tmp_path, images, taxonomy):
    m = tmp_path / "m.jsonl"
    m.write_text(
        '{"path": "0.png", "labels": ["crow"], "split": "train"}\n\n'
        '{"path": "1.png", "labels": ["crow", "sedan"], "split": "test"}\n'
    )
    samples = load_manifest(m, images, taxonomy)
    assert [s.split for s in samples] == ["train", "test"]
    assert len(samples[1].labels) == 2


def test_every_problem_reported_with_file_and_line(tmp_path, images, taxonomy):
    m = tmp_path / "m.csv"
    m.write_text("path,labels\n0.png,sparrow\n1.png,penguin\nmissing.png,crow\n0.png,crow\n")
    with pytest.raises(DataError) as info:
        load_manifest(m, images, taxonomy)
    text = str(info.value)
    assert f"{m}:3: unknown class id 'penguin'" in text
    assert f"{m}:4: image file not found" in text and "missing.png" in text
    assert f"{m}:5: duplicate image '0.png' (first at {m}:2)" in text


def test_manifest_format_errors(tmp_path, images, taxonomy):
    m = tmp_path / "m.csv"
    m.write_text("file,labels\n0.png,crow\n")
    with pytest.raises(DataError, match="needs a 'path' column"):
        load_manifest(m, images, taxonomy)
    j = tmp_path / "m.jsonl"
    j.write_text('{"path": "0.png", "labels": ["crow"]}\n{oops\n')
    with pytest.raises(DataError, match=f"{j}:2: not valid JSON"):
        load_manifest(j, images, taxonomy)
    m.write_text("path,labels,split\n0.png,crow,train\n1.png,crow,holdout\n")
    with pytest.raises(DataError, match="split 'holdout' is not one of"):
        load_manifest(m, images, taxonomy)
    m.write_text("path,labels,split\n0.png,crow,train\n1.png,crow,\n")
    with pytest.raises(DataError, match=f"{m}:3: no split"):
        load_manifest(m, images, taxonomy)


def test_expand_ancestors(tmp_path, images):
    tax = Taxonomy.from_dict(
        {
            "verticals": ["bird"],
            "classes": [{"id": "passerine", "vertical": "bird"}, {"id": "sparrow", "parent": "passerine"}],
        }
    )
    m = tmp_path / "m.csv"
    m.write_text("path,labels\n0.png,sparrow\n")
    assert load_manifest(m, images, tax)[0].labels == (tax.class_index["sparrow"],)
    assert load_manifest(m, images, tax, expand_ancestors=True)[0].labels == (0, 1)


def test_image_folder_derives_taxonomy(tmp_path):
    for split in ("train", "test"):
        for v, c in [("bird", "crow"), ("bird", "sparrow"), ("car", "crow")]:
            d = tmp_path / "root" / split / v / c
            d.mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(d / "a.jpg")
            (d / "notes.txt").write_text("not an image")
    tax, samples = load_image_folder(tmp_path / "root")
    assert [v.id for v in tax.verticals] == ["bird", "car"]
    assert [c.id for c in tax.classes] == [
        "bird/crow",
        "bird/sparrow",
        "car/crow",
    ]  # same folder name, distinct ids
    assert len(samples) == 6
    assert {s.split for s in samples} == {"train", "test"}
    with pytest.raises(DataError, match="no <vertical>/<class>/ folders"):
        (tmp_path / "empty").mkdir()
        load_image_folder(tmp_path / "empty")


def test_seeded_split_is_stable_and_roughly_proportional():
    samples = [Sample(f"{i}.png", (0,), None, f"m:{i}") for i in range(2000)]
    a = assign_splits(samples, 0.1, 0.2, seed=3)
    assert a == assign_splits(samples, 0.1, 0.2, seed=3)
    assert a != assign_splits(samples, 0.1, 0.2, seed=4)
    counts = {s: sum(x.split == s for x in a) for s in ("train", "val", "test")}
    assert abs(counts["test"] - 400) < 60 and abs(counts["val"] - 200) < 45
    # Adding images never moves an existing one to another split.
    more = assign_splits(samples + [Sample("new.png", (0,), None, "m:x")], 0.1, 0.2, seed=3)
    assert more[:2000] == a
    # Given splits are kept.
    given = [Sample("g.png", (0,), "val", "m:1")]
    assert assign_splits(given, 0.0, 0.0, seed=0)[0].split == "val"


def test_unreadable_images_fail_before_training_or_are_skipped(tmp_path, images):
    (images / "bad.png").write_bytes(b"\x89PNG not really")
    (images / "empty.png").write_bytes(b"")
    good = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    good.save(images / "trunc.png")
    data = (images / "trunc.png").read_bytes()
    (images / "trunc.png").write_bytes(data[: len(data) // 2])
    samples = [
        Sample(p, (0,), "train", f"m.csv:{i + 2}")
        for i, p in enumerate(["0.png", "bad.png", "empty.png", "trunc.png", "1.png"])
    ]
    with pytest.raises(DataError) as info:
        check_images(samples, images, "fail", progress=False)
    text = str(info.value)
    assert "3 unreadable image(s)" in text and "m.csv:3" in text and "m.csv:4" in text and "m.csv:5" in text
    assert "data.bad_images: skip" in text
    kept, skipped = check_images(samples, images, "skip", progress=False)
    assert [s.path for s in kept] == ["0.png", "1.png"]
    assert [s["path"] for s in skipped] == ["bad.png", "empty.png", "trunc.png"]
    json.dumps(skipped)  # reported in the run directory as JSON


def test_decoding_unusual_modes(tmp_path):
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert decode_rgb(tmp_path / "pal.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("L", (4, 4), 7).save(tmp_path / "gray.png")
    assert decode_rgb(tmp_path / "gray.png").getpixel((0, 0)) == (7, 7, 7)
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert decode_rgb(tmp_path / "cmyk.jpg").mode == "RGB"
    # EXIF orientation 6 (rotate 90 degrees clockwise): a 4x2 image reads as 2x4.
    img = Image.new("RGB", (4, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert decode_rgb(tmp_path / "rot.jpg").size == (2, 4)
    # 16-bit grey: scaled to 8 bits (Pillow's own conversion would turn 40000 of 65535 into white)
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert decode_rgb(tmp_path / "grey16.png").getpixel((0, 0)) == (156, 156, 156)


def test_decompression_bombs_and_oversized_images_are_refused_before_decoding(tmp_path, monkeypatch):
    from kc.data.images import ImageTooLarge, image_problem

    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLarge, match="300x300 pixels exceeds the limit of 50,000"):
        decode_rgb(tmp_path / "big.png", max_pixels=50_000)  # the server's limit, read from the header
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow's bomb limit, lowered to test it
    assert "too large to decode safely" in image_problem(tmp_path / "big.png")


# decode_rgb checks the limit itself; Pillow's own warning, ignored inside it, can still surface from the check's
# threads (warning filters are process-wide)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_data_max_image_pixels_admits_large_images_deliberately(tmp_path, tiny_benchmark, monkeypatch):
    """Above Pillow's bomb limit an image is refused, naming the key that admits it; with data.max_image_pixels
    raised, the run's check, training decode and decoded cache read it; a limit below its size refuses it."""
    import shutil

    from conftest import tiny_config
    from kc.config import config_from_dict
    from kc.data.dataset import ImageDataset
    from kc.data.images import image_problem
    from kc.run import prepare_run

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # for Pillow's 89 million: the images are 16 x 16
    assert "raise data.max_image_pixels" in image_problem(next(tiny_benchmark.rglob("*.png")))
    bench = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, bench)
    config = tiny_config(bench, tmp_path / "run")
    with pytest.raises(DataError, match="raise data.max_image_pixels"):
        prepare_run(config_from_dict(config), progress=False)
    config["data"] = {**config["data"], "max_image_pixels": 1_000, "decoded_cache": True}
    run = prepare_run(config_from_dict(config), progress=False)
    assert len(run.splits["train"]) == 144 and run.decoded is not None
    dataset = ImageDataset(run.splits["train"], run.image_root, run.cfg.data, train=False)
    assert dataset[0][0].shape == (3, 16, 16)  # decoded from the file, past the lowered bomb limit
    assert "exceeds the limit of 200" in image_problem(next(tiny_benchmark.rglob("*.png")), max_pixels=200)


def test_check_data_reports_every_problem_at_once(tmp_path, tiny_benchmark):
    import shutil

    import yaml
    from typer.testing import CliRunner

    from conftest import tiny_config
    from kc.cli import app

    bench = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, bench)
    clean = tmp_path / "clean.yaml"
    clean.write_text(yaml.safe_dump(tiny_config(bench, tmp_path / "never")))
    out = CliRunner().invoke(app, ["check-data", str(clean)])
    assert out.exit_code == 0 and "data OK" in out.output and "12 classes in 3 verticals" in out.output

    # break one image (truncated), one manifest row (unknown class) and leave vertical v02 without training images
    rows = (bench / "manifest.csv").read_text().splitlines()
    victim = rows[1].split(",")[0]
    (bench / victim).write_bytes((bench / victim).read_bytes()[:40])
    kept = [r for r in rows[1:] if not (r.split(",")[1].startswith("v02") and r.split(",")[-1] == "train")]
    (bench / "manifest.csv").write_text("\n".join([rows[0], *kept]) + "\n")
    out = CliRunner().invoke(app, ["check-data", str(clean)])
    assert "vertical 'v02': no training image" in out.output and victim in out.output
    assert out.exit_code == 2 and "fix the problems above" in out.output
    assert not (tmp_path / "never").exists()  # nothing written

    with open(bench / "manifest.csv", "a") as f:
        f.write("images/x.png,nope.c9,train\n")
    out = CliRunner().invoke(app, ["check-data", str(clean)])
    assert out.exit_code == 2 and "nope.c9" in out.output and "manifest.csv:" in out.output
