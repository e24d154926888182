"""The `kc` command end to end on the tiny benchmark, and its handling of user errors."""

import json
import subprocess
import sys

import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from kc.cli import app

runner = CliRunner()


def write_config(tmp_path, bench, **generalist):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(bench, tmp_path / "run", **generalist)))
    return path


def test_generalist_then_evaluate(tmp_path, tiny_benchmark):
    config = write_config(tmp_path, tiny_benchmark)
    result = runner.invoke(app, ["generalist", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "taxonomy.json",
        "data/train.jsonl",
        "data/check.json",
        "generalist/checkpoints/best.safetensors",
        "generalist/checkpoints/last.json",
    ):
        assert (run / name).is_file(), name
    assert list((run / "generalist" / "tensorboard").iterdir())
    state = json.loads((run / "generalist/checkpoints/last.json").read_text())
    assert state["complete"] and len(state["history"]) == 2 and "val_mAP" in state["history"][0]

    result = runner.invoke(app, ["evaluate", str(run), "--no-progress"])  # a run directory works as well
    assert result.exit_code == 0, result.output
    assert "mean per-vertical AP" in result.output and "mAP (over classes)" in result.output
    metrics = json.loads((run / "generalist/metrics_test.json").read_text())
    assert 0 <= metrics["mAP"] <= 100 and metrics["images"] == 3 * 4 * 4
    assert set(metrics["per_vertical"]) == {"v00", "v01", "v02"}

    # A second run of the same command skips the finished stage.
    again = runner.invoke(app, ["generalist", str(config), "--no-progress"])
    assert again.exit_code == 0 and "resuming" not in again.output


def test_reusing_a_run_directory_with_other_data_is_refused(tmp_path, tiny_benchmark):
    config = write_config(tmp_path, tiny_benchmark)
    assert runner.invoke(app, ["generalist", str(config), "--no-progress"]).exit_code == 0
    result = runner.invoke(app, ["generalist", str(config), "--no-progress", "--set", "data.image_size=12"])
    assert result.exit_code == 2
    assert "another config (differs in: data.image_size)" in result.output


def test_user_errors_exit_2_without_traceback(tmp_path, tiny_benchmark):
    config = write_config(tmp_path, tiny_benchmark)
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text() + "learning_rate: 3\n")
    proc = subprocess.run([sys.executable, "-m", "kc.cli", "generalist", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "learning_rate: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nowhere.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output


def test_generate_benchmark_command(tmp_path):
    out = tmp_path / "b"
    result = runner.invoke(
        app,
        [
            "generate-benchmark",
            str(out),
            "--preset",
            "tiny",
            "--verticals",
            "2",
            "--train-per-class",
            "2",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "benchmark.json").read_text())["verticals"] == 2
    bad = runner.invoke(app, ["generate-benchmark", str(out), "--preset", "huge"])
    assert bad.exit_code == 2 and "not one of tiny, default, large" in bad.output


def test_demo_on_the_tiny_preset(tmp_path):
    short = ["--set", "generalist.epochs=2", "--set", "specialists.epochs=2", "--set", "student.epochs=2"]
    demo = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--preset", "tiny", "--run-dir", str(demo), "--no-progress", *short])
    assert result.exit_code == 0, result.output
    assert "| student |" in result.output and "wall time" in result.output
    for control in ("same compute", "self-distillation", "ground truth, student's head", "total compute"):
        assert f"| control: {control} |" in result.output
    assert "from the strongest baseline" in result.output
    assert (demo / "run" / "report.md").is_file() and (demo / "run" / "timings.json").is_file()
    metrics = json.loads((demo / "run" / "metrics.json").read_text())
    assert {m["stage"] for m in metrics["models"]} >= {"control", "control_self_distillation", "control_total_compute"}
    assert metrics["strongest_baseline"]["chosen_on"] == "val mAP"


def test_a_moved_run_directory_still_works(tmp_path, tiny_benchmark):
    import shutil

    config = write_config(tmp_path, tiny_benchmark)
    assert runner.invoke(app, ["generalist", str(config), "--no-progress"]).exit_code == 0
    shutil.move(tmp_path / "run", tmp_path / "moved")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "moved"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "moved" / "generalist" / "metrics_test.json").is_file()


def test_fixing_the_data_config_after_a_data_error_is_accepted(tmp_path, tiny_benchmark):
    import shutil

    bench = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, bench)
    first = next(p for p in sorted((bench / "images" / "train").rglob("*.png")))
    first.write_bytes(b"not a png")
    config = write_config(tmp_path, bench)
    failed = runner.invoke(app, ["generalist", str(config), "--no-progress"])
    assert failed.exit_code == 2 and "1 unreadable image(s)" in failed.output and "bad_images: skip" in failed.output
    fixed = runner.invoke(app, ["generalist", str(config), "--no-progress", "--set", "data.bad_images=skip"])
    assert fixed.exit_code == 0, fixed.output
    check = json.loads((tmp_path / "run" / "data" / "check.json").read_text())
    assert [s["path"] for s in check["skipped"]] == [str(first.relative_to(bench))]


def test_version_names_kc_and_the_libraries_and_checkpoints_record_them(tmp_path, tiny_benchmark):
    import torch

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("kc ") and f"torch {torch.__version__}" in result.output
    config = write_config(tmp_path, tiny_benchmark)
    assert runner.invoke(app, ["generalist", str(config), "--no-progress"]).exit_code == 0
    state = json.loads((tmp_path / "run/generalist/checkpoints/last.json").read_text())
    assert state["versions"]["torch"] == torch.__version__ and "timm" in state["versions"]
    assert state["config"]["epochs"] == 2  # what the stage was trained with, whatever config.yaml says later


def test_every_command_flushes_subnormal_floats_on_every_thread():
    """`kc` sets the flag before torch starts its worker threads, which then inherit it: a parallel product whose
    results are all subnormal comes out all zeros (kc.numerics). Set after the threads exist, it would not be."""
    check = (
        "import torch; from kc import cli; cli.app = lambda: None; cli.main(); "
        "x = torch.full((1 << 20,), 1e-30); print(int((x * 1e-9).count_nonzero()))"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "0"
