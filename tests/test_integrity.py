"""Damaged files are found where they are read, named, and (checkpoints) passed over for the one before.

Each kind of damage a disk or a copy can do: cut short, emptied, one bit flipped."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from kc.checkpoint import CheckpointDir
from kc.config import config_from_dict
from kc.errors import CheckpointError
from kc.run import prepare_run
from kc.stages import GENERALIST, load_stage, new_generalist_model
from kc.train.generalist import train_generalist

DAMAGE = ("truncated", "zero bytes", "bit flipped")


def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "zero bytes":
        data = bytearray()
    else:
        data[len(data) - 9] ^= 0x10  # inside the last tensor's data: still a well-formed file
    path.write_bytes(bytes(data))


def two_checkpoints(root):
    model, ckpt = torch.nn.Linear(3, 2), CheckpointDir(root)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = []
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ckpt.save(model, optimizer, {"step": step, "epoch": 0, "step_in_epoch": step, "history": []})
        weights.append(model.weight.detach().clone())
    return ckpt, weights


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("which", ["model_file", "train_file", "last.json"])
def test_a_damaged_last_checkpoint_is_passed_over_for_the_one_before(tmp_path, which, how, capsys):
    ckpt, weights = two_checkpoints(tmp_path)
    last = ckpt.read_state()
    assert last["step"] == 2 and set(last["sha256"]) == {last["model_file"], last["train_file"]}
    damage(tmp_path / (which if which == "last.json" else last[which]), how)
    state = CheckpointDir(tmp_path).read_state()
    assert state["step"] == 1
    assert "resuming from the checkpoint before it (step 1)" in capsys.readouterr().err
    model = torch.nn.Linear(3, 2)
    CheckpointDir(tmp_path).restore(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.equal(model.weight, weights[0])


def test_when_both_checkpoints_are_damaged_the_error_names_the_files(tmp_path):
    ckpt, _ = two_checkpoints(tmp_path)
    damage(tmp_path / ckpt.read_state()["model_file"], "bit flipped")
    damage(tmp_path / "previous.json", "truncated")
    with pytest.raises(CheckpointError) as err:
        CheckpointDir(tmp_path).read_state()
    assert "model-s000000002.safetensors: damaged" in str(err.value) and "previous.json" in str(err.value)


def test_only_the_last_two_checkpoints_files_are_kept(tmp_path):
    ckpt, _ = two_checkpoints(tmp_path)
    model = torch.nn.Linear(3, 2)
    ckpt.save(model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 3, "epoch": 0, "history": []})
    assert sorted(p.name for p in tmp_path.glob("model-*")) == [
        "model-s000000002.safetensors",
        "model-s000000003.safetensors",
    ]


def test_a_stage_resumes_past_a_damaged_checkpoint_to_the_same_weights(tiny_benchmark, tmp_path):
    run = prepare_run(config_from_dict(tiny_config(tiny_benchmark, tmp_path / "run")), progress=False)
    best = train_generalist(run, progress=False, verbose=False).best_weights
    final = load_file(str(best))
    root = run.stage_dir(GENERALIST) / "checkpoints"
    damage(root / CheckpointDir(root).read_state()["model_file"], "bit flipped")
    again = train_generalist(run, progress=False, verbose=False)  # resumes from the checkpoint before the last
    assert again.resumed_from_step > 0
    for name, tensor in load_file(str(again.best_weights)).items():
        torch.testing.assert_close(tensor, final[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_best_weights_are_refused_naming_the_file(tiny_benchmark, tmp_path, how):
    run = prepare_run(config_from_dict(tiny_config(tiny_benchmark, tmp_path / "run", epochs=1)), progress=False)
    train_generalist(run, progress=False, verbose=False)
    copy = tmp_path / "copy"
    shutil.copytree(run.stage_dir(GENERALIST), copy)
    load_stage(copy, new_generalist_model(run))  # intact: loads
    damage(copy / "checkpoints/best.safetensors", how)
    with pytest.raises(CheckpointError, match=r"best.safetensors: damaged"):
        load_stage(copy, new_generalist_model(run))


def test_a_state_file_changed_into_other_valid_json_is_found(tmp_path):
    ckpt, _ = two_checkpoints(tmp_path)
    text = (tmp_path / "last.json").read_text()
    assert '"step_in_epoch": 2' in text
    (tmp_path / "last.json").write_text(text.replace('"step_in_epoch": 2', '"step_in_epoch": 3'))
    assert CheckpointDir(tmp_path).read_state()["step"] == 1


def failing_replace(monkeypatch, name_part, errno_code=28):
    """os.replace fails with ENOSPC (28) for files whose name holds `name_part`: a disk full at that write."""
    import os

    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if name_part in str(dst):
            raise OSError(errno_code, os.strerror(errno_code))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_a_full_disk_leaves_the_previous_file_and_names_the_path(tmp_path, monkeypatch):
    from kc.io import WriteError, atomic_write, atomic_write_text

    target = tmp_path / "report.md"
    atomic_write_text(target, "the previous report\n")

    def half_then_full(tmp):
        tmp.write_bytes(b"x" * 3_000_000)
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError) as err:
        atomic_write(target, half_then_full)
    message = str(err.value)
    assert str(target) in message and "No space left on device" in message and "MB free there" in message
    assert "2.9 MB of it written" in message and "run the same command again" in message
    assert target.read_text() == "the previous report\n" and not list(tmp_path.glob(".*.tmp"))


def test_a_stage_stopped_by_a_full_disk_resumes_to_the_same_weights(tiny_benchmark, tmp_path, monkeypatch):
    from kc.io import WriteError

    straight = prepare_run(config_from_dict(tiny_config(tiny_benchmark, tmp_path / "straight")), progress=False)
    expected = load_file(str(train_generalist(straight, progress=False, verbose=False).best_weights))
    run = prepare_run(config_from_dict(tiny_config(tiny_benchmark, tmp_path / "run")), progress=False)
    with monkeypatch.context() as patch:
        failing_replace(patch, "train-s000000006")  # the disk fills while the third checkpoint is written
        with pytest.raises(WriteError, match="train-s000000006.safetensors: could not be written"):
            train_generalist(run, progress=False, verbose=False)
    assert CheckpointDir(run.stage_dir(GENERALIST) / "checkpoints").read_state()["step"] == 4
    again = train_generalist(run, progress=False, verbose=False)
    assert again.resumed_from_step == 4
    for name, tensor in load_file(str(again.best_weights)).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)


def test_a_command_stopped_by_a_full_disk_in_a_library_write_says_so_without_a_traceback(capsys):
    import typer

    from kc.cli import user_errors

    @user_errors
    def export():
        raise OSError(28, "No space left on device", "/runs/r/export/model.onnx")

    with pytest.raises(typer.Exit) as stopped:
        export()
    assert stopped.value.exit_code == 2
    err = capsys.readouterr().err
    assert "/runs/r/export/model.onnx: No space left on device" in err and "run the same command again" in err

    @user_errors
    def other():
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):  # not a full disk: not hidden
        other()
