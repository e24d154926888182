"""The evidence protocol: val chooses and test records, seeds change the whole pipeline, and each control trains
what it claims. On a small feature benchmark (heads only), so that whole pipelines stay cheap."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_config
from kc.checkpoint import CheckpointDir
from kc.cli import app
from kc.config import config_from_dict
from kc.data.feature_benchmark import FEATURE_PRESETS, FeatureBenchmarkSpec, generate_feature_benchmark
from kc.distill.targets import GeneralistTeacher, OnlineTeachers
from kc.errors import CheckpointError
from kc.evaluate.compare import gaps
from kc.evaluate.metrics import vertical_floor_ap
from kc.evaluate.report import comparison_table
from kc.models.classifier import restrict_outputs
from kc.pipeline import run_pipeline
from kc.run import prepare_run
from kc.seeds import seeds_table, summarise
from kc.stages import (
    CONTROL,
    GENERALIST,
    GROUND_TRUTH,
    SELF_DISTILLATION,
    STAGES,
    STUDENT,
    TOTAL_COMPUTE,
    load_stage,
    new_generalist_model,
    specialist_dir,
)
from kc.taxonomy import Taxonomy
from kc.train.common import start_from_generalist
from kc.train.controls import total_compute_config, total_compute_epochs
from kc.train.trainer import Trainer

SPEC = FeatureBenchmarkSpec(
    verticals=3,
    classes_per_vertical=6,
    train_per_class=12,
    val_images=48,
    test_images=48,
    label_noise=0.0,
    size_ratio=3.0,
    fine_dims=3,
)
EPOCHS = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.01}}


def run_config(bench, run_dir, **extra):
    data = {
        "run_dir": str(run_dir),
        "data": {"manifest": str(bench / "manifest.jsonl"), "taxonomy": str(bench / "taxonomy.json")},
        "model": {"backbone": "kc_features", "backbone_args": {"dim": SPEC.dim}, "head": {"hidden": [16, 8]}},
        "generalist": {**EPOCHS, "epochs": 3},
        "specialists": EPOCHS,
        "student": {**EPOCHS, "top_k": 3, "self_paced": {"centred": True, "init": "generalist"}},
        "controls": {"total_compute_patience": 2},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "bench"
    generate_feature_benchmark(out, SPEC)
    return out


@pytest.fixture(scope="module")
def finished(bench, tmp_path_factory):
    run = prepare_run(config_from_dict(run_config(bench, tmp_path_factory.mktemp("run") / "run")), progress=False)
    return run, run_pipeline(run, progress=False, verbose=False)


def test_unequal_verticals_and_a_low_chance_floor():
    sizes = FEATURE_PRESETS["paper-1k"].vertical_sizes()
    assert len(sizes) == 20 and sum(sizes) == 1000 and sizes == sorted(sizes) and sizes[-1] >= 15 * sizes[0]
    assert SPEC.vertical_sizes() == [3, 5, 10]


def test_vertical_floor_is_random_ranking_within_the_vertical():
    tax = Taxonomy.from_dict(
        {
            "verticals": [{"id": "a"}, {"id": "b"}],
            "classes": [{"id": "a1", "vertical": "a"}, {"id": "a2", "vertical": "a"}, {"id": "b1", "vertical": "b"}],
        }
    )
    # a1: one positive among the 4 images of vertical a (3 of them a2), 4 images of b ranked below: a random
    # order of 4 with one positive has expected AP (1 + 1/2 + 1/3 + 1/4) / 4.
    targets = np.array([[1, 0, 0]] + [[0, 1, 0]] * 3 + [[0, 0, 1]] * 4, dtype=np.float32)
    floor = vertical_floor_ap(targets, tax, draws=4000)
    assert floor[0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, abs=0.02)
    assert floor[2] == pytest.approx(1.0)  # every image of b is b1's positive


def test_pipeline_trains_every_control_and_names_them(finished):
    run, result = finished
    stages = [m["stage"] for m in result["models"]]
    assert stages == [
        GENERALIST,
        "specialists_oracle",
        "specialists_ensemble",
        STUDENT,
        CONTROL,
        SELF_DISTILLATION,
        GROUND_TRUTH,
        TOTAL_COMPUTE,
    ]
    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert [m["stage"] for m in metrics["val"]["models"]] == stages  # val beside test, by name
    assert metrics["strongest_baseline"]["chosen_on"] == "val mAP"
    assert set(metrics["gap_closed"]) == {"from_strongest_baseline", "from_generalist"}
    assert 0 <= metrics["floor"]["mAP"] < 100 and all("within_vertical_mAP" in m for m in metrics["models"])
    report = (run.dir / "report.md").read_text()
    assert "from the strongest baseline" in report and "Chance floor" in report


def test_strongest_baseline_is_chosen_on_val_not_test():
    def rows(values):
        names = [GENERALIST, CONTROL, TOTAL_COMPUTE, STUDENT, "specialists_oracle"]
        return {
            "models": [
                {"stage": n, "model": n, "mAP": v, "mean_per_vertical_AP": v, "per_vertical_AP": {"a": v}}
                for n, v in zip(names, values, strict=True)
            ]
        }

    val = rows([50, 60, 55, 62, 80])
    test = rows([50, 58, 61, 62, 80])  # on test the total-compute control would look strongest
    chosen = gaps(test, val)
    assert chosen["strongest_baseline"]["stage"] == CONTROL
    assert chosen["gap_closed"]["from_strongest_baseline"]["mAP"] == pytest.approx((62 - 58) / (80 - 58))
    assert chosen["gap_closed"]["from_generalist"]["mAP"] == pytest.approx((62 - 50) / (80 - 50))
    assert chosen["gap_closed_per_vertical"]["a"] == pytest.approx((62 - 58) / (80 - 58))
    # the specialists' lead, on test, over the baseline chosen on val and over the generalist
    assert chosen["headroom"]["over_strongest_baseline"]["mAP"] == pytest.approx(80 - 58)
    assert chosen["headroom"]["over_generalist"]["mAP"] == pytest.approx(80 - 50)


def test_the_report_says_when_the_strongest_baseline_leaves_the_teachers_little_headroom():
    def table(specialists):
        models = [
            {
                "stage": n,
                "model": n,
                "mAP": v,
                "mean_per_vertical_AP": v,
                "parameters": 1,
                "networks_per_image": 1,
                "images_per_s": 1.0,
                "per_vertical_AP": {"a": v},
            }
            for n, v in ((GENERALIST, 20.0), (CONTROL, 30.0), (STUDENT, 30.0), ("specialists_oracle", specialists))
        ]
        split = {"models": models}
        return comparison_table({**split, "val": split, **gaps(split, split)})

    small = table(33.0)  # the control takes 10 of the specialists' 13 points over the generalist
    assert "stand +3.00 above the strongest baseline and +13.00 above the generalist" in small
    assert "not in the regime" in small
    large = table(60.0)
    assert "stand +30.00 above the strongest baseline" in large and "not in the regime" not in large


def test_no_selection_reads_the_test_split(bench, tmp_path, finished):
    """The same run with every test label moved to another class: test metrics change, nothing chosen does."""
    run, result = finished
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "features.npy").symlink_to(bench / "features.npy")
    (moved / "taxonomy.json").write_text((bench / "taxonomy.json").read_text())
    tax = json.loads((bench / "taxonomy.json").read_text())
    ids = [c["id"] for c in tax["classes"]]
    lines = []
    for line in (bench / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "test":
            row["labels"] = [ids[(ids.index(row["labels"][0]) + 7) % len(ids)]]
        lines.append(json.dumps(row))
    (moved / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    other = prepare_run(config_from_dict(run_config(moved, tmp_path / "run")), progress=False)
    again = run_pipeline(other, progress=False, verbose=False)
    assert [m["mAP"] for m in again["models"]] != [m["mAP"] for m in result["models"]]

    def vals(entry):  # an epoch's validation metrics and loss (not its timings)
        return {k: v for k, v in entry.items() if k.startswith("val_") or k == "train_loss"}

    def chosen(models):  # every metric (the speeds are timings)
        return [{k: v for k, v in m.items() if k != "images_per_s"} for m in models]

    assert chosen(again["val"]["models"]) == chosen(result["val"]["models"])
    assert again["strongest_baseline"] == result["strongest_baseline"]
    for stage in STAGES:
        if not (run.dir / stage.name).exists():  # a stage this run does not train (labelled-only: no unlabeled images)
            continue
        a = CheckpointDir(run.dir / stage.name / "checkpoints").read_state()
        b = CheckpointDir(other.dir / stage.name / "checkpoints").read_state()
        assert a["best_epoch"] == b["best_epoch"], stage.name
        assert [vals(h) for h in a["history"]] == [vals(h) for h in b["history"]], stage.name


def test_each_control_starts_from_the_generalist_with_its_claimed_model(finished):
    run, _ = finished
    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run)).eval()
    x = torch.randn(16, SPEC.dim)
    for stage in (CONTROL, TOTAL_COMPUTE, GROUND_TRUTH, SELF_DISTILLATION):
        model = start_from_generalist(run, stage).eval()
        has_scales = hasattr(model.output_scales, "gamma")
        assert has_scales == (stage in (GROUND_TRUTH, SELF_DISTILLATION)), stage
        with torch.no_grad():  # scales with the centred init: the same ranking, not the same logits
            if not has_scales:
                assert torch.allclose(model(x), generalist(x), atol=1e-5), stage
    # The total-compute control's budget: the image-steps every specialist and the student took, in control epochs.
    n = len(run.splits["train"])
    per_specialist = []
    for v, (a, b) in enumerate(run.taxonomy.vertical_ranges):
        own = sum(any(a <= c < b for c in s.labels) for s in run.splits["train"])
        size = own + min(n - own, own)
        per_specialist.append(EPOCHS["epochs"] * (size // 32) * 32)
        assert CheckpointDir(specialist_dir(run, v) / "checkpoints").read_state()["step"] == EPOCHS["epochs"] * (
            size // 32
        )
    student = EPOCHS["epochs"] * (n // 32) * 32
    assert total_compute_epochs(run) == math.ceil((sum(per_specialist) + student) / ((n // 32) * 32))
    assert total_compute_config(run).patience == 2
    history = CheckpointDir(run.stage_dir(TOTAL_COMPUTE) / "checkpoints").read_state()["history"]
    assert 1 <= len(history) <= total_compute_epochs(run)


def test_the_self_distillation_teacher_is_the_generalist(finished):
    run, _ = finished
    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run))
    as_specialists = [
        restrict_outputs(load_stage(run.stage_dir(GENERALIST), new_generalist_model(run)), a, b, False)
        for a, b in run.taxonomy.vertical_ranges
    ]
    images = torch.randn(12, SPEC.dim)
    labels = torch.tensor([[c, -1] for c in range(12)])
    labels[3, 1] = 17  # an image of two verticals selects both
    mine = GeneralistTeacher(generalist, run.taxonomy, top_k=3, temperature=2.0)(images, labels)
    reference = OnlineTeachers(as_specialists, run.taxonomy, top_k=3, temperature=2.0)(images, labels)
    assert torch.allclose(mine.values, reference.values, atol=1e-6)
    assert torch.equal(mine.selected, reference.selected)


def test_a_seed_changes_every_stage(bench, tmp_path):
    path = tmp_path / "seeds.yaml"
    config = run_config(bench, tmp_path / "runs", controls={"kinds": ["same_compute", "self_distillation"]})
    path.write_text(yaml.safe_dump(config))
    out = CliRunner().invoke(app, ["seeds", str(path), "--seed", "3", "--seed", "4", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "| student - baseline (test) |" in out.output and (tmp_path / "runs" / "seeds.md").is_file()
    for seed in (3, 4):
        root = tmp_path / "runs" / f"seed_{seed}"
        dirs = [root / s for s in (GENERALIST, STUDENT, CONTROL, SELF_DISTILLATION)]
        dirs += sorted((root / "specialists").iterdir())
        for v, d in enumerate(dirs):
            state = CheckpointDir(d / "checkpoints").read_state()
            expected = seed + (v - 4 if d.parent.name == "specialists" else 0)  # specialists: seed + vertical
            assert state["seed"] == expected, d
    a = load_file(str(tmp_path / "runs/seed_3/generalist/checkpoints/best.safetensors"))
    b = load_file(str(tmp_path / "runs/seed_4/generalist/checkpoints/best.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    fixed = dict(config, student={**config["student"], "seed": 1})
    path.write_text(yaml.safe_dump(fixed))
    refused = CliRunner().invoke(app, ["seeds", str(path), "--seed", "0", "--no-progress"])
    assert refused.exit_code == 2 and "student.seed is set" in refused.output


def seed_result(student, control, gap):
    """A report's result: a generalist, a student, a control and the teachers as chosen."""
    speed = {"parameters": 10, "networks_per_image": 1, "images_per_s": 100.0, "within_vertical_mAP": 1.0}
    models = [
        {"stage": "generalist", "model": "g", "mAP": 40.0, "mean_per_vertical_AP": 40.0, **speed},
        {"stage": "student", "model": "s", "mAP": student, "mean_per_vertical_AP": student, **speed},
        {"stage": "control", "model": "c", "mAP": control, "mean_per_vertical_AP": control, **speed},
        {"stage": "teachers_chosen", "model": "t", "mAP": 75.0, "mean_per_vertical_AP": 75.0, **speed},
    ]
    headroom = {
        w: {"mAP": 70.0 - control, "mean_per_vertical_AP": 0.0} for w in ("over_strongest_baseline", "over_generalist")
    }
    headroom["chosen_teachers_over_strongest_baseline"] = {"mAP": 75.0 - control, "mean_per_vertical_AP": 0.0}
    closed = {"mAP": (student - control) / (75.0 - control), "mean_per_vertical_AP": None}
    return {
        "models": models,
        "floor": {"mAP": 5.0},
        "gap_closed": {"to_chosen_teachers": closed},
        "gap_closed_per_vertical": {"a": gap, "b": None},
        "headroom": headroom,
    }


