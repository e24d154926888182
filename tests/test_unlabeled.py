"""Unlabeled images (data.unlabeled): read and checked like the labelled ones, labelled by the generalist's top
class, learnt by the student from that class's specialist and by the controls as their label (self-training)."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kc.checkpoint import CheckpointDir
from kc.cli import app
from kc.config import config_from_dict
from kc.data.check import check_data, report_text
from kc.data.dataset import ImageDataset, collate
from kc.data.feature_benchmark import (
    FEATURE_PRESETS,
    FeatureBenchmarkSpec,
    class_centres,
    generate_feature_benchmark,
)
from kc.distill.cached_teachers import CachedTeachers
from kc.distill.targets import OnlineTeachers
from kc.errors import CheckpointError, DataError, KCError
from kc.pipeline import run_pipeline
from kc.run import prepare_run
from kc.seeds import run_seeds
from kc.stages import (
    CONTROL,
    GENERALIST,
    GROUND_TRUTH_LABELLED,
    STUDENT,
    load_specialists,
    load_stage,
    new_generalist_model,
    specialist_digest,
)
from kc.train.controls import control_config, labelled_control_config, total_compute_epochs
from kc.train.generalist import train_generalist
from kc.train.trainer import EpochBatches
from kc.train.unlabeled import ROUTED, routed_unlabeled, student_training_samples

SPEC = FeatureBenchmarkSpec(
    verticals=3,
    classes_per_vertical=6,
    train_per_class=10,
    val_images=48,
    test_images=48,
    label_noise=0.0,
    size_ratio=3.0,
    fine_dims=3,
    unlabeled_per_class=5,
)
EPOCHS = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.01}}


def run_config(bench, run_dir, unlabeled=True, **student):
    return config_from_dict(
        {
            "run_dir": str(run_dir),
            "data": {
                "manifest": str(bench / "manifest.jsonl"),
                "taxonomy": str(bench / "taxonomy.json"),
                "unlabeled": str(bench / "unlabeled.jsonl") if unlabeled else None,
            },
            "model": {"backbone": "kc_features", "backbone_args": {"dim": SPEC.dim}, "head": {"hidden": [16, 8]}},
            "generalist": {**EPOCHS, "epochs": 20},  # long enough to tell the verticals apart
            "specialists": EPOCHS,
            "student": {**EPOCHS, "top_k": 3, "teachers": "cache", **student},
            "controls": {
                "kinds": ["same_compute", "total_compute", "ground_truth_labelled"],
                "total_compute_patience": 2,
            },
        }
    )


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "bench"
    generate_feature_benchmark(out, SPEC)
    return out


@pytest.fixture(scope="module")
def finished(bench, tmp_path_factory):
    run = prepare_run(run_config(bench, tmp_path_factory.mktemp("run") / "run"), progress=False)
    return run, run_pipeline(run, progress=False, verbose=False)


def test_the_benchmark_draws_unlabeled_images_of_every_class_apart_from_the_labelled_ones(bench, tmp_path):
    plain = generate_feature_benchmark(tmp_path / "plain", replace(SPEC, unlabeled_per_class=0))
    assert plain.read_bytes() == (bench / "manifest.jsonl").read_bytes()  # the labelled data keeps its bytes
    assert (tmp_path / "plain/features.npy").read_bytes() == (bench / "features.npy").read_bytes()
    assert not (tmp_path / "plain/unlabeled.jsonl").exists()
    rows = [json.loads(line) for line in (bench / "unlabeled.jsonl").read_text().splitlines()]
    features = np.load(bench / "unlabeled.npy").astype(np.float32)
    classes = sum(SPEC.vertical_sizes())
    assert len(rows) == len(features) == classes * 5 and all(set(r) == {"path"} for r in rows)
    # class by class, each image around its class's centre (the noise is the training images')
    nearest = np.linalg.norm(features[:, None] - class_centres(SPEC)[None], axis=-1).argmin(1)
    assert np.mean(nearest == np.repeat(np.arange(classes), 5)) > 0.9
    labelled = np.load(bench / "features.npy")
    assert not any((labelled == row).all(1).any() for row in np.load(bench / "unlabeled.npy")[:20])  # new draws


def test_unlabeled_manifest_problems_are_reported_with_their_lines(bench, tmp_path):
    lines = [
        json.dumps({"path": "unlabeled.npy#0"}),
        json.dumps({"path": "unlabeled.npy#1", "labels": ["v00.c0"]}),
        json.dumps({"path": "unlabeled.npy#2", "split": "val"}),
        json.dumps({"path": "unlabeled.npy#0"}),
        json.dumps({"path": "features.npy#3"}),
        json.dumps({"path": "missing.npy#1"}),
    ]
    (bench / "bad_unlabeled.jsonl").write_text("\n".join(lines) + "\n")
    cfg = run_config(bench, tmp_path / "run")
    cfg.data.unlabeled = bench / "bad_unlabeled.jsonl"
    with pytest.raises(DataError) as err:
        prepare_run(cfg, progress=False)
    text = str(err.value)
    assert "5 problem(s)" in text
    checked = check_data(cfg)  # kc check-data reports the same without making a run
    assert not checked.ok and any("bad_unlabeled.jsonl:4: " in p for p in checked.problems)
    for line, why in [
        (2, "has labels"),
        (3, "has a split"),
        (4, "duplicate"),
        (5, "also in the labelled"),
        (6, "not found"),
    ]:
        assert f"bad_unlabeled.jsonl:{line}: " in text and why in text


def test_each_unlabeled_image_is_labelled_by_the_generalists_top_class(finished):
    run, _ = finished
    routed = routed_unlabeled(run)
    assert [s.path for s in routed] == [s.path for s in run.unlabeled] and len(routed) == sum(SPEC.vertical_sizes()) * 5
    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run)).eval()
    x = torch.stack([ImageDataset(routed, run.image_root, run.cfg.data, train=False)[i][0] for i in range(len(routed))])
    with torch.no_grad():
        top = generalist(x).argmax(1).tolist()
    assert [s.labels for s in routed] == [(c,) for c in top]
    assert student_training_samples(run) == run.splits["train"] + routed  # labelled first: cache indices stay
    # a generalist that learnt something routes most images to their drawn class's vertical
    drawn = np.repeat(np.arange(sum(SPEC.vertical_sizes())), 5)
    vertical = np.asarray(run.taxonomy.vertical_of_class)
    assert np.mean(vertical[top] == vertical[drawn]) > 0.8


def test_the_student_and_the_controls_train_on_the_unlabeled_images_too(finished):
    run, result = finished
    every = len(run.splits["train"]) + len(run.unlabeled)
    for stage in (STUDENT, CONTROL):
        steps = CheckpointDir(run.stage_dir(stage) / "checkpoints").read_state()["step"]
        assert steps == EPOCHS["epochs"] * EpochBatches.per_epoch(every, EPOCHS["batch_size"]), stage
    # ... but for the one control that ignores them: it takes as many optimizer steps as the student, in more epochs
    labelled = CheckpointDir(run.stage_dir(GROUND_TRUTH_LABELLED) / "checkpoints").read_state()["step"]
    per_epoch = EpochBatches.per_epoch(len(run.splits["train"]), EPOCHS["batch_size"])
    student = EPOCHS["epochs"] * EpochBatches.per_epoch(every, EPOCHS["batch_size"])
    assert labelled == math.ceil(student / per_epoch) * per_epoch and labelled >= student > 2 * per_epoch
    # the total-compute control's epochs are over the same images as the student's
    assert total_compute_epochs(run) >= 1
    stages = [m["stage"] for m in result["models"]]
    assert stages[-3:] == [CONTROL, "control_total_compute", GROUND_TRUTH_LABELLED]
    assert json.loads((run.dir / "metrics.json").read_text())["unlabeled_images"] == len(run.unlabeled)
    assert ", 90 unlabeled," in report_text(check_data(run.cfg))


def test_the_labelled_only_control_can_be_given_a_multiple_of_the_student_s_steps(finished, monkeypatch):
    run, _ = finished
    per_epoch = EpochBatches.per_epoch(len(run.splits["train"]), EPOCHS["batch_size"])
    student = EPOCHS["epochs"] * EpochBatches.per_epoch(len(student_training_samples(run)), EPOCHS["batch_size"])
    for multiple in (1.0, 2.0, 0.5):
        monkeypatch.setattr(run.cfg.controls, "ground_truth_labelled_steps", multiple)
        epochs = labelled_control_config(run).epochs
        assert epochs == math.ceil(multiple * student / per_epoch), multiple  # the fewest epochs that hold them
    assert labelled_control_config(run).model_copy(update={"epochs": 1}) == control_config(run).model_copy(
        update={"epochs": 1}
    )  # the student's recipe otherwise


def test_the_cache_teaches_an_unlabeled_image_as_its_routed_vertical_s_specialist_does(finished):
    run, _ = finished
    samples = student_training_samples(run)
    digests = [specialist_digest(run, v) for v in range(run.taxonomy.num_verticals)]
    cached = CachedTeachers(run, samples, digests, 3, 1.0)
    online = OnlineTeachers(load_specialists(run), run.taxonomy, 3, 1.0)
    picked = list(range(len(run.splits["train"]) - 4, len(samples), 17))  # labelled and unlabeled
    batch = collate([ImageDataset(samples, run.image_root, run.cfg.data, train=False)[i] for i in picked])
    want = online(batch["images"], batch["labels"], batch["index"])
    got = cached(batch["images"], batch["labels"], batch["index"])
    assert batch["index"].tolist() == picked
    torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError):  # a cache over other images (here: without the unlabeled ones) is refused
        CachedTeachers(run, run.splits["train"], digests, 3, 1.0)


def test_unlabeled_images_join_a_trained_run_and_a_new_generalist_routes_them_again(bench, tmp_path):
    run = prepare_run(run_config(bench, tmp_path / "run", unlabeled=False, teachers="online"), progress=False)
    train_generalist(run, progress=False, verbose=False)
    assert run.unlabeled == [] and routed_unlabeled(run) == []
    later = prepare_run(run_config(bench, tmp_path / "run", teachers="online"), progress=False)  # allowed
    assert len(later.unlabeled) == sum(SPEC.vertical_sizes()) * 5
    first = routed_unlabeled(later)
    saved = json.loads((later.dir / "data" / ROUTED).read_text())
    saved["classes"] = [0] * len(saved["classes"])  # what the file says is what is used while its digests match
    (later.dir / "data" / ROUTED).write_text(json.dumps(saved))
    assert {s.labels for s in routed_unlabeled(later)} == {(0,)}
    saved["generalist"] = "another"  # made by another generalist: computed again
    (later.dir / "data" / ROUTED).write_text(json.dumps(saved))
    assert routed_unlabeled(later) == first
    cfg = run_config(bench, tmp_path / "run", teachers="online")
    cfg.data.image_size = 16  # a key that decides the data still binds the run
    with pytest.raises(CheckpointError, match="data.image_size"):
        prepare_run(cfg, progress=False)


def test_seeds_and_generate_benchmark_take_unlabeled_per_class(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr("kc.seeds.prepare_run", lambda cfg, progress: made.append(cfg) or cfg)
    monkeypatch.setattr("kc.seeds.run_pipeline", lambda run, **kw: {"models": []})
    monkeypatch.setattr("kc.seeds.summarise", lambda results: {})
    monkeypatch.setattr("kc.seeds.seeds_table", lambda summary: "")
    config = tmp_path / "c.yaml"
    config.write_text(
        "run_dir: runs\nmodel: {backbone: kc_features, backbone_args: {dim: 128}}\n"
        "data: {manifest: x.jsonl, taxonomy: t.json}\n"
    )
    monkeypatch.setitem(FEATURE_PRESETS, "t", replace(SPEC, unlabeled_per_class=0))
    run_seeds(config, [3], generate="t", unlabeled_per_class=2, progress=False, echo=lambda _: None)
    unlabeled = made[0].data.unlabeled
    assert unlabeled == tmp_path / "runs/seed_3/benchmark/unlabeled.jsonl" and unlabeled.is_file()
    with pytest.raises(KCError, match="feature preset"):
        run_seeds(config, [3], generate=None, unlabeled_per_class=2, progress=False)
    out = CliRunner().invoke(
        app, ["generate-benchmark", str(tmp_path / "img"), "--preset", "tiny", "--unlabeled-per-class", "2"]
    )
    assert out.exit_code != 0 and "feature presets" in out.output and "Traceback" not in out.output
