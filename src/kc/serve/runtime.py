"""Loading a model for prediction: an export directory (ONNX via onnxruntime, or TorchScript), or a run directory
(the stage's safetensors weights in the PyTorch model). One interface: preprocessed images in, logits or scores out.

TorchScript archives are loaded with `torch.jit.load`, which runs the archive's TorchScript program: load only
exports you made or trust. ONNX files and run directories (safetensors) carry no code.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kc.config import load_config
from kc.data.images import Preprocess
from kc.errors import CheckpointError
from kc.io import sha256_file
from kc.run import stage_path
from kc.serve.artifact import MANIFEST, read_manifest
from kc.taxonomy import Taxonomy


class LoadedModel:
    """A network with its label table, preprocessing and output activation."""

    def __init__(
        self, run_fn: Any, taxonomy: Taxonomy, preprocess: Preprocess, activation: str, description: str, threads: int
    ):
        self._run = run_fn
        self.taxonomy = taxonomy
        self.preprocess = preprocess
        self.activation = activation
        self.description = description
        self.threads = threads
        self._lock = threading.Lock()  # one batch at a time: the runtimes use all their threads per batch

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32, preprocessed -> (B, N) float32 logits."""
        with self._lock:
            return self._run(np.ascontiguousarray(images, dtype=np.float32))

    def scores(self, images: np.ndarray) -> np.ndarray:
        z = self.logits(images)
        if self.activation == "softmax":
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        return 1.0 / (1.0 + np.exp(-z))


def _torch_runner(module: torch.nn.Module, threads: int) -> Any:
    def run(images: np.ndarray) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return module(torch.from_numpy(images)).float().numpy()

    return run


def _onnx_runner(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CheckpointError(f"{path}: onnxruntime cannot load it: {exc}") from None
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: images})[0]

    return run


def open_model(path: Path, stage: str = "student", threads: int | None = None) -> LoadedModel:
    """An export directory (kc_model.json) or a run directory (config.yaml; `stage` picks the model)."""
    threads = threads or torch.get_num_threads()
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        taxonomy = Taxonomy.load(path / "taxonomy.json")
        model_file = path / manifest["file"]
        if not model_file.is_file():
            raise CheckpointError(f"{model_file}: missing; the export is incomplete, export again")
        recorded = manifest.get("sha256")  # absent in exports written before digests were recorded
        if recorded is not None and sha256_file(model_file) != recorded:
            raise CheckpointError(
                f"{model_file}: damaged (its SHA-256 is not the one {MANIFEST} recorded); export the model again"
            )
        if manifest["format"] == "onnx":
            run_fn = _onnx_runner(model_file, threads)
        elif manifest["format"] == "hub":
            from kc.serve.hub import load_hub_model  # builds the stage's model: torch and timm, not the server's

            run_fn = _torch_runner(load_hub_model(path), threads)
        else:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream, but still what LibTorch loads
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(model_file), map_location="cpu").eval()
            run_fn = _torch_runner(module, threads)
        p = manifest["preprocess"]
        preprocess = Preprocess(int(p["size"]), tuple(p["mean"]), tuple(p["std"]), p.get("interpolation", "bilinear"))
        return LoadedModel(
            run_fn, taxonomy, preprocess, manifest["activation"], f"{manifest['format']} export {path}", threads
        )
    if (path / "config.yaml").is_file():
        return _open_run_stage(path, stage, threads)
    raise CheckpointError(
        f"{path}: neither a kc export (no {MANIFEST}) nor a run directory (no config.yaml); "
        "give the directory written by `kc export`, or a run directory"
    )


def _open_run_stage(run_dir: Path, stage: str, threads: int) -> LoadedModel:
    from kc.stages import FULL_MODEL_STAGES, activation, build_stage_model, load_stage

    if stage not in FULL_MODEL_STAGES:
        raise CheckpointError(f"--stage: '{stage}' is not one of {', '.join(FULL_MODEL_STAGES)}")
    cfg = load_config(run_dir / "config.yaml", {"run_dir": str(run_dir.resolve())})
    taxonomy = Taxonomy.load(run_dir / "taxonomy.json")
    architecture = build_stage_model(stage, cfg.model, cfg.student, taxonomy.vertical_sizes(), with_weights=False)
    model = load_stage(stage_path(run_dir.resolve(), stage), architecture).eval()
    how = activation(stage, cfg.generalist.loss)
    preprocess = Preprocess(cfg.data.image_size, cfg.data.mean, cfg.data.std, cfg.data.interpolation)
    return LoadedModel(_torch_runner(model, threads), taxonomy, preprocess, how, f"{stage} of run {run_dir}", threads)
