"""Run-directory locks: a second writer of a stage or cache shard is refused at once, naming the holder; a lock
left by a dead process is taken over."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import tiny_config
from kc.config import config_from_dict
from kc.locks import DirectoryLock, RunLockedError
from kc.run import prepare_run
from kc.stages import GENERALIST
from kc.train.generalist import train_generalist

HOLD = (
    "import sys, time; from kc.locks import DirectoryLock\nwith DirectoryLock(sys.argv[1], 'x'):\n"
    "    print('held', flush=True); time.sleep(60)\n"
)


def hold_in_another_process(directory):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(RunLockedError) as err, DirectoryLock(tmp_path, "stage 'generalist'"):
            pass
        message = str(err.value)
        assert f"PID {holder.pid} on {socket.gethostname()}" in message and "stage 'generalist'" in message
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing anything itself
        holder.wait()
    with DirectoryLock(tmp_path, "stage 'generalist'"):
        assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
    with DirectoryLock(tmp_path, "stage 'generalist'"):  # released on leaving the block
        pass


def test_named_locks_of_one_directory_are_independent(tmp_path):
    with DirectoryLock(tmp_path, "shard 0", name="teacher_000"), DirectoryLock(tmp_path, "shard 1", name="teacher_001"):
        with pytest.raises(RunLockedError):
            with DirectoryLock(tmp_path, "shard 0 again", name="teacher_000"):
                pass


def test_training_a_stage_another_process_holds_is_refused_before_anything_is_written(tiny_benchmark, tmp_path):
    run = prepare_run(config_from_dict(tiny_config(tiny_benchmark, tmp_path / "run")), progress=False)
    stage_dir = run.stage_dir(GENERALIST)
    holder = hold_in_another_process(stage_dir)
    try:
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            train_generalist(run, progress=False, verbose=False)
        assert not (stage_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train_generalist(run, progress=False, verbose=False).best_epoch >= 0  # the lock's holder is gone
