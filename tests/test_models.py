import pytest
import timm
import torch
from safetensors.torch import save_file

from kc.config import ModelConfig
from kc.errors import CheckpointError, ConfigError
from kc.models.classifier import build_classifier, count_parameters, create_backbone
from kc.models.heads import DenseHead


def test_kc_convnet_is_a_timm_model():
    model = timm.create_model("kc_convnet", num_classes=0, widths=(8, 16), depth=1)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 16)
    assert model.num_features == 16


def test_dense_head_is_fc_fc_then_output():
    head = DenseHead(16, [32, 8], 5)
    assert head(torch.randn(3, 16)).shape == (3, 5)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 8), (8, 5)]
    assert count_parameters(head) == 16 * 32 + 32 + 32 * 8 + 8 + 8 * 5 + 5


def test_classifier_from_config_with_any_timm_backbone():
    model = build_classifier(ModelConfig(backbone="test_resnet", head={"hidden": [16]}), num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_pretrained_backbone_from_a_local_file(tmp_path):
    cfg = ModelConfig(backbone_args={"widths": [8, 16], "depth": 1})
    torch.manual_seed(1)
    source = create_backbone(cfg)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 16)  # a classifier from pretraining is ignored
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        torch.manual_seed(2)
        loaded = create_backbone(cfg.model_copy(update={"pretrained": tmp_path / name}))
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (name, key)


def test_backbone_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a timm model"):
        create_backbone(ModelConfig(backbone="no_such_net"))
    with pytest.raises(ConfigError, match="never downloaded"):
        create_backbone(ModelConfig(pretrained=tmp_path / "absent.safetensors"))
    save_file({"unrelated": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="match by name and shape"):
        create_backbone(ModelConfig(pretrained=tmp_path / "other.safetensors"))


def test_prior_output_bias_starts_every_class_improbable():
    import math

    from kc.train.generalist import model_fingerprint

    cfg = ModelConfig(backbone="kc_features", backbone_args={"dim": 16}, head={"hidden": [8], "output_bias": "prior"})
    model = build_classifier(cfg, 10_000)
    torch.testing.assert_close(model.head.out.bias, torch.full((10_000,), -math.log(10_000)))
    features = torch.randn(4, 16)
    targets = torch.zeros(4, 10_000)
    targets[:, 0] = 1
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(features), targets, reduction="sum") / 4
    assert loss < 25  # vs 10,000 * log(2) = 6,931 with PyTorch's default init
    # Runs trained before the key existed keep their checkpoints' fingerprint; setting it changes it.
    default = ModelConfig(backbone="kc_features", backbone_args={"dim": 16}, head={"hidden": [8]})
    assert "output_bias" not in model_fingerprint(default)
    assert "output_bias" in model_fingerprint(cfg)
