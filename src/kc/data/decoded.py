"""Decoded images, kept once per run (`data.decoded_cache`): every image of the run decoded and resized to
`image_size` a single time, then read by every epoch of every stage instead of being decoded again.

    RUN/data/decoded_<size>_<interpolation>.npy    (N, 3, size, size) uint8, memory-mapped
    RUN/data/decoded_<size>_<interpolation>.json   the image of each row (paths), size, interpolation; written last

What is stored is exactly what decoding gives before augmentation and normalisation (`Preprocess.to_unit` times
255, as uint8), so training from the cache gives the same tensors as decoding every time (tested). Large photos
decode in tens of milliseconds each; a row of the array is read in microseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kc.config import DataConfig
from kc.data.images import Preprocess, decode_rgb
from kc.data.samples import Sample
from kc.errors import DataError
from kc.io import atomic_write, atomic_write_json, read_json


def decoded_path(data_dir: Path, cfg: DataConfig) -> Path:
    return data_dir / f"decoded_{cfg.image_size}_{cfg.interpolation}.npy"


class DecodedImages:
    """The decoded cache of a run, by image path."""

    def __init__(self, path: Path):
        meta = read_json(path.with_suffix(".json"))
        self.rows = {p: i for i, p in enumerate(meta["paths"])}
        self.pixels = np.load(path, mmap_mode="r")

    def get(self, path: str) -> torch.Tensor | None:
        """(3, S, S) floats in [0, 1], as `Preprocess.to_unit` gives them; None for an image not in the cache."""
        row = self.rows.get(path)
        if row is None:
            return None
        return torch.from_numpy(np.array(self.pixels[row])).float().div_(255.0)


def ensure_decoded(
    data_dir: Path, cfg: DataConfig, samples: list[Sample], image_root: Path, progress: bool = True
) -> Path:
    """The run's decoded cache, built first if it is missing or holds other images (an interrupted build leaves no
    index, so it is rebuilt); returns its path."""
    path = decoded_path(data_dir, cfg)
    paths = [s.path for s in samples]
    index = path.with_suffix(".json")
    if not (index.is_file() and path.is_file() and read_json(index).get("paths") == paths):
        _build(path, cfg, paths, image_root, progress)
    return path


def _build(path: Path, cfg: DataConfig, paths: list[str], image_root: Path, progress: bool) -> None:
    path.with_suffix(".json").unlink(missing_ok=True)  # stale from here on
    preprocess = Preprocess(cfg.image_size, cfg.mean, cfg.std, cfg.interpolation)
    size = cfg.image_size

    def write(tmp: Path) -> None:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
        for row, rel in enumerate(tqdm(paths, desc="decoding images once", disable=not progress, unit="img")):
            try:
                img = decode_rgb(image_root / rel, max_pixels=cfg.max_image_pixels, target=size)
            except (OSError, ValueError, SyntaxError) as exc:
                raise DataError(f"{image_root / rel}: cannot read: {exc}") from None
            pixels[row] = preprocess.to_unit(img).mul_(255.0).round_().to(torch.uint8).numpy()
        pixels.flush()
        del pixels

    atomic_write(path, write)
    atomic_write_json(
        path.with_suffix(".json"), {"paths": paths, "image_size": size, "interpolation": cfg.interpolation}
    )
