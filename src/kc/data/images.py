"""Decoding images, and checking a whole dataset's images before any training starts."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from kc.data.features import feature_problem, is_feature_path
from kc.data.samples import Sample
from kc.data.shards import image_source
from kc.errors import DataError, format_problems


def decode_rgb(source: Path | BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """Open an image (a path or a binary file) as RGB, EXIF rotation applied. Raises OSError/ValueError on
    unreadable data, ImageTooLarge above `max_pixels` (checked from the header, before decoding)."""
    if isinstance(source, Path):
        source = image_source(source)  # a member of a .tar shard, or the file
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLarge(f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels:,}")
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):  # 16-bit grey (I;16*, or I as Pillow opens some PNGs): Pillow's
                # own conversion clips everything above 255 to white; scale the 16-bit range to 8 bits instead
                values = np.asarray(img, dtype=np.uint32)
                return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
            if img.mode == "F":
                return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Composite transparency onto white rather than letting it turn black.
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return img.convert("RGB")


class ImageTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class Preprocess:
    """Decoded image -> model input: resize the shorter side to `size` and centre-crop (only when the image is not
    already size x size), scale to [0, 1], normalise. Shared by training, evaluation, export and serving."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_unit(self, img: Image.Image) -> torch.Tensor:
        """(3, size, size) floats in [0, 1], before normalisation (training augments here)."""
        x = TF.pil_to_tensor(img)
        if x.shape[-2:] != (self.size, self.size):
            x = TF.center_crop(TF.resize(x, self.size, antialias=True), [self.size, self.size])
        return x.float().div_(255.0)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalise(self.to_unit(img))


def image_problem(path: Path) -> str | None:
    """None if the image decodes fully, else why not."""
    try:
        decode_rgb(path).load()
    except FileNotFoundError:
        return "file not found"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"too large to decode safely ({exc})"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"unreadable image ({exc.__class__.__name__}: {exc})"
    return None


def check_images(
    samples: list[Sample], image_root: Path, policy: str, threads: int = 4, progress: bool = True
) -> tuple[list[Sample], list[dict[str, str]]]:
    """Decode every image once. policy 'fail': raise listing every bad image; 'skip': drop and report them."""

    def problem(sample: Sample) -> str | None:
        if is_feature_path(sample.path):
            return feature_problem(image_root, sample.path)
        return image_problem(image_root / sample.path)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(
            tqdm(
                pool.map(problem, samples),
                total=len(samples),
                desc="checking images",
                disable=not progress,
                leave=False,
                unit="img",
            )
        )
    bad = [(s, why) for s, why in zip(samples, results, strict=True) if why is not None]
    if bad and policy == "fail":
        problems = [f"{s.where}: {image_root / s.path}: {why}" for s, why in bad]
        raise DataError(
            format_problems(
                f"{len(bad)} unreadable image(s); fix or remove them, or set data.bad_images: skip", problems
            )
        )
    skipped = [{"path": s.path, "where": s.where, "why": why} for s, why in bad]
    kept = [s for s, why in zip(samples, results, strict=True) if why is None]
    return kept, skipped
