"""Foreign checkpoints -> timm's local model folder (kc convert-weights), and `model.backbone: local-dir:PATH`."""

import json
from collections import OrderedDict

import pytest
import timm
import torch

from conftest import tiny_config
from kc.config import config_from_dict
from kc.errors import CheckpointError, ConfigError
from kc.models.classifier import build_classifier
from kc.models.convert import convert_checkpoint

ARCH = "test_efficientnet"  # a tiny timm architecture (356K parameters)


def foreign_checkpoint(path, seed=0):
    """A port of ARCH under other tensor names (as another implementation names them), same order; returns the
    reference model."""
    torch.manual_seed(seed)
    reference = timm.create_model(ARCH, pretrained=False).eval()
    state = OrderedDict((f"_port.layer{i}", t.clone()) for i, t in enumerate(reference.state_dict().values()))
    torch.save(state, path)
    return reference


def test_a_port_converts_by_order_and_loads_back_with_the_same_outputs(tmp_path):
    reference = foreign_checkpoint(tmp_path / "port.pth")
    config = convert_checkpoint(
        tmp_path / "port.pth", tmp_path / "model", ARCH, mean=(0.498,) * 3, std=(0.502,) * 3, license="apache-2.0"
    )
    assert config["converted_from"]["paired_by"] == "order"
    written = json.loads((tmp_path / "model" / "config.json").read_text())
    assert written["architecture"] == ARCH and written["pretrained_cfg"]["mean"] == [0.498] * 3
    loaded = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)


def test_a_checkpoint_under_the_architectures_own_names_pairs_by_name(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model(ARCH, pretrained=False)
    shuffled = OrderedDict(reversed(list(reference.state_dict().items())))  # order no longer matters
    torch.save({"state_dict": shuffled}, tmp_path / "own.pt")
    assert convert_checkpoint(tmp_path / "own.pt", tmp_path / "model", ARCH)["converted_from"]["paired_by"] == "name"


def test_a_shape_that_differs_is_refused_naming_the_tensor(tmp_path):
    foreign_checkpoint(tmp_path / "port.pth")
    state = torch.load(tmp_path / "port.pth", weights_only=True)
    state["_port.layer0"] = state["_port.layer0"][:, :2]  # the stem reads 2 channels, not 3
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"'_port.layer0' has shape .* the architecture's 'conv_stem.weight'"):
        convert_checkpoint(tmp_path / "bad.pth", tmp_path / "model", ARCH)
    with pytest.raises(CheckpointError, match="tensors, the architecture has"):
        convert_checkpoint(tmp_path / "port.pth", tmp_path / "model", "test_resnet")
    assert not (tmp_path / "model").exists()  # nothing written


class NotATensor:
    pass


def test_a_pickle_of_objects_is_never_loaded(tmp_path):
    torch.save({"weight": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        convert_checkpoint(tmp_path / "evil.pth", tmp_path / "model", ARCH)


def local_dir_run(tmp_path, tiny_benchmark, **data):
    foreign_checkpoint(tmp_path / "port.pth", seed=3)
    convert_checkpoint(tmp_path / "port.pth", tmp_path / "model", ARCH, mean=(0.4, 0.5, 0.6), interpolation="bicubic")
    cfg = tiny_config(tiny_benchmark, tmp_path / "run")
    cfg["data"] = {k: v for k, v in cfg["data"].items() if k != "image_size"} | data
    cfg["model"] = {"backbone": f"local-dir:{tmp_path / 'model'}", "head": {"hidden": [8]}}
    return cfg


def test_a_local_dir_backbone_brings_its_weights_and_preprocessing(tmp_path, tiny_benchmark):
    cfg = config_from_dict(local_dir_run(tmp_path, tiny_benchmark))
    assert cfg.data.mean == (0.4, 0.5, 0.6) and cfg.data.image_size == 160 and cfg.data.interpolation == "bicubic"
    assert cfg.data.std == tuple(timm.get_pretrained_cfg(ARCH).std)  # not given: the architecture's default
    model = build_classifier(cfg.model, num_classes=5)
    converted = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True, num_classes=0)
    for name, tensor in converted.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name


def test_what_the_config_sets_wins_over_the_folders_preprocessing(tmp_path, tiny_benchmark):
    cfg = config_from_dict(local_dir_run(tmp_path, tiny_benchmark, mean=[0.1, 0.1, 0.1], image_size=32))
    assert cfg.data.mean == (0.1, 0.1, 0.1) and cfg.data.image_size == 32 and cfg.data.interpolation == "bicubic"


def test_a_missing_or_contradicted_local_dir_is_a_config_error(tmp_path, tiny_benchmark):
    data = local_dir_run(tmp_path, tiny_benchmark)
    with pytest.raises(ConfigError, match="brings its own weights"):
        config_from_dict({**data, "model": {**data["model"], "pretrained": str(tmp_path / "port.pth")}})
    data["model"]["backbone"] = f"local-dir:{tmp_path / 'nowhere'}"
    with pytest.raises(ConfigError, match="nowhere/config.json not found.*kc convert-weights"):
        config_from_dict(data)
