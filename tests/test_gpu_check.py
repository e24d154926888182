"""The prepared GPU check (benchmarks/gpu_check.py) runs every step end to end in its CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_stage_and_records_its_figures(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr + (tmp_path / "log.txt").read_text()
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["device"] == "cpu" and result["processes"] == 1
    assert set(result["command_seconds"]) == {"generalist", "specialists", "cache", "student", "export"}
    taxonomy = json.loads((tmp_path / "data" / "taxonomy.json").read_text())
    assert len(taxonomy["classes"]) == result["scale"]["classes"] == 1000
    assert result["specialists"]["specialists"] == len(taxonomy["verticals"]) == 10
    for stage in ("generalist", "specialists", "student"):
        assert result[stage]["train_images_per_s"] > 0
        assert result[stage]["peak_gpu_mib"] is None  # no GPU: no figure, rather than a made-up one
    assert result["export"]["inference_images_per_s"] > 0
    # the student trained from the cache the check built, and the export is the student's
    assert (tmp_path / "run" / "cache" / "index.json").is_file()
    manifest = json.loads((tmp_path / "run" / "export" / "student-torchscript" / "kc_model.json").read_text())
    assert manifest["stage"] == "student" and manifest["classes"] == 1000
    assert "| student |" in done.stdout
