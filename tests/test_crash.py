"""Crash safety: a stage killed by SIGKILL at a random moment, or stopped by SIGTERM, resumes to the same weights."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from conftest import tiny_config


def write_config(tmp_path, tiny_benchmark, name):
    data = tiny_config(tiny_benchmark, tmp_path / name, epochs=12)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def generalist(config, wait=True):
    command = [sys.executable, "-m", "kc.cli", "generalist", str(config), "--no-progress"]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run_dir, process, step=1):
    """Until the stage's last checkpoint is at `step` or later (12 epochs x 9 steps, one checkpoint every 2)."""
    last = run_dir / "generalist" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 120  # generous: on a loaded machine, starting Python and torch takes a while
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return
        try:
            if json.loads(last.read_text())["step"] >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)


def final_weights(run_dir):
    checkpoints = run_dir / "generalist" / "checkpoints"
    return load_file(str(checkpoints / "best.safetensors")), (checkpoints / "last.json").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_benchmark):
    tmp_path = tmp_path_factory.mktemp("straight")
    done = generalist(write_config(tmp_path, tiny_benchmark, "run"))
    assert done.returncode == 0, done.stderr
    return final_weights(tmp_path / "run")


def same(a, b):
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_then_rerun_gives_the_uninterrupted_weights(
    tmp_path, tiny_benchmark, uninterrupted, seed
):
    config = write_config(tmp_path, tiny_benchmark, "run")
    process = generalist(config, wait=False)
    rng = random.Random(seed)
    wait_for_checkpoint(tmp_path / "run", process, step=rng.randint(2, 90))
    time.sleep(rng.uniform(0.0, 0.05))  # anywhere in a step, a checkpoint write included
    assert process.poll() is None, "the stage ended before the kill: make it longer"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    again = generalist(config)
    assert again.returncode == 0, again.stderr
    assert "resuming at epoch" in again.stdout + again.stderr
    weights, _ = final_weights(tmp_path / "run")
    assert same(weights, uninterrupted[0])
    leftovers = [p.name for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []  # no half-written file survives in the run directory


def test_sigterm_stops_after_a_checkpoint_and_the_rerun_resumes_there(tmp_path, tiny_benchmark, uninterrupted):
    config = write_config(tmp_path, tiny_benchmark, "run")
    process = generalist(config, wait=False)
    wait_for_checkpoint(tmp_path / "run", process, step=20)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    stopped_at = int(stderr.split("step ")[1].split(",")[0])
    again = generalist(config)
    assert again.returncode == 0, again.stderr
    assert "resuming at epoch" in again.stdout + again.stderr and f"step {stopped_at}" in again.stdout + again.stderr
    assert same(final_weights(tmp_path / "run")[0], uninterrupted[0])
