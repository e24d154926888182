"""kc under torchrun: 2 CPU processes (gloo) train, cache and evaluate as one process does.

The model uses GroupNorm and no dropout, so that a step does not depend on how its batch is split across processes
(BatchNorm statistics are per process; see docs/DISTRIBUTED.md): the 2-process run must then equal the 1-process run
with the same global batch up to float summation order.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from kc.config import load_config
from kc.distill.cache_format import cache_dir
from kc.pipeline import run_pipeline
from kc.run import prepare_run
from kc.train.generalist import train_generalist
from kc.train.student import cache_targets

WEIGHT_TOLERANCE = 1e-4  # max abs difference of any weight after training, 1 vs 2 processes
METRIC_TOLERANCE = 1e-3  # mAP points


def write_config(tmp_path, bench, name, **generalist):
    data = tiny_config(bench, tmp_path / name, **generalist)
    data["model"]["backbone_args"]["norm"] = "group"
    data["model"]["head"]["dropout"] = 0.0
    data["specialists"] = {"epochs": 1, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05}}
    data["student"] = {"epochs": 2, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05}}
    data["control"] = False
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def torchrun(*args, nproc=2, wait=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "kc.cli", *map(str, args), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def max_difference(a_path, b_path):
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def written_files(run_dir):
    """Every file of a run, TensorBoard event files named by their folder only (their names hold pid and time)."""
    names = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()]
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events", n) for n in names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_benchmark):
    tmp_path = tmp_path_factory.mktemp("ddp")
    one = prepare_run(load_config(write_config(tmp_path, tiny_benchmark, "one")), progress=False)
    run_pipeline(one, progress=False, verbose=False)
    done = torchrun("pipeline", write_config(tmp_path, tiny_benchmark, "two"))
    assert done.returncode == 0, done.stderr
    return tmp_path, one.dir, tmp_path / "two", done


def test_two_processes_train_and_evaluate_like_one_with_the_same_global_batch(runs):
    _, one, two, done = runs
    for stage in ("generalist", "student"):
        best = f"{stage}/checkpoints/best.safetensors"
        assert max_difference(one / best, two / best) < WEIGHT_TOLERANCE, stage
        history = [json.loads((d / stage / "checkpoints" / "last.json").read_text())["history"] for d in (one, two)]
        assert len(history[0]) == len(history[1]) == 2
        for a, b in zip(*history, strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
            assert a["val_mAP"] == pytest.approx(b["val_mAP"], abs=METRIC_TOLERANCE)
    # The test split was scored in two parts, one per process, and gathered.
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    for a, b in zip(metrics[0]["models"], metrics[1]["models"], strict=True):
        assert a["model"] == b["model"]
        assert a["mAP"] == pytest.approx(b["mAP"], abs=METRIC_TOLERANCE)
    # Rank 0 alone wrote: the same files as one process (one TensorBoard log per stage), none left half-written;
    # the table was printed once.
    assert written_files(two) == written_files(one)
    assert not list(two.rglob("*.tmp"))
    assert done.stdout.count("| student |") == 1


def test_cache_built_by_two_ranks_equals_one_process_cache_byte_for_byte(runs):
    tmp_path, _, two, _ = runs
    done = torchrun("cache-targets", two)
    assert done.returncode == 0, done.stderr
    assert "3 teachers" in done.stdout
    by_ranks = tmp_path / "cache-by-ranks"
    shutil.move(cache_dir(prepare_run(load_config(two / "config.yaml"), progress=False)), by_ranks)
    cache_targets(prepare_run(load_config(two / "config.yaml"), progress=False), progress=False)

    def cache_files(directory):  # the shards' locks hold who wrote them, not cache content
        return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))

    files = cache_files(by_ranks)
    assert files == cache_files(two / "cache")
    assert any(name.endswith(".logits.npy") for name in files)
    for name in files:
        assert (by_ranks / name).read_bytes() == (two / "cache" / name).read_bytes(), name


def test_stopped_under_two_processes_resumes_under_one_to_the_same_weights(tmp_path, tiny_benchmark):
    """SIGTERM to torchrun: both ranks stop at the same step after rank 0 wrote a checkpoint; the run then resumes
    as one process (the global batch and data order do not depend on the process count)."""
    # 12 epochs of 9 steps at a learning rate low enough that 1- and 2-process float sums stay within 1e-6 (at 0.05
    # over 40 epochs, training amplifies them to 3e-2 even without a stop).
    options = {"epochs": 12, "optimizer": {"name": "sgd", "lr": 0.02}}
    straight = prepare_run(load_config(write_config(tmp_path, tiny_benchmark, "straight", **options)), progress=False)
    train_generalist(straight, progress=False, verbose=False)
    config = write_config(tmp_path, tiny_benchmark, "stopped", **options)
    process = torchrun("generalist", config, wait=False)
    last = tmp_path / "stopped" / "generalist" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 120
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    state = json.loads(last.read_text())
    assert not state["complete"], "finished before the signal; the run must be longer"
    assert "stopped by SIGTERM" in stderr, stderr  # the whole of torchrun's and both ranks' output when it fails
    assert not list(last.parent.glob("*.tmp"))

    resumed = subprocess.run(
        [sys.executable, "-m", "kc.cli", "generalist", str(config), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {state['step']}" in resumed.stderr
    best = "generalist/checkpoints/best.safetensors"
    assert max_difference(straight.dir / best, tmp_path / "stopped" / best) < WEIGHT_TOLERANCE


def test_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, tiny_benchmark):
    done = torchrun("generalist", write_config(tmp_path, tiny_benchmark, "odd", batch_size=15))
    assert done.returncode != 0
    assert "kc: error: generalist: batch_size 15 does not split evenly over 2 processes" in done.stderr
    assert not re.search(r'File ".*/kc/\w+\.py"', done.stderr), "a traceback from kc (torchrun prints its own)"


def test_single_process_commands_refuse_torchrun(tmp_path, runs):
    _, _, two, _ = runs
    done = torchrun("discover-verticals", two, "-k", "3", "--out", tmp_path / "t.json")
    assert done.returncode != 0
    assert "runs as one process" in done.stderr


def test_group_norm_backbone_has_no_batch_statistics():
    import torch

    from kc.models.convnet import ConvNet

    net = ConvNet(widths=(8, 16), depth=1, num_classes=0, norm="group").eval()
    images = torch.randn(6, 3, 16, 16)
    # Each image's features are its own: the batch split across processes does not change them.
    np.testing.assert_allclose(net(images)[:3].detach(), net(images[:3]).detach(), atol=1e-6)
    with pytest.raises(ValueError, match="norm"):
        ConvNet(norm="layer")


def test_pipeline_trains_the_specialists_in_parallel_processes_to_the_same_weights(runs, tmp_path, tiny_benchmark):
    _, one, _, _ = runs
    config = write_config(tmp_path, tiny_benchmark, "jobs")
    done = subprocess.run(
        [sys.executable, "-m", "kc.cli", "pipeline", str(config), "--specialist-jobs", "2", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for folder in sorted((one / "specialists").iterdir()):
        best = f"specialists/{folder.name}/checkpoints/best.safetensors"
        assert max_difference(one / best, tmp_path / "jobs" / best) < WEIGHT_TOLERANCE, folder.name
    assert (tmp_path / "jobs" / "report.md").is_file()
