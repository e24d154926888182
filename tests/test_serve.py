"""Shipping the model: export (ONNX, TorchScript) with parity, `kc predict`, and the real HTTP server."""

import base64
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from kc.cli import app
from kc.config import config_from_dict
from kc.data.dataset import ImageDataset, collate
from kc.data.samples import Sample
from kc.errors import CheckpointError
from kc.run import prepare_run
from kc.serve.export import ExportError, export_stage
from kc.serve.labels import LabelPicker
from kc.serve.runtime import open_model
from kc.stages import GENERALIST, STUDENT, load_stage, new_model
from kc.train.generalist import train_generalist


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_benchmark):
    """A tiny run whose generalist is trained, copied as the student too (a student is the same kind of model),
    with its ONNX export."""
    root = tmp_path_factory.mktemp("serve")
    data = tiny_config(tiny_benchmark, root / "run", epochs=1)
    data["student"] = {"head": {"structure": "fc-sc", "shared_units": 4}, "self_paced": {"variant": "vertical"}}
    run = prepare_run(config_from_dict(data), progress=False)
    train_generalist(run, progress=False, verbose=False)
    export = root / "export-onnx"
    export_stage(run, export, "onnx", GENERALIST)
    return run, export


def pytorch_scores(run, stage, paths):
    """{path: sigmoid scores} of the stage's PyTorch model, through the training code's own preprocessing."""
    model = load_stage(run.stage_dir(stage), new_model(run, stage)).eval()
    samples = [Sample(str(p.relative_to(run.image_root)), (), "test", str(p)) for p in paths]
    dataset = ImageDataset(samples, run.image_root, run.cfg.data, train=False)
    batch = collate([dataset[i] for i in range(len(samples))])
    with torch.no_grad():
        return {str(p): z for p, z in zip(paths, torch.sigmoid(model(batch["images"])), strict=True)}


def test_onnx_export_matches_pytorch_and_carries_labels_and_card(trained):
    run, export = trained
    manifest = json.loads((export / "kc_model.json").read_text())
    assert manifest["parity"]["max_abs_logit_difference"] <= 1e-4
    assert manifest["parity"]["images"] == len(run.splits["test"])
    assert {p.name for p in export.iterdir()} == {"model.onnx", "kc_model.json", "taxonomy.json", "MODEL_CARD.md"}
    card = (export / "MODEL_CARD.md").read_text()
    assert "12 classes in 3 verticals" in card and "Intended use" in card
    loaded = open_model(export)
    model = load_stage(run.stage_dir(GENERALIST), new_model(run, GENERALIST)).eval()
    images = torch.randn(5, 3, 16, 16)  # another batch size than the export's example
    with torch.no_grad():
        np.testing.assert_allclose(loaded.logits(images.numpy()), model(images).numpy(), atol=1e-4, rtol=0)


def test_structured_self_paced_student_exports_exactly_to_both_formats(trained, tmp_path):
    run, _ = trained
    student_dir = run.stage_dir(STUDENT) / "checkpoints"
    student_dir.mkdir(parents=True, exist_ok=True)
    # the student architecture (FC-SC(x) head, self-paced scales) with untrained blocks: parity must not care
    torch.manual_seed(1)
    from safetensors.torch import save_file

    images = torch.randn(3, 3, 16, 16)
    sp = run.cfg.student.self_paced
    for norm in ("image", "centred", "running"):  # the paper's scales, the centred ones, the running norms
        sp.centred, sp.running = norm == "centred", norm == "running"
        state = new_model(run, STUDENT).state_dict()
        if norm == "running":  # trained divisors, not their start: parity must follow the saved buffer
            state["output_scales.running_norm"] = torch.rand_like(state["output_scales.running_norm"]) + 0.5
        save_file(state, str(student_dir / "best.safetensors"))
        model = load_stage(run.stage_dir(STUDENT), new_model(run, STUDENT)).eval()
        assert (model.output_scales.centred, model.output_scales.running) == (sp.centred, sp.running)
        for fmt in ("onnx", "torchscript"):
            out = tmp_path / f"{fmt}-{norm}"
            manifest = export_stage(run, out, fmt, STUDENT)
            assert manifest["parity"]["max_abs_logit_difference"] <= 1e-4, fmt
            with torch.no_grad():
                expected = model(images).numpy()
            np.testing.assert_allclose(open_model(out).logits(images.numpy()), expected, atol=1e-4, rtol=0)
    sp.centred = sp.running = False


