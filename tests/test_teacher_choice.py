"""student.teacher_choice: better_on_val: each vertical taught by its specialist only where that specialist beats,
on val, the student's head trained on the labelled images alone; elsewhere by that head's block of the vertical."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from kc.ablate import ablate, ablation_table
from kc.checkpoint import CheckpointDir
from kc.config import config_from_dict, load_config
from kc.data.dataset import ImageDataset, collate
from kc.data.feature_benchmark import FeatureBenchmarkSpec, generate_feature_benchmark
from kc.distill.cache_format import cache_dir, read_shards, shard_prefix
from kc.distill.cached_teachers import CachedTeachers
from kc.distill.targets import GeneralistTeacher, OnlineTeachers
from kc.errors import CheckpointError, ConfigError
from kc.evaluate.compare import gap_closed
from kc.evaluate.report import by_teacher_table, comparison_table
from kc.evaluate.stage import evaluate_stage
from kc.pipeline import compare_run, run_pipeline
from kc.run import prepare_run
from kc.stages import (
    GROUND_TRUTH_LABELLED,
    SELF_TRAINING,
    STUDENT,
    controls_to_train,
    load_stage,
    new_model,
    specialist_digest,
    specialist_dirs,
)
from kc.train.controls import TRAIN, total_compute_epochs
from kc.train.student import cache_targets, train_student
from kc.train.teacher_choice import (
    CHOICE,
    VerticalBlock,
    load_reference,
    online_teachers,
    specialist_teaches,
    teacher_choice,
    teacher_digests,
)
from kc.train.unlabeled import student_training_samples

SPEC = FeatureBenchmarkSpec(
    verticals=3,
    classes_per_vertical=6,
    train_per_class=10,
    val_images=60,
    test_images=30,
    label_noise=0.0,
    size_ratio=3.0,
    fine_dims=3,
    unlabeled_per_class=4,
)
EPOCHS = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.01}}


def config(bench, run_dir, **changes):
    data = {
        "run_dir": str(run_dir),
        "data": {
            "manifest": str(bench / "manifest.jsonl"),
            "taxonomy": str(bench / "taxonomy.json"),
            "unlabeled": str(bench / "unlabeled.jsonl"),
        },
        "model": {"backbone": "kc_features", "backbone_args": {"dim": SPEC.dim}, "head": {"hidden": [16, 8]}},
        "generalist": {**EPOCHS, "epochs": 12},
        "specialists": EPOCHS,
        "student": {**EPOCHS, "top_k": 3, "teachers": "cache", "teacher_choice": "better_on_val"},
        "controls": {"kinds": ["ground_truth_labelled"]},
    }
    for key, value in changes.items():
        section, name = key.split(".")
        data[section] = {**(data.get(section) or {}), name: value}
    return config_from_dict(data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    bench = tmp_path_factory.mktemp("features") / "bench"
    generate_feature_benchmark(bench, SPEC)
    run = prepare_run(config(bench, tmp_path_factory.mktemp("run") / "run"), progress=False)
    run_pipeline(run, progress=False, verbose=False)
    return bench, run


def test_each_vertical_goes_to_the_teacher_better_on_val(finished):
    _, run = finished
    rows = teacher_choice(run)
    reference = evaluate_stage(run, GROUND_TRUTH_LABELLED, "val", progress=False)["per_vertical"]
    assert [r["vertical"] for r in rows] == [v.id for v in run.taxonomy.verticals]
    for v, row in enumerate(rows):
        # the specialist's val AP is the one its own training selected its best epoch by
        best = json.loads((specialist_dirs(run, v)[0] / "checkpoints" / "best.json").read_text())["value"]
        assert row["specialist_val_AP"] == pytest.approx(best, abs=1e-9)
        assert row["reference_val_AP"] == pytest.approx(reference[row["vertical"]]["ap"], abs=1e-9)
        wins = row["specialist_val_AP"] > row["reference_val_AP"]
        assert row["teacher"] == ("specialist" if wins else "labels")
    assert json.loads((run.dir / CHOICE).read_text())["verticals"] == rows
    report = (run.dir / "report.md").read_text()
    assert "## Teachers chosen on val" in report and "| student minus | verticals taught by |" in report
    for row in rows:
        teacher = "its specialist" if row["teacher"] == "specialist" else "the labelled-only control"
        assert f"| {row['vertical']} | {row['specialist_val_AP']:.2f} |" in report and teacher in report
    # the reference trained before the student (the pipeline's order) and the student was taught by the choice
    assert CheckpointDir(run.stage_dir(GROUND_TRUTH_LABELLED) / "checkpoints").read_state()["complete"]
    assert CheckpointDir(run.stage_dir(STUDENT) / "checkpoints").read_state()["complete"]


def test_a_vertical_taught_by_the_labels_learns_the_reference_s_block_and_the_student_notices(finished, tmp_path):
    _, run = finished
    saved = json.loads((run.dir / CHOICE).read_text())
    planted = [dict(row, teacher="labels" if v == 0 else "specialist") for v, row in enumerate(saved["verticals"])]
    (run.dir / CHOICE).write_text(json.dumps({**saved, "verticals": planted}))  # trusted while its digests match
    assert specialist_teaches(run) == [False, True, True]
    digests = teacher_digests(run)
    assert digests[0].startswith("labels:") and digests[1:] == [specialist_digest(run, v) for v in (1, 2)]
    cache_targets(run, progress=False)
    shards = read_shards(run)
    assert [shards[v]["specialist"] for v in range(3)] == digests  # vertical 0's shard was built again
    # vertical 0's cached logits are the reference's top 3 over the vertical's classes on its images
    samples = student_training_samples(run)
    rows = np.load(cache_dir(run) / f"{shard_prefix(0)}.rows.npy")
    logits = np.load(cache_dir(run) / f"{shard_prefix(0)}.logits.npy")
    reference = load_stage(run.stage_dir(GROUND_TRUTH_LABELLED), new_model(run, GROUND_TRUTH_LABELLED)).eval()
    start, end = run.taxonomy.vertical_ranges[0]
    x = torch.stack([ImageDataset(samples, run.image_root, run.cfg.data, train=False)[int(i)][0] for i in rows])
    with torch.no_grad():
        want = reference(x)[:, start:end].topk(3, dim=1).values.numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    # online teaching gives what the cache gives, for labelled and unlabeled images alike
    scfg = run.cfg.student
    cached = CachedTeachers(run, samples, digests, scfg.top_k, scfg.temperature, scfg.unselected)
    online = OnlineTeachers(online_teachers(run), run.taxonomy, scfg.top_k, scfg.temperature, scfg.unselected)
    picked = list(range(0, len(samples), 7))
    batch = collate([ImageDataset(samples, run.image_root, run.cfg.data, train=False)[i] for i in picked])
    got = cached(batch["images"], batch["labels"], batch["index"])
    want_targets = online(batch["images"], batch["labels"], batch["index"])
    torch.testing.assert_close(got.values, want_targets.values, atol=1e-5, rtol=1e-5)
    # the student trained under the other choice is refused, not resumed
    with pytest.raises(CheckpointError, match="different config or inputs"):
        train_student(run, progress=False, verbose=False)
    (run.dir / CHOICE).write_text(json.dumps(saved))


def test_the_comparison_scores_the_teachers_as_chosen(finished):
    _, run = finished
    saved = json.loads((run.dir / CHOICE).read_text())

    def compare_under(teachers: list[str]) -> dict:
        planted = [dict(row, teacher=t) for row, t in zip(saved["verticals"], teachers, strict=True)]
        (run.dir / CHOICE).write_text(json.dumps({**saved, "verticals": planted}))
        try:
            return compare_run(run)
        finally:
            (run.dir / CHOICE).write_text(json.dumps(saved))

    result = compare_under(["specialist", "labels", "specialist"])
    ids = [v.id for v in run.taxonomy.verticals]
    for split in (result, result["val"]):
        rows = {m["stage"]: m for m in split["models"]}
        chosen, oracle, reference = rows["teachers_chosen"], rows["specialists_oracle"], rows[GROUND_TRUTH_LABELLED]
        # vertical 1 scored by the labelled-only control, the others by their specialists
        assert chosen["per_vertical_AP"][ids[1]] == reference["per_vertical_AP"][ids[1]]
        assert chosen["per_vertical_AP"][ids[1]] != oracle["per_vertical_AP"][ids[1]]
        for vid in (ids[0], ids[2]):
            assert chosen["per_vertical_AP"][vid] == oracle["per_vertical_AP"][vid]
        assert chosen["networks_per_image"] == 3
    rows = {m["stage"]: m for m in result["models"]}
    base, student, chosen = rows[result["strongest_baseline"]["stage"]], rows[STUDENT], rows["teachers_chosen"]
    assert result["headroom"]["chosen_teachers_over_strongest_baseline"]["mAP"] == chosen["mAP"] - base["mAP"]
    assert result["gap_closed"]["to_chosen_teachers"]["mAP"] == gap_closed(student["mAP"], base["mAP"], chosen["mAP"])
    assert "to the teachers as chosen (oracle-routed)" in comparison_table(result)
    # the student against each baseline, apart in the verticals each teacher taught
    groups = {(r["baseline"], r["teacher"]): r for r in result["student_by_teacher"]}
    assert {b for b, _ in groups} == {"generalist", GROUND_TRUTH_LABELLED}
    for split, table in (("test", result), ("val", result["val"])):
        rows = {m["stage"]: m for m in table["models"]}
        diff = {
            vid: rows[STUDENT]["per_vertical_AP"][vid] - rows[GROUND_TRUTH_LABELLED]["per_vertical_AP"][vid]
            for vid in ids
        }
        taught = groups[(GROUND_TRUTH_LABELLED, "specialist")]
        assert taught["verticals"] == 2 and taught[split] == pytest.approx((diff[ids[0]] + diff[ids[2]]) / 2)
        assert groups[(GROUND_TRUTH_LABELLED, "labelled-only control")][split] == pytest.approx(diff[ids[1]])
        if split == "test":
            assert taught["test_wins"] == (diff[ids[0]] > 0) + (diff[ids[2]] > 0)
    names = {m["stage"]: m["model"] for m in result["models"]}
    assert f"| {names[GROUND_TRUTH_LABELLED]} | specialist | 2 | {taught['val']:+.2f} |" in by_teacher_table(
        result["student_by_teacher"], names
    )
    # every vertical taught by its specialist: the teachers are the specialists, no row of their own
    result = compare_under(["specialist"] * 3)
    assert "teachers_chosen" not in {m["stage"] for m in result["models"]}
    assert "to_chosen_teachers" not in result["gap_closed"]
    assert [r["teacher"] for r in result["student_by_teacher"]] == ["specialist", "specialist"]


def test_the_choice_is_measured_again_when_the_reference_changes(finished):
    _, run = finished
    saved = json.loads((run.dir / CHOICE).read_text())
    (run.dir / CHOICE).write_text(json.dumps({**saved, "reference": "other", "verticals": []}))
    assert teacher_choice(run) == saved["verticals"]
    assert json.loads((run.dir / CHOICE).read_text()) == saved


def test_a_margin_leaves_to_the_labels_every_vertical_whose_specialist_leads_by_less(finished):
    _, run = finished
    rows = teacher_choice(run)
    leads = sorted(r["specialist_val_AP"] - r["reference_val_AP"] for r in rows if r["teacher"] == "specialist")
    assert leads, "the fixture should have a vertical that its specialist teaches"
    margin = leads[len(leads) // 2]  # the median lead: some verticals keep their specialist, some do not
    student = run.cfg.student.model_copy(update={"teacher_choice_margin": margin})
    with_margin = dataclasses.replace(run, cfg=run.cfg.model_copy(update={"student": student}))
    chosen = teacher_choice(with_margin)  # measured again: the margin is part of what the record was made with
    assert json.loads((run.dir / CHOICE).read_text())["margin"] == margin
    for before, after in zip(rows, chosen, strict=True):
        lead = before["specialist_val_AP"] - before["reference_val_AP"]
        assert after["teacher"] == ("specialist" if lead > margin else "labels")
    assert sum(r["teacher"] == "specialist" for r in chosen) < len(leads)
    assert teacher_choice(run) == rows  # and back, without a margin


def test_the_reference_s_steps_count_in_the_total_compute(finished, monkeypatch):
    _, run = finished
    with_reference = total_compute_epochs(run)
    monkeypatch.setattr(run.cfg.student, "teacher_choice", "specialists")
    without = total_compute_epochs(run)
    steps = CheckpointDir(run.stage_dir(GROUND_TRUTH_LABELLED) / "checkpoints").read_state()["step"]
    per_epoch = math.ceil(len(student_training_samples(run)) / EPOCHS["batch_size"]) * EPOCHS["batch_size"]
    assert with_reference - without >= steps * EPOCHS["batch_size"] // per_epoch > 0


def test_the_student_waits_for_its_reference_and_the_choice_needs_unlabeled_images(finished, tmp_path):
    bench, _ = finished
    run = prepare_run(config(bench, tmp_path / "run"), progress=False)
    with pytest.raises(CheckpointError, match="kc control .* --kind ground_truth_labelled"):
        teacher_choice(run)
    with pytest.raises(ConfigError, match="teacher_choice better_on_val .* give data.unlabeled"):
        config(bench, tmp_path / "other", **{"data.unlabeled": None})
    with pytest.raises(ConfigError, match="needs generalist.loss: bce"):
        config(bench, tmp_path / "other", **{"generalist.loss": "softmax"})


def test_an_ablation_variant_learns_from_the_run_s_teachers_and_trains_its_own_labelled_control(finished, tmp_path):
    bench, run = finished
    assert run.cfg.student.head.structure == "fc-fc"  # the variant's SC-SC head could not load the reference
    result = ablate(run, [0], verbose=False, variants=["sc-sc_vertical_centred"])
    variant = run.dir / "ablation" / "sc-sc_vertical_centred" / "seed_0"
    sub = prepare_run(load_config(variant / "config.yaml", {"run_dir": str(variant)}), progress=False)
    assert sub.cfg.student.reference_run == run.dir
    # the run's teachers: its choice and cache, read through the links, not measured or built again
    assert (variant / CHOICE).is_symlink() and (variant / "cache").is_symlink()
    assert teacher_choice(sub) == teacher_choice(run) and teacher_digests(sub) == teacher_digests(run)
    reference, own = load_reference(sub), load_reference(run)
    x = torch.randn(5, SPEC.dim)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), own(x))
    # its control is the labelled-only one with the variant's head and scales, in its own directory
    control = load_stage(sub.stage_dir(GROUND_TRUTH_LABELLED), new_model(sub, GROUND_TRUTH_LABELLED))
    assert control.output_scales.centred and type(control.head).__name__ == "StructuredHead"
    row = result["rows"][0]
    assert result["truth_control"] == GROUND_TRUTH_LABELLED
    assert row["truth_val_mAP"] == evaluate_stage(sub, GROUND_TRUTH_LABELLED, "val", progress=False)["mAP"]
    assert "ground truth = the ground truth on the labelled images only" in ablation_table(result)
    with pytest.raises(ConfigError, match="reference_run: .* is not a run directory"):
        other = config(bench, tmp_path / "other", **{"student.reference_run": tmp_path})
        load_reference(prepare_run(other, progress=False))


def test_a_reference_run_needs_the_teacher_choice(finished, tmp_path):
    bench, _ = finished
    with pytest.raises(ConfigError, match="reference_run names the labelled-only control"):
        config(bench, tmp_path / "run", **{"student.teacher_choice": "specialists", "student.reference_run": tmp_path})


def test_the_self_training_control_is_the_student_taught_by_the_labels_everywhere(finished, tmp_path):
    bench, run = finished
    scfg = run.cfg.student
    # its teacher: the labelled-only control's block of each image's vertical, as the student gets it where the
    # labels teach
    reference = load_reference(run)
    mine = GeneralistTeacher(reference, run.taxonomy, scfg.top_k, scfg.temperature, scfg.unselected)
    blocks = [VerticalBlock(reference, *r) for r in run.taxonomy.vertical_ranges]
    labels_everywhere = OnlineTeachers(blocks, run.taxonomy, scfg.top_k, scfg.temperature, scfg.unselected)
    samples = student_training_samples(run)
    batch = collate([ImageDataset(samples, run.image_root, run.cfg.data, train=False)[i] for i in range(0, 80, 3)])
    got = mine(batch["images"], batch["labels"], batch["index"])
    want = labels_everywhere(batch["images"], batch["labels"], batch["index"])
    torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.selected, want.selected)
    # it trains the student's recipe on the student's images, from the generalist
    result = TRAIN[SELF_TRAINING](run, progress=False, verbose=False)
    state = CheckpointDir(run.stage_dir(SELF_TRAINING) / "checkpoints").read_state()
    student = CheckpointDir(run.stage_dir(STUDENT) / "checkpoints").read_state()
    assert state["complete"] and state["step"] == student["step"] and result.best_epoch >= 1
    assert SELF_TRAINING in {m["stage"] for m in compare_run(run)["models"]}
    # asked for alone, it brings its teacher; without unlabeled images there is neither
    asked = config(bench, tmp_path / "a", **{"controls.kinds": ["self_training"]})
    assert controls_to_train(prepare_run(asked, progress=False)) == [GROUND_TRUTH_LABELLED, SELF_TRAINING]
    plain = config(
        bench,
        tmp_path / "b",
        **{"data.unlabeled": None, "student.teacher_choice": "specialists", "controls.kinds": ["self_training"]},
    )
    assert controls_to_train(prepare_run(plain, progress=False)) == []
    # before its teacher is trained it says how to train it
    with pytest.raises(CheckpointError, match="self-training control's teacher.*--kind ground_truth_labelled"):
        TRAIN[SELF_TRAINING](prepare_run(asked, progress=False), progress=False, verbose=False)
