"""Checkpoints: weights in safetensors, state in JSON, written so that a crash never loses the previous one.

A checkpoint is `last.json` plus the two safetensors files it names (model weights; optimizer and RNG tensors),
named by global step. New files are written first, then `last.json` is atomically replaced to point at them, then
the old files are removed: at every instant `last.json` names complete files.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kc.errors import CheckpointError
from kc.io import atomic_write, atomic_write_json, read_json, sha256_file
from kc.models.weights import load_weights, save_weights


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, slots in state["state"].items():
        entry = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().contiguous().cpu()
                entry[name] = {"tensor": f"optim.{pid}.{name}"}
            else:
                entry[name] = value
        plain["state"][str(pid)] = entry
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, slots in plain["state"].items():
        state[int(pid)] = {
            name: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for name, v in slots.items()
        }
    return {"state": state, "param_groups": plain["param_groups"]}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    plain = {
        "python": json.loads(json.dumps(random.getstate())),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _state_digest(state: dict[str, Any]) -> str:
    """The SHA-256 of a checkpoint state as JSON (keys sorted): a state file records it of itself."""
    as_read = json.loads(json.dumps(state))  # as a reader will see it: tuples as lists, every key a string
    return hashlib.sha256(json.dumps(as_read, sort_keys=True).encode()).hexdigest()


class CheckpointDir:
    """The checkpoints of one stage: `last.json` (+ its files) for resuming, `best.safetensors` for using.

    Every file is recorded with its SHA-256 where it is named (`last.json` for a checkpoint's two files, `best.json`
    for the best weights), and checked where it is read. The checkpoint before the last is kept (`previous.json`
    and its files): a last checkpoint found damaged (truncated, zero bytes, flipped bits) is passed over for it,
    and the stage resumes from there, to the same end."""

    def __init__(self, root: Path):
        self.root = root
        self.last = root / "last.json"
        self.previous = root / "previous.json"
        self.best = root / "best.safetensors"
        self.best_info = root / "best.json"

    def exists(self) -> bool:
        return self.last.is_file() or self.previous.is_file()

    def remove_stale_temporaries(self) -> None:
        """Temporary files of writes that a killed process never finished (atomic writes leave the real files
        intact; these are litter). Only this stage writes here, and it is not writing now."""
        if self.root.is_dir():
            for tmp in self.root.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def _problem(self, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """(the state `path` holds, None) if it and the files it names are intact, else (None, what is wrong)."""
        if not path.is_file():
            return None, f"{path}: missing"
        try:
            state = read_json(path)
            names = [state["model_file"], state["train_file"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"{path}: unreadable ({exc})"
        recorded = state.pop("state_sha256", None)  # absent in checkpoints written before digests were
        if recorded is not None and _state_digest(state) != recorded:
            return None, f"{path}: damaged (its content does not match the SHA-256 it records)"
        for name in names:
            recorded = state.get("sha256", {}).get(name)  # absent in checkpoints written before digests were
            if not (self.root / name).is_file():
                return None, f"{self.root / name}: missing (named by {path.name})"
            if recorded is not None and sha256_file(self.root / name) != recorded:
                return None, f"{self.root / name}: damaged (its SHA-256 is not the one {path.name} recorded)"
        return state, None

    def read_state(self) -> dict[str, Any]:
        """The newest intact checkpoint's state: the last one, or, when it is damaged, the one before it."""
        state, problem = self._problem(self.last)
        if state is not None:
            return state
        fallback, second = self._problem(self.previous)
        if fallback is not None:
            print(f"kc: {problem}; resuming from the checkpoint before it (step {fallback['step']})", file=sys.stderr)
            return fallback
        raise CheckpointError(
            f"{problem}; and no intact checkpoint before it ({second}): delete {self.root.parent} to train this "
            "stage again"
        )

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Write the checkpoint's files, then point `last.json` at them; the last intact checkpoint before them
        becomes `previous.json`; files neither names are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        old, _ = self._problem(self.last)
        step = state["step"]
        model_file, train_file = f"model-s{step:09d}.safetensors", f"train-s{step:09d}.safetensors"
        save_weights(self.root / model_file, model)
        optim_tensors, optim_plain = _flatten_optimizer(optimizer.state_dict())
        rng_tensors, rng_plain = capture_rng()
        tensors = {**optim_tensors, **rng_tensors}
        atomic_write(self.root / train_file, lambda tmp: save_file(tensors, str(tmp)))
        new = {
            **state,
            "model_file": model_file,
            "train_file": train_file,
            "sha256": {name: sha256_file(self.root / name) for name in (model_file, train_file)},
            "optimizer": optim_plain,
            "rng": rng_plain,
        }
        if old is not None and old["model_file"] != model_file:
            atomic_write_json(self.previous, {**old, "state_sha256": _state_digest(old)})
            kept: dict[str, Any] | None = old
        else:  # the same step saved again (a stage's end): the checkpoint before it stays the previous one
            try:
                kept = read_json(self.previous)
            except (OSError, ValueError):  # none, or unreadable: nothing to keep for it
                kept = None
        atomic_write_json(self.last, {**new, "state_sha256": _state_digest(new)})
        keep = {model_file, train_file} | ({kept["model_file"], kept["train_file"]} if kept else set())
        for path in [*self.root.glob("model-s*.safetensors"), *self.root.glob("train-s*.safetensors")]:
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Load a checkpoint: `state` as `read_state` gave it (checked already), or the newest intact one."""
        state = state if state is not None else self.read_state()
        load_weights(self.root / state["model_file"], model)
        train_path = self.root / state["train_file"]
        try:
            tensors = load_file(str(train_path))
        except Exception as exc:
            raise CheckpointError(f"{train_path}: unreadable ({exc}); delete the stage folder to start over") from None
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        restore_rng(tensors, state["rng"])
        return state
