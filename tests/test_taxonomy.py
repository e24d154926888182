import json

import pytest

from kc.errors import TaxonomyError
from kc.taxonomy import Taxonomy

GOOD = {
    "verticals": [{"id": "bird", "name": "Bird"}, {"id": "car", "name": "Car"}],
    "classes": [
        {"id": "sedan", "name": "Sedan", "vertical": "car"},
        {"id": "passerine", "name": "Passerine", "vertical": "bird"},
        {"id": "sparrow", "name": "Sparrow", "parent": "passerine"},
        {"id": "eagle", "parent": "bird"},
    ],
}


def write(tmp_path, data, name="tax.json"):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(data))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    return path


def test_loads_json_and_yaml_alike(tmp_path):
    a = Taxonomy.load(write(tmp_path, GOOD, "t.json"))
    b = Taxonomy.load(write(tmp_path, GOOD, "t.yaml"))
    assert a.to_dict() == b.to_dict()
    assert a.fingerprint() == b.fingerprint()


def test_classes_grouped_by_vertical_and_hierarchy_resolved(tmp_path):
    t = Taxonomy.load(write(tmp_path, GOOD))
    assert [c.id for c in t.classes] == ["passerine", "sparrow", "eagle", "sedan"]
    assert t.vertical_ranges == [(0, 3), (3, 4)]
    assert t.vertical_of_class == [0, 0, 0, 1]
    sparrow = t.class_index["sparrow"]
    assert t.classes[sparrow].vertical == "bird"  # inherited through the parent
    assert t.ancestors(sparrow) == [t.class_index["passerine"]]
    assert t.path(sparrow) == ["Bird", "Passerine", "Sparrow"]
    assert t.classes[t.class_index["eagle"]].name == "eagle"  # name defaults to id


def test_round_trip(tmp_path):
    t = Taxonomy.load(write(tmp_path, GOOD))
    t.save(tmp_path / "saved.json")
    assert Taxonomy.load(tmp_path / "saved.json").to_dict() == t.to_dict()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["classes"].append({"id": "sedan", "vertical": "car"}),
            "class 'sedan': duplicate class id",
        ),
        (
            lambda d: d["classes"].append({"id": "bird", "vertical": "car"}),
            "'bird': id is also a vertical id",
        ),
        (lambda d: d["verticals"].append({"id": "car"}), "vertical 'car': duplicate vertical id"),
        (lambda d: d["classes"].append({"id": "x", "parent": "nowhere"}), "class 'x': parent 'nowhere'"),
        (lambda d: d["classes"].append({"id": "orphan"}), "class 'orphan': in no vertical"),
        (lambda d: d["verticals"].append({"id": "boat"}), "vertical 'boat': empty"),
        (
            lambda d: d["classes"].append({"id": "y", "vertical": "plane"}),
            "class 'y': vertical 'plane' is not listed",
        ),
        (
            lambda d: d["classes"].extend([{"id": "a", "parent": "b"}, {"id": "b", "parent": "a"}]),
            "cycle (a -> b -> a)",
        ),
        (
            lambda d: d["classes"].append({"id": "z", "vertical": "car", "parent": "passerine"}),
            "class 'z': vertical",
        ),
        (
            lambda d: d["classes"].append({"id": "w", "vertical": "car", "colour": "red"}),
            "class 'w': unknown key",
        ),
    ],
)
def test_each_invalid_taxonomy_is_rejected_naming_file_and_id(tmp_path, mutate, expected):
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(TaxonomyError) as info:
        Taxonomy.load(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_cycle_through_a_class_with_its_own_vertical_is_still_a_cycle(tmp_path):
    data = json.loads(json.dumps(GOOD))
    data["classes"] += [{"id": "a", "vertical": "car", "parent": "b"}, {"id": "b", "parent": "a"}]
    with pytest.raises(TaxonomyError, match="cycle"):
        Taxonomy.load(write(tmp_path, data))


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TaxonomyError, match="bad.json: not valid JSON"):
        Taxonomy.load(bad)
    with pytest.raises(TaxonomyError, match="two lists"):
        Taxonomy.load(write(tmp_path, {"classes": []}))
    with pytest.raises(TaxonomyError, match="not found"):
        Taxonomy.load(tmp_path / "missing.yaml")