def test_seed_summary_pairs_differences_by_seed():
    summary = summarise({0: seed_result(50, 48, 0.1), 1: seed_result(60, 61, -0.2), 2: seed_result(55, 52, 0.4)})
    assert summary["specialists_headroom"]["over_strongest_baseline_mAP"]["mean"] == pytest.approx(70 - 161 / 3)
    diff = next(p for p in summary["paired_differences"] if p["baseline"] == "control" and p["metric"] == "mAP")
    assert diff["mean"] == pytest.approx(4 / 3) and diff["wins"] == 2
    assert diff["std"] == pytest.approx(np.std([2, -1, 3], ddof=1))
    spread = summary["gap_closed_percent"]["per_vertical_from_strongest_baseline"]
    assert (spread["min"], spread["median"], spread["max"], spread["count"]) == pytest.approx((-20, 10, 40, 3))
    # the teachers as chosen are an upper reference, not a baseline: their gap and lead summarised, never paired
    assert {p["baseline"] for p in summary["paired_differences"]} == {"generalist", "control"}
    to_chosen = [100 * (s - c) / (75 - c) for s, c in ((50, 48), (60, 61), (55, 52))]
    assert summary["gap_closed_percent"]["to_chosen_teachers_mAP"]["mean"] == pytest.approx(np.mean(to_chosen))
    assert "to_chosen_teachers_mean_per_vertical_AP" not in summary["gap_closed_percent"]
    lead = summary["specialists_headroom"]["chosen_teachers_over_strongest_baseline_mAP"]
    assert lead["mean"] == pytest.approx(75 - 161 / 3)
    assert "Teachers as chosen on val (oracle-routed) minus the strongest baseline" in seeds_table(summary)
    assert summary["paired_by_teacher"] == []  # no teacher choice in these runs


