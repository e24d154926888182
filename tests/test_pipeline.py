"""The whole pipeline on the tiny benchmark: end to end, and resumed after an interruption mid-specialists."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_config
from kc.cli import app
from kc.config import config_from_dict
from kc.pipeline import run_pipeline
from kc.run import prepare_run
from kc.stages import specialist_dir

EPOCHS = {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "checkpoint_every_steps": 4}


def config(bench, run_dir):
    data = tiny_config(bench, run_dir)
    data["specialists"] = dict(EPOCHS)
    data["student"] = {**EPOCHS, "top_k": 2}
    return config_from_dict(data)


class Interrupt(Exception):
    pass


def test_pipeline_end_to_end_and_resumed_after_an_interruption_mid_specialists(tmp_path, tiny_benchmark):
    straight = prepare_run(config(tiny_benchmark, tmp_path / "straight"), progress=False)
    result = run_pipeline(straight, progress=False, verbose=False)
    names = [m["model"] for m in result["models"]]
    assert names == [
        "generalist",
        "specialists (oracle-routed)",
        "specialists (ensemble)",
        "student",
        "control: same compute",
        "control: self-distillation",
        "control: ground truth, student's head",
        "control: total compute",
    ]
    assert [m["networks_per_image"] for m in result["models"]] == [1, 3, 4, 1, 1, 1, 1, 1]
    assert all(0 <= m["mAP"] <= 100 for m in result["models"])
    report = (straight.dir / "report.md").read_text()
    assert "mean per-vertical AP" in report and "closed" in report and "```yaml" in report
    metrics = json.loads((straight.dir / "metrics.json").read_text())
    assert set(metrics["timings"]) == {
        "generalist",
        "specialists",
        "student",
        "control",
        "control_self_distillation",
        "control_ground_truth",
        "control_total_compute",
        "evaluation",
    }
    assert set(metrics["peak_memory_mib"]) == set(metrics["timings"])  # each stage's peak resident memory
    assert all(mib > 50 for mib in metrics["peak_memory_mib"].values())
    assert "peak MiB" in report

    # Interrupt in the second specialist: generalist 18 steps, first specialist 12, then 5 more.
    calls = {"n": 0}

    def interrupt(step):
        calls["n"] += 1
        if calls["n"] == 18 + 12 + 5:
            raise Interrupt

    resumed = prepare_run(config(tiny_benchmark, tmp_path / "resumed"), progress=False)
    with pytest.raises(Interrupt):
        run_pipeline(resumed, progress=False, verbose=False, on_step=interrupt)
    assert (specialist_dir(resumed, 0) / "checkpoints" / "best.safetensors").is_file()
    assert not (specialist_dir(resumed, 2) / "checkpoints").exists()
    again = run_pipeline(resumed, progress=False, verbose=False)
    for stage in ("specialists/001_v01", "student", "control"):
        a = load_file(str(straight.dir / stage / "checkpoints" / "best.safetensors"))
        b = load_file(str(resumed.dir / stage / "checkpoints" / "best.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    assert [m["mAP"] for m in again["models"]] == [m["mAP"] for m in result["models"]]


def test_stage_commands(tmp_path, tiny_benchmark):
    import yaml

    cfg = tiny_config(tiny_benchmark, tmp_path / "run")
    cfg["specialists"] = dict(EPOCHS)
    cfg["student"] = dict(EPOCHS)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    assert runner.invoke(app, ["generalist", str(path), "--no-progress"]).exit_code == 0
    missing = runner.invoke(app, ["distill", str(path), "--no-progress"])
    assert missing.exit_code == 2 and "train that stage first" in missing.output
    bad = runner.invoke(app, ["specialists", str(path), "--only", "v99", "--no-progress"])
    assert bad.exit_code == 2 and "'v99' is not a vertical" in bad.output
    one = runner.invoke(app, ["specialists", str(path), "--only", "v01", "--no-progress"])
    assert one.exit_code == 0 and "specialist v01" in one.output
    assert [p.name for p in (tmp_path / "run" / "specialists").iterdir()] == ["001_v01"]
    out = runner.invoke(app, ["pipeline", str(path), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "| student |" in out.output and (tmp_path / "run" / "report.md").is_file()
    ev = runner.invoke(app, ["evaluate", str(path), "--stage", "student", "--no-progress"])
    assert ev.exit_code == 0 and (tmp_path / "run" / "student" / "metrics_test.json").is_file()


def test_self_paced_student_end_to_end(tmp_path, tiny_benchmark):
    data = tiny_config(tiny_benchmark, tmp_path / "run")
    data["specialists"] = dict(EPOCHS)
    data["student"] = {**EPOCHS, "self_paced": {"variant": "vertical"}}
    data["control"] = False
    run = prepare_run(config_from_dict(data), progress=False)
    result = run_pipeline(run, progress=False, verbose=False)
    student = next(m for m in result["models"] if m["model"] == "student")
    assert set(student["self_paced_scales"]) == {"v00", "v01", "v02"}
    assert all(g != 2.0 for g in student["self_paced_scales"].values())  # trained away from sqrt(4)
    assert "Self-paced scales of the student" in (run.dir / "report.md").read_text()
    history = json.loads((run.dir / "student" / "checkpoints" / "last.json").read_text())["history"]
    assert {"gamma/v00", "gamma/v01", "gamma/v02"} <= set(history[-1])
    weights = load_file(str(run.dir / "student" / "checkpoints" / "best.safetensors"))
    assert weights["output_scales.gamma"].shape == (3,)

    # the report's pictures: valid PNGs, referenced by report.md and inlined in the self-contained report.html
    from PIL import Image

    report, page = (run.dir / "report.md").read_text(), (run.dir / "report.html").read_text()
    names = ["per_vertical_ap", "map_vs_cost", "training_curves", "scales"]
    for name in names:
        path = run.dir / "plots" / f"{name}.png"
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
        assert f"](plots/{name}.png)" in report
    assert page.count('src="data:image/png;base64,') == len(names) and "<table>" in page


def trained_teachers(run_dir, bench):
    """A tiny run with its generalist and specialists trained (one epoch each beyond the generalist's two)."""
    from kc.train.generalist import train_generalist
    from kc.train.specialists import train_specialists

    data = tiny_config(bench, run_dir)
    data["specialists"] = {**EPOCHS, "epochs": 1}
    data["student"] = {**EPOCHS, "epochs": 1}
    run = prepare_run(config_from_dict(data), progress=False)
    train_generalist(run, progress=False, verbose=False)
    train_specialists(run, progress=False, verbose=False)
    return run


def test_ablate_trains_every_student_on_shared_teachers_and_reports_val_apart(tmp_path, tiny_benchmark):
    run = trained_teachers(tmp_path / "run", tiny_benchmark)
    out = CliRunner().invoke(app, ["ablate", str(run.dir)])
    assert out.exit_code == 0, out.output
    table = (run.dir / "ablation" / "ablation.md").read_text()
    for name in (
        "| distillation | fc-fc |",
        "| + self-paced scales (centred) | fc-fc |",
        "| + self-paced scales (running norms) | fc-fc |",
        "| + both (paper scales) |",
        "| SC-SC + centred scales | sc-sc |",
    ):
        assert name in table
    assert "| val mAP | val - same compute | val - ground truth | test mAP |" in table and "Best on val mAP" in table
    result = json.loads((run.dir / "ablation" / "ablation.json").read_text())
    params = {s["variant"]: s["parameters"] for s in result["summary"]}
    assert params["SC-SC"] > params["+ both (paper scales)"] > params["+ self-paced scales (paper)"]
    assert params["+ self-paced scales (paper)"] > params["distillation"]
    assert params["+ self-paced scales (centred)"] == params["+ self-paced scales (paper)"]
    assert params["+ self-paced scales (running norms)"] == params["+ self-paced scales (paper)"]  # a buffer
    best = max(result["summary"], key=lambda s: s["val_mAP"])
    assert result["best_on_val"] == best["variant"]
    variant = run.dir / "ablation" / "fc-sc_vertical" / "seed_0"
    assert (variant / "specialists").is_symlink()
    assert (variant / "student" / "checkpoints" / "best.safetensors").is_file()
    assert not (variant / "control").exists()  # the FC-SC control is trained once, with the first FC-SC student
    assert (variant / "control_ground_truth" / "checkpoints" / "best.safetensors").is_file()  # per scaled variant
    plain = next(s for s in result["summary"] if s["variant"] == "distillation")
    assert plain["val_vs_truth"] == plain["val_vs_control"]  # without scales, the same control
    scaled = next(r for r in result["rows"] if r["variant"] == "+ both (paper scales)")
    assert scaled["truth_val_mAP"] != scaled["control_val_mAP"]
    # the paces: each vertical's scale at the best epoch over its scale after the first epoch, from the history
    state = json.loads((variant / "student" / "checkpoints" / "last.json").read_text())
    first, best = state["history"][0], next(h for h in state["history"] if h["epoch"] == state["best_epoch"])
    paces = next(r for r in result["rows"] if r["variant"] == "+ both (paper scales)")["paces"]
    assert paces == {vid: best[f"gamma/{vid}"] / first[f"gamma/{vid}"] for vid in paces}
    assert "pace_median" not in plain and "| + both (paper scales) | " in table.split("Paces of the self-paced")[1]
    only = CliRunner().invoke(app, ["ablate", str(run.dir), "--variant", "fc-fc_none", "--variant", "fc-sc_vertical"])
    assert only.exit_code == 0, only.output
    result = json.loads((run.dir / "ablation" / "ablation.json").read_text())
    assert [s["variant"] for s in result["summary"]] == ["distillation", "+ both (paper scales)"]
    wrong = CliRunner().invoke(app, ["ablate", str(run.dir), "--variant", "fc-sc"])
    assert wrong.exit_code != 0 and "fc-sc_vertical_centred" in wrong.output and "Traceback" not in wrong.output


def test_rank_correlation_is_spearman_s_with_ties_and_none_for_equal_sizes():
    from scipy.stats import spearmanr

    from kc.ablate import rank_correlation

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 30).tolist(), rng.normal(size=30).tolist()
    assert rank_correlation(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert rank_correlation(b, [3] * 30) is None


def test_bench_prints_every_ratio(tmp_path, tiny_benchmark):
    from kc.bench import bench, bench_table

    run = trained_teachers(tmp_path / "run", tiny_benchmark)
    result = bench(run, repeats=1, rounds=1, head_repeats=1, head_classes=(200,), memory_classes=500)
    table = bench_table(result)
    for measure in (
        "student ÷ generalist (inference)",
        "student ÷ ensemble",
        "student (cache) ÷ generalist",
        "FC512-SC64 ÷ FC512-FC64",
        "500-class head",
    ):
        assert measure in table
    assert result["inference"]["student_vs_generalist"] > 0 and result["training"]["cache_vs_generalist"] > 0
    assert not (run.dir / "cache").exists() and (run.dir / "bench" / "cache" / "index.json").is_file()


def test_cache_built_by_two_jobs_equals_the_one_process_cache_byte_for_byte(tmp_path, tiny_benchmark):
    import os
    import shutil
    import subprocess
    import sys

    run = trained_teachers(tmp_path / "run", tiny_benchmark)
    kc = [sys.executable, "-m", "kc.cli", "cache-targets", str(run.dir), "--no-progress"]
    cache = run.dir / "cache"
    two = subprocess.run([*kc, "--jobs", "2"], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert "3 teachers" in two.stdout
    by_two = {p.name: p.read_bytes() for p in cache.glob("teacher_*")}
    shutil.rmtree(cache)
    one = subprocess.run(kc, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    by_one = {p.name: p.read_bytes() for p in cache.glob("teacher_*")}
    assert len(by_one) == 3 * 4 and by_two == by_one  # rows, logits, classes and metadata of 3 teachers
