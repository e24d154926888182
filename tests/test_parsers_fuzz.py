"""Parsers never crash: any input to the manifest (CSV, JSONL), taxonomy, config, shard and Open Images readers ends
in a valid result or a KCError that names the file, never another exception (property-based, seeded)."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kc.config import config_from_dict, load_config
from kc.data.openimages import hierarchy_taxonomy, import_openimages, read_descriptions
from kc.data.samples import load_manifest
from kc.data.shards import load_shards
from kc.errors import KCError
from kc.taxonomy import Taxonomy

TAXONOMY = {"verticals": ["cars", "birds"], "classes": [{"id": c, "vertical": v} for c, v in
            [("sedan", "cars"), ("coupe", "cars"), ("owl", "birds"), ("finch", "birds")]]}  # fmt: skip

# Seeded and bounded: the suite stays fast and every run tries the same inputs.
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.sampled_from(
        ["", "sedan", "owl", "cars", "train", "val", "test", "x.png", "a;b", "-1", "1e9"]
    ) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["path", "labels", "split", "negatives", "id", "vertical", "parent", "name", "verticals",
                         "classes", "LabelName", "Subcategory", "seed", "data", "manifest", "generalist", "epochs"])
        | st.text(max_size=5),
        inner,
        max_size=5,
    ),
    max_leaves=12,
)  # fmt: skip

# Structured like the formats, with wrong types and dangling references mixed in.
ids = (
    st.sampled_from(["a", "b", "cars", "birds", "sedan", "owl", ""])
    | st.integers(0, 2)
    | st.none()
    | st.lists(st.just("a"), max_size=1)
)
taxonomies = st.fixed_dictionaries(
    {
        "verticals": st.lists(ids | st.fixed_dictionaries({"id": ids}, optional={"name": ids}), max_size=3),
        "classes": st.lists(
            st.fixed_dictionaries({"id": ids}, optional={"vertical": ids, "parent": ids, "name": ids}) | ids,
            max_size=5,
        ),
    }
)
hierarchies = st.recursive(
    st.fixed_dictionaries({"LabelName": ids}),
    lambda inner: st.fixed_dictionaries(
        {"LabelName": ids}, optional={"Subcategory": st.lists(inner | ids, max_size=3) | ids}
    ),
    max_leaves=8,
)
configs = st.fixed_dictionaries(
    {"data": st.fixed_dictionaries({}, optional={"manifest": ids, "taxonomy": ids, "image_size": json_values})},
    optional={
        "generalist": st.dictionaries(st.sampled_from(["epochs", "lr", "optimizer", "patience"]), json_values),
        "specialists": st.dictionaries(st.sampled_from(["folds", "epochs", "negatives_per_image"]), json_values),
        "student": st.dictionaries(st.sampled_from(["head", "teachers", "self_paced", "top_k"]), json_values),
        "seed": json_values,
    },
)

# Text that looks like the formats (their keywords, separators and quotes) as well as any bytes.
format_text = st.lists(
    st.sampled_from(["path", "labels", "split", ",", ";", '"', "\n", "\r\n", "{", "}", ":", "[", "]", "sedan", "owl",
                     "x.png", "train", "negatives", "\x00", "\ufeff", "é", " ", "LabelName", "Confidence", "1", "0.5"])
    | st.text(max_size=6),
    max_size=40,
).map("".join)  # fmt: skip
raw_bytes = st.binary(max_size=200) | format_text.map(lambda s: s.encode("utf-8"))


def expect_kc_error_naming(path: Path, call):
    """`call()` returns, or raises a KCError that names `path`."""
    try:
        return call()
    except KCError as exc:
        assert str(path.name) in str(exc) or str(path) in str(exc), f"error does not name {path}: {exc}"
        return None


@pytest.fixture
def taxonomy():
    return Taxonomy.from_dict(TAXONOMY)


@FUZZ
@given(content=raw_bytes, suffix=st.sampled_from([".csv", ".jsonl"]))
def test_manifest_bytes(tmp_path, taxonomy, content, suffix):
    (tmp_path / "x.png").write_bytes(b"")
    path = tmp_path / f"manifest{suffix}"
    path.write_bytes(content)
    samples = expect_kc_error_naming(path, lambda: load_manifest(path, tmp_path, taxonomy))
    assert samples is None or all(s.labels is not None for s in samples)


@FUZZ
@given(rows=st.lists(json_values, min_size=1, max_size=5))
def test_manifest_jsonl_values(tmp_path, taxonomy, rows):
    (tmp_path / "x.png").write_bytes(b"")
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    expect_kc_error_naming(path, lambda: load_manifest(path, tmp_path, taxonomy, expand_ancestors=True))


@FUZZ
@given(data=json_values | taxonomies)
def test_taxonomy_values(tmp_path, data):
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    expect_kc_error_naming(path, lambda: Taxonomy.load(path))


@FUZZ
@given(content=raw_bytes, suffix=st.sampled_from([".json", ".yaml"]))
def test_taxonomy_bytes(tmp_path, content, suffix):
    path = tmp_path / f"taxonomy{suffix}"
    path.write_bytes(content)
    expect_kc_error_naming(path, lambda: Taxonomy.load(path))


@FUZZ
@given(data=json_values | configs)
def test_config_values(tmp_path, data):
    expect_kc_error_naming(Path("c.yaml"), lambda: config_from_dict(data, source="c.yaml", base=tmp_path))


@FUZZ
@given(content=raw_bytes)
def test_config_bytes(tmp_path, content):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    expect_kc_error_naming(path, lambda: load_config(path))


@FUZZ
@given(meta=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), raw_bytes))
def test_shard_label_json(tmp_path, taxonomy, meta):
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.parent.mkdir(exist_ok=True)
    with tarfile.open(shard, "w") as tar:
        for name, data in (("000.png", b"\x89PNG"), ("000.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expect_kc_error_naming(shard, lambda: load_shards(shard.parent, taxonomy))


@FUZZ
@given(hierarchy=json_values | hierarchies, descriptions=raw_bytes)
def test_open_images_hierarchy_and_descriptions(tmp_path, hierarchy, descriptions):
    h, d = tmp_path / "hierarchy.json", tmp_path / "descriptions.csv"
    h.write_text(json.dumps(hierarchy), encoding="utf-8")
    d.write_bytes(descriptions)
    names = expect_kc_error_naming(d, lambda: read_descriptions(d))
    expect_kc_error_naming(h, lambda: hierarchy_taxonomy(h, names or {}, vertical_depth=1))


@FUZZ
@given(labels=raw_bytes)
def test_open_images_label_file(tmp_path, labels):
    hierarchy = {
        "LabelName": "/m/root",
        "Subcategory": [{"LabelName": "/m/car", "Subcategory": [{"LabelName": "/m/a"}]}],
    }
    h, d, f = tmp_path / "hierarchy.json", tmp_path / "descriptions.csv", tmp_path / "labels.csv"
    h.write_text(json.dumps(hierarchy), encoding="utf-8")
    d.write_text("/m/car,Car\n/m/a,Sedan\n", encoding="utf-8")
    f.write_bytes(labels)
    out = tmp_path / "out"
    expect_kc_error_naming(f, lambda: import_openimages([(f, "train")], d, h, tmp_path, out))