def test_seed_summary_pairs_the_student_by_who_taught_each_vertical():
    def with_groups(taught, untaught):
        groups = [
            {"baseline": "control", "teacher": "specialist", "verticals": 3, "test": taught, "val": 1.0},
            {"baseline": "control", "teacher": "labelled-only control", "verticals": 2, "test": untaught, "val": 0.0},
        ]
        wins = [int(taught > 0) * 2, int(untaught > 0)]
        groups = [dict(g, test_wins=w) for g, w in zip(groups, wins, strict=True)]
        return {**seed_result(50, 48, 0.1), "student_by_teacher": groups}

    summary = summarise({0: with_groups(1.5, -0.5), 1: with_groups(-0.5, 0.2), 2: with_groups(2.0, 0.3)})
    taught = next(p for p in summary["paired_by_teacher"] if p["teacher"] == "specialist")
    assert taught["mean"] == pytest.approx(1.0) and taught["std"] == pytest.approx(np.std([1.5, -0.5, 2.0], ddof=1))
    assert (taught["wins"], taught["vertical_wins"], taught["verticals"]) == (2, 4, 9)
    assert "| control | specialist | +1.00 ± 1.32 | 2/3 | 4/9 |" in seeds_table(summary)


def test_seeds_summary_reads_runs_made_one_by_one_and_refuses_what_cannot_be_paired(tmp_path):
    runs = []
    for seed, (student, control) in enumerate(((50, 48), (60, 61), (55, 52))):
        run_dir = tmp_path / f"run_{seed}"
        run_dir.mkdir()
        (run_dir / "metrics.json").write_text(
            json.dumps({**seed_result(student, control, 0.1), "config": {"seed": seed}})
        )
        runs.append(str(run_dir))
    out = CliRunner().invoke(app, ["seeds-summary", *runs, "--out", str(tmp_path / "summary")])
    assert out.exit_code == 0, out.output
    assert "| control | mAP | +1.33 ± 2.08 | 2/3 |" in out.output
    written = json.loads((tmp_path / "summary" / "seeds.json").read_text())
    assert written["seeds"] == [0, 1, 2] and written["run_dirs"]["1"] == runs[1]
    assert (tmp_path / "summary" / "seeds.md").read_text().strip() in out.output
    # the same seed twice, a run with other models, and a run not yet reported: each named, with the fix
    twice = CliRunner().invoke(app, ["seeds-summary", runs[0], runs[0], "--out", str(tmp_path / "s2")])
    assert twice.exit_code != 0 and "seed 0 again" in twice.output and "Traceback" not in twice.output
    other = json.loads((tmp_path / "run_2" / "metrics.json").read_text())
    other["models"] = other["models"][:2]
    (tmp_path / "run_2" / "metrics.json").write_text(json.dumps(other))
    differ = CliRunner().invoke(app, ["seeds-summary", *runs, "--out", str(tmp_path / "s3")])
    assert differ.exit_code != 0 and "run_2/metrics.json: models generalist, student differ" in differ.output
    (tmp_path / "run_2" / "metrics.json").write_text(json.dumps({"config": {"seed": 2}}))
    foreign = CliRunner().invoke(app, ["seeds-summary", *runs, "--out", str(tmp_path / "s5")])
    assert foreign.exit_code != 0 and "run_2/metrics.json: not the metrics.json of `kc report`" in foreign.output
    missing = CliRunner().invoke(app, ["seeds-summary", str(tmp_path), "--out", str(tmp_path / "s4")])
    assert missing.exit_code != 0 and "metrics.json: not found" in missing.output and "kc report" in missing.output