def test_a_failed_export_leaves_the_previous_artifact_untouched(trained, tmp_path):
    run, _ = trained
    target = tmp_path / "export"
    export_stage(run, target, "torchscript", GENERALIST, parity_images=8)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(ExportError, match="differs from the PyTorch model"):
        export_stage(run, target, "onnx", GENERALIST, parity_images=8, tolerance=-1.0)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging directory left behind
    out = CliRunner().invoke(app, ["export", str(run.dir), "--format", "tflite"])
    assert out.exit_code == 2 and "'tflite' is not one of onnx, torchscript" in out.output


def test_predict_command_matches_the_pytorch_model_and_reports_bad_images(trained, tmp_path):
    run, export = trained
    folder = run.image_root / "images" / "test"
    paths = sorted(p for p in folder.rglob("*.png"))
    expected = pytorch_scores(run, GENERALIST, paths)
    out = tmp_path / "labels.jsonl"
    result = CliRunner().invoke(app, ["predict", str(export), str(folder), "--top-k", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in paths]
    for r in records:
        scores = expected[r["path"]]
        top = torch.topk(scores, 3).indices.tolist()
        assert [x["index"] for x in r["labels"]] == top
        assert [x["score"] for x in r["labels"]] == pytest.approx(scores[top].tolist(), abs=1e-5)
        assert r["labels"][0]["path"][-1] == r["labels"][0]["name"]

    (tmp_path / "broken.png").write_bytes(b"not a png")
    one = paths[0]
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path\n{one}\nbroken.png\n")
    csv_out = tmp_path / "labels.csv"
    result = CliRunner().invoke(app, ["predict", str(export), str(manifest), "--top-k", "2", "--out", str(csv_out)])
    assert result.exit_code == 1 and "1 of 2 images could not be read" in result.output
    rows = csv_out.read_text().splitlines()
    assert rows[0].startswith("path,rank,class_id") and len(rows) == 1 + 2 + 1
    assert "broken.png" in rows[-1] and "UnidentifiedImageError" in rows[-1]
    bad = CliRunner().invoke(app, ["predict", str(export), str(one), "--vertical", "nope"])
    assert bad.exit_code == 2 and "'nope' is not a vertical" in bad.output


def test_label_picker_thresholds_and_verticals(trained):
    run, _ = trained
    picker = LabelPicker(run.taxonomy, {"v00.c000": 0.995})
    scores = np.linspace(0.99, 0.0, 12).astype(np.float32)  # class 0 highest, but below its own threshold
    assert [x["id"] for x in picker.pick(scores, 2)] == ["v00.c001", "v00.c002"]
    assert [x["index"] for x in picker.pick(scores, 3, verticals=["v02"])] == [8, 9, 10]
    assert picker.pick(scores, 5, threshold=0.999) == []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained):
    _, export = trained
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kc.cli", "serve", str(export), "--port", str(port), "--max-pending", "1"]
        + ["--max-upload-mb", "0.05", "--max-pixels", "250000", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail(f"server did not start: {process.stdout.read().decode()}")
    yield url
    process.terminate()
    process.wait(timeout=10)


def test_server_classifies_like_predict_and_the_pytorch_model(trained, server):
    run, _ = trained
    paths = sorted((run.image_root / "images" / "test").rglob("*.png"))[:4]
    expected = pytorch_scores(run, GENERALIST, paths)
    for path in paths:
        top = torch.topk(expected[str(path)], 3).indices.tolist()
        upload = httpx.post(server + "/v1/classify?top_k=3", files={"image": path.read_bytes()})
        assert upload.status_code == 200, upload.text
        assert [x["index"] for x in upload.json()["labels"]] == top
        body = {"image_base64": base64.b64encode(path.read_bytes()).decode(), "top_k": 3}
        as_json = httpx.post(server + "/v1/classify", json=body)
        assert as_json.json() == upload.json()
    only = httpx.post(server + "/v1/classify?vertical=v01&top_k=20", files={"image": paths[0].read_bytes()}).json()
    assert {x["vertical"] for x in only["labels"]} == {"v01"} and len(only["labels"]) == 4
    labels = httpx.get(server + "/v1/labels").json()
    assert [c["id"] for c in labels["classes"]] == [c.id for c in run.taxonomy.classes]
    assert "/v1/classify" in httpx.get(server + "/openapi.json").json()["paths"]


def test_server_rejects_bad_input_with_the_right_status(trained, server):
    run, _ = trained
    png = next((run.image_root / "images" / "test").rglob("*.png")).read_bytes()
    cases = {
        "not an image": (httpx.post(server + "/v1/classify", files={"image": b"hello"}), 400, "not_an_image"),
        "truncated": (httpx.post(server + "/v1/classify", files={"image": png[:60]}), 400, "unreadable_image"),
        "content type": (
            httpx.post(server + "/v1/classify", content=png, headers={"content-type": "image/png"}),
            415,
            "unsupported_media_type",
        ),
        "no image field": (httpx.post(server + "/v1/classify", files={"photo": png}), 400, "bad_request"),
        "bad base64": (httpx.post(server + "/v1/classify", json={"image_base64": "%%%"}), 400, "bad_request"),
        "bad top_k": (httpx.post(server + "/v1/classify?top_k=0", files={"image": png}), 422, "invalid_parameter"),
        "bad vertical": (
            httpx.post(server + "/v1/classify?vertical=zzz", files={"image": png}),
            422,
            "invalid_parameter",
        ),
        "oversize body": (
            httpx.post(server + "/v1/classify", files={"image": png + b"\0" * 60_000}),
            413,
            "too_large",
        ),
    }
    import io

    from PIL import Image

    big = io.BytesIO()
    Image.new("RGB", (600, 600)).save(big, format="PNG")  # small file, 360,000 pixels > 250,000
    cases["too many pixels"] = (
        httpx.post(server + "/v1/classify", files={"image": big.getvalue()}),
        413,
        "too_many_pixels",
    )
    for name, (response, status, error) in cases.items():
        assert (response.status_code, response.json()["error"]) == (status, error), name
        assert response.json()["detail"], name


def test_server_answers_503_when_overloaded_and_counts_it(trained, server):
    run, _ = trained
    png = next((run.image_root / "images" / "test").rglob("*.png")).read_bytes()
    host, port = server.removeprefix("http://").split(":")
    # A client that sends headers and half its body holds the only admission slot (--max-pending 1).
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    for _ in range(100):
        if "kc_pending_requests 1" in httpx.get(server + "/metrics").text:
            break
        time.sleep(0.05)
    refused = httpx.post(server + "/v1/classify", files={"image": png})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "overloaded"
    stalled.close()
    for _ in range(100):
        if "kc_pending_requests 0" in httpx.get(server + "/metrics").text:
            break
        time.sleep(0.05)
    assert httpx.post(server + "/v1/classify", files={"image": png}).status_code == 200
    metrics = httpx.get(server + "/metrics").text
    assert 'kc_requests_total{path="/v1/classify",status="503"} 1' in metrics
    # the stalled client that went away is counted as closed by the client (499), not as a server error
    assert 'kc_requests_total{path="/v1/classify",status="499"} 1' in metrics and 'status="500"' not in metrics
    assert 'kc_request_seconds_count{path="/v1/classify"}' in metrics and "kc_batches_total" in metrics
    assert httpx.get(server + "/healthz").json()["classes"] == 12


@pytest.mark.parametrize("how", ["truncated", "zero bytes", "bit flipped"])
def test_a_damaged_export_is_refused_naming_the_file(trained, tmp_path, how):
    import shutil

    from test_integrity import damage

    _, export = trained
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    open_model(copy)  # intact: opens
    damage(copy / "model.onnx", how)
    with pytest.raises(CheckpointError, match=r"model.onnx: damaged"):
        open_model(copy)
