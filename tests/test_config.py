from pathlib import Path

import pytest

from kc.config import config_from_dict, load_config, parse_override
from kc.errors import ConfigError

MINIMAL = {"data": {"manifest": "m.csv", "taxonomy": "t.json"}}


def test_defaults_and_relative_paths_resolved_against_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: out\ndata:\n  manifest: data/m.csv\n  taxonomy: data/t.json\n")
    cfg = load_config(path)
    assert cfg.run_dir == (tmp_path / "out").resolve()
    assert cfg.data.manifest == (tmp_path / "data/m.csv").resolve()
    assert cfg.data.image_root == (tmp_path / "data").resolve()  # defaults to the manifest's folder
    assert cfg.generalist.loss == "bce"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        config_from_dict({**MINIMAL, "generalist": {"epochz": 3}}, source="run.yaml")
    assert "generalist.epochz: unknown key" in str(info.value)
    assert "run.yaml" in str(info.value)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"generalist\.batch_size: .*'many'"):
        config_from_dict({**MINIMAL, "generalist": {"batch_size": "many"}})


def test_missing_and_conflicting_data_sources():
    with pytest.raises(ConfigError, match="data: required key is missing"):
        config_from_dict({})
    with pytest.raises(ConfigError, match="exactly one of 'manifest', 'image_folder' or 'shards'"):
        config_from_dict({"data": {"manifest": "m.csv", "image_folder": "imgs", "taxonomy": "t.json"}})
    with pytest.raises(ConfigError, match="exactly one of"):
        config_from_dict({"data": {"shards": "s", "image_folder": "imgs"}})
    with pytest.raises(ConfigError, match="needs a 'taxonomy'"):
        config_from_dict({"data": {"manifest": "m.csv"}})


def test_truth_alone_on_labelled_images_needs_unlabeled_ones():
    student = {"ground_truth": "weighted", "ground_truth_weight": 1.0}
    with pytest.raises(ConfigError, match="no teacher would teach the student anything"):
        config_from_dict({**MINIMAL, "student": student})
    cfg = config_from_dict({**MINIMAL, "data": {**MINIMAL["data"], "unlabeled": "u.jsonl"}, "student": student})
    assert cfg.student.ground_truth_weight == 1.0
    assert config_from_dict({**MINIMAL, "student": {**student, "ground_truth_weight": 0.5}}).data.unlabeled is None


def test_split_fractions_must_leave_training_data():
    with pytest.raises(ConfigError, match="val \\+ test must be below 1"):
        config_from_dict({"data": {**MINIMAL["data"], "split": {"val": 0.5, "test": 0.5}}})


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values(tmp_path):
    assert parse_override("generalist.epochs=3") == {"generalist": {"epochs": 3}}
    assert parse_override("model.head.hidden=[8, 4]") == {"model": {"head": {"hidden": [8, 4]}}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("generalist.epochs")
    path = tmp_path / "r.yaml"
    path.write_text("data: {manifest: m.csv, taxonomy: t.json}\n")
    assert load_config(path, {"generalist": {"epochs": 7}}).generalist.epochs == 7
    assert isinstance(load_config(path).run_dir, Path)


@pytest.mark.parametrize("name", ["paper-1k", "paper-10k", "paper-100k", "features-100k"])
def test_the_feature_benchmark_examples_are_valid_configs_of_their_preset(name):
    path = Path(__file__).parents[1] / "examples" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.model.backbone == "kc_features"
    assert cfg.data.manifest.parent.name == name  # each example reads the benchmark its preset writes
