"""`kc export --format hub`: timm's model layout, loaded back by timm, `kc predict` and the runtime."""

import json

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import tiny_config
from kc.cli import app
from kc.config import config_from_dict
from kc.run import prepare_run
from kc.serve.export import export_stage
from kc.serve.runtime import open_model
from kc.stages import GENERALIST, STUDENT, load_stage, new_model
from kc.train.generalist import train_generalist


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_benchmark):
    """A trained generalist, and a student of another architecture (FC-SC head, centred self-paced scales)."""
    root = tmp_path_factory.mktemp("hub")
    data = tiny_config(tiny_benchmark, root / "run", epochs=1)
    data["student"] = {"head": {"structure": "fc-sc"}, "self_paced": {"variant": "vertical", "centred": True}}
    run = prepare_run(config_from_dict(data), progress=False)
    train_generalist(run, progress=False, verbose=False)
    student_dir = run.stage_dir(STUDENT) / "checkpoints"
    student_dir.mkdir(parents=True)
    torch.manual_seed(2)
    save_file(new_model(run, STUDENT).state_dict(), str(student_dir / "best.safetensors"))
    return run


@pytest.mark.parametrize("stage", [GENERALIST, STUDENT])
def test_timm_loads_the_export_and_computes_the_stages_logits(run, tmp_path, stage):
    import kc.serve.hub  # noqa: F401  (registers kc_classifier with timm, as the model card says)

    out = tmp_path / "model"
    manifest = export_stage(run, out, "hub", stage, license="mit")
    assert manifest["parity"]["max_abs_logit_difference"] == 0.0
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "README.md", "taxonomy.json", "kc_model.json"
    }  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == [c.id for c in run.taxonomy.classes]
    assert config["pretrained_cfg"]["mean"] == list(run.cfg.data.mean)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert tuple(timm.data.resolve_data_config(model=model)["input_size"]) == (3, 16, 16)
    reference = load_stage(run.stage_dir(stage), new_model(run, stage)).eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
        np.testing.assert_array_equal(open_model(out).logits(images.numpy()), reference(images).numpy())


def test_the_model_card_carries_the_hubs_front_matter(run, tmp_path):
    out = tmp_path / "lite"
    export_stage(run, out, "hub", GENERALIST, parity_images=8, license="apache-2.0")
    text = (out / "README.md").read_text()
    head, _, body = text.removeprefix("---\n").partition("---\n")
    meta = yaml.safe_load(head)
    assert meta["library_name"] == "timm" and meta["license"] == "apache-2.0"
    assert "image-classification" in meta["tags"] and meta["datasets"] == ["tiny"]
    assert "12 classes in 3 verticals" in body and 'timm.create_model("local-dir:lite"' in body


def test_kc_predict_reads_a_hub_export(run, tmp_path):
    out = tmp_path / "model"
    export_stage(run, out, "hub", GENERALIST, parity_images=8)
    image = next((run.image_root / "images" / "test").rglob("*.png"))
    via_hub = CliRunner().invoke(app, ["predict", str(out), str(image), "--top-k", "2"])
    via_run = CliRunner().invoke(app, ["predict", str(run.dir), str(image), "--top-k", "2", "--stage", GENERALIST])
    assert via_hub.exit_code == 0, via_hub.output
    assert via_hub.output == via_run.output