class Constant:
    """A validation that always scores the same."""

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, model):
        return {"mAP": self.values.pop(0)}


def _trainer(tmp_path, validate, **cfg):
    from torch.utils.data import TensorDataset

    from kc.config import TrainConfig

    class Data(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x, torch.tensor([int(y)]), i

    data = Data(torch.randn(32, 4), torch.zeros(32, dtype=torch.long))
    model = torch.nn.Linear(4, 1)

    def loss(model, batch):
        return model(batch["images"]).pow(2).mean()

    tcfg = TrainConfig.model_validate({"epochs": 6, "batch_size": 8, **cfg})
    return Trainer(model, tcfg, tmp_path / "stage", data, loss, validate, progress=False, verbose=False)


def test_a_best_metric_of_zero_is_kept_as_the_best(tmp_path):
    result = _trainer(tmp_path, Constant([0.0] * 6)).fit()
    assert result.best_epoch == 1 and result.best_metric == 0.0  # later equal scores do not replace it


def test_patience_stops_at_the_val_plateau(tmp_path):
    result = _trainer(tmp_path, Constant([1.0, 3.0, 2.0, 2.5, 1.0, 9.0]), patience=2).fit()
    assert result.best_epoch == 2 and len(result.history) == 4  # epochs 3 and 4 without a gain: stopped
    again = _trainer(tmp_path, Constant([]), patience=2).fit()  # complete: nothing more is trained
    assert again.best_epoch == 2 and len(again.history) == 4


def test_a_vertical_without_val_images_has_no_validation(bench, tmp_path):
    from kc.train.common import validation_fn

    run = prepare_run(config_from_dict(run_config(bench, tmp_path / "run")), progress=False)
    a, b = run.taxonomy.vertical_ranges[0]
    assert validation_fn(run, torch.device("cpu"), 64, classes=(a, b)) is not None
    run.splits["val"] = [s for s in run.splits["val"] if not any(a <= c < b for c in s.labels)]
    assert validation_fn(run, torch.device("cpu"), 64, classes=(a, b)) is None  # keep the last epoch, not a 0.0


def test_evaluate_and_report_score_a_softmax_generalist_alike(bench, tmp_path):
    from kc.evaluate.compare import compare
    from kc.evaluate.stage import evaluate_stage
    from kc.train.generalist import train_generalist
    from kc.train.specialists import train_specialists

    data = run_config(bench, tmp_path / "run", generalist={"loss": "softmax"})
    run = prepare_run(config_from_dict(data), progress=False)
    train_generalist(run, progress=False, verbose=False)
    train_specialists(run, progress=False, verbose=False)
    alone = evaluate_stage(run, GENERALIST, "test", progress=False)
    side_by_side = next(m for m in compare(run, "test")["models"] if m["stage"] == GENERALIST)
    assert side_by_side["mAP"] == pytest.approx(alone["mAP"], abs=1e-9)
    assert side_by_side["top1"] == pytest.approx(alone["top1"])


def test_the_report_leaves_out_a_stage_still_training_and_refuses_unfinished_teachers(bench, tmp_path, monkeypatch):
    import signal

    from kc.evaluate.compare import compare
    from kc.train.controls import train_ground_truth_control
    from kc.train.generalist import train_generalist
    from kc.train.specialists import train_specialists
    from kc.train.trainer import Trainer, TrainingStopped

    run = prepare_run(config_from_dict(run_config(bench, tmp_path / "run")), progress=False)
    train_generalist(run, progress=False, verbose=False)
    train_specialists(run, progress=False, verbose=False)
    end_epoch = Trainer._end_epoch

    def stop_after_the_first_epoch(self, *args, **kwargs):  # as a SIGTERM during epoch 2 would
        end_epoch(self, *args, **kwargs)
        self._stop.requested = signal.SIGTERM

    monkeypatch.setattr(Trainer, "_end_epoch", stop_after_the_first_epoch)
    with pytest.raises(TrainingStopped):
        train_ground_truth_control(run, progress=False, verbose=False)
    monkeypatch.undo()
    control_dir = run.stage_dir(GROUND_TRUTH)
    assert (control_dir / "checkpoints/best.safetensors").is_file()  # epoch 1's best: not a result
    result = compare(run, "val")
    assert result["unfinished"] == [GROUND_TRUTH]
    assert GROUND_TRUTH not in {m["stage"] for m in result["models"]}

    stage_dir = run.stage_dir
    monkeypatch.setattr(run, "stage_dir", lambda name: control_dir if name == GENERALIST else stage_dir(name))
    with pytest.raises(CheckpointError, match="not finished training"):  # as if the generalist were still training
        compare(run, "val")


def test_a_run_made_before_a_config_key_existed_still_opens_and_refuses_a_new_value(tmp_path, tiny_benchmark):
    from kc.run import changed_keys

    cfg = config_from_dict(tiny_config(tiny_benchmark, tmp_path / "run"))
    prepare_run(cfg, progress=False)
    written = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    del written["data"]["augment"]["feature_noise"]  # as a run directory written before the key was added
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(written))
    prepare_run(cfg, progress=False)  # the default is what that run did: opens
    noisy = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    noisy["data"]["augment"]["feature_noise"] = 0.3
    assert changed_keys(written, noisy) == ["data.augment.feature_noise"]
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(written))
    raw = tiny_config(tiny_benchmark, tmp_path / "run")
    raw["data"]["augment"] = {"feature_noise": 0.3}
    with pytest.raises(CheckpointError, match="differs in: data.augment.feature_noise"):
        prepare_run(config_from_dict(raw), progress=False)
