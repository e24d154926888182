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
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from kc.data.features import feature_problems, is_feature_path
from kc.data.samples import Sample
from kc.data.shards import image_source
from kc.errors import DataError, format_problems


def decode_rgb(source: Path | BinaryIO, max_pixels: int | None = None, target: int | None = None) -> Image.Image:
    """Open an image (a path or a binary file) as RGB, EXIF rotation applied. Raises OSError/ValueError on
    unreadable data, ImageTooLarge above `max_pixels` (checked from the header, before decoding).

    With `target` (the model's input size), a large image is decoded small where its format allows (JPEG: the
    decoder scales by 1/2 to 1/8) and box-filtered to a shorter side of about 2 x `target` right after: the
    antialiased resize to `target` that follows then gives nearly the same pixels as from full size (within a
    level or two of 255 on smooth images), for a fraction of the memory and time. Training, evaluation and
    serving decode alike.

    A `max_pixels` above Pillow's own decompression-bomb limit raises that limit to it (Pillow reads one
    process-wide value; it is raised, never lowered): the caller's limit is the one that holds."""
    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    if isinstance(source, Path):
        source = image_source(source)  # a member of a .tar shard, or the file
    with warnings.catch_warnings():
        # The limit is checked here, from the header: Pillow's warning (between its limit and twice it) is not
        # relied on, since warning filters are process-wide and images are checked on several threads at once.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as img:  # raises DecompressionBombError above twice Pillow's limit
            if limit is not None and img.width * img.height > limit:
                raise ImageTooLarge(f"{img.width}x{img.height} pixels exceeds the limit of {limit:,}")
            if target is not None:
                img.draft("RGB", (2 * target, 2 * target))  # only JPEG decoders act on it
            ImageOps.exif_transpose(img, in_place=True)  # in place: no full-size copy
            if img.mode.startswith("I"):  # 16-bit grey (I;16*, or I as Pillow opens some PNGs): Pillow's
                # own conversion clips everything above 255 to white; scale the 16-bit range to 8 bits instead
                values = np.asarray(img, dtype=np.uint32)
                img = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
            elif img.mode == "F":
                img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Composite transparency onto white rather than letting it turn black.
                img = _reduced(img if img.mode == "RGBA" else img.convert("RGBA"), target)
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, img).convert("RGB")
            if img.mode not in REDUCIBLE:
                img = img.convert("RGB")
            img = _reduced(img, target)
            return img if img.mode == "RGB" else img.convert("RGB")


# Modes the box filter reduces as they are decoded (others are converted to RGB first).
REDUCIBLE = ("RGB", "L")


def _reduced(img: Image.Image, target: int | None) -> Image.Image:
    """`img` box-filtered to a shorter side of about 2 x `target` when it is at least twice that: the whole image
    kept (no edge dropped, unlike a whole-factor reduce), so the resize that follows sees the same field of view."""
    scale = min(img.size) / (2 * target) if target else 1.0
    if scale < 2:
        return img
    size = (max(1, round(img.width / scale)), max(1, round(img.height / scale)))
    return img.resize(size, Image.Resampling.BOX)


def decode_bytes(width: int, height: int, mode: str) -> int:
    """The most memory decoding an image of this size and mode holds at once (`decode_rgb`), with a margin: the
    image as decoded, plus a full-size RGB(A) copy where its mode is converted before it is reduced."""
    decoded = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "RGBA": 4}.get(mode, 4)
    converted = 0 if mode in REDUCIBLE else 4 + (4 if mode.startswith("I") or mode == "F" else 0)
    return int(width * height * (decoded + converted) * 1.25)


class ImageTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class Preprocess:
    """Decoded image -> model input: resize the shorter side to `size` and centre-crop (only when the image is not
    already size x size), scale to [0, 1], normalise. Shared by training, evaluation, export and serving."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # or bicubic

    def to_unit(self, img: Image.Image) -> torch.Tensor:
        """(3, size, size) floats in [0, 1], before normalisation (training augments here)."""
        x = TF.pil_to_tensor(img)
        if x.shape[-2:] != (self.size, self.size):
            how = InterpolationMode(self.interpolation)
            x = TF.center_crop(TF.resize(x, self.size, interpolation=how, antialias=True), [self.size, self.size])
        return x.float().div_(255.0)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalise(self.to_unit(img))


def image_problem(path: Path, max_pixels: int | None = None) -> str | None:
    """None if the image decodes fully, else why not."""
    try:
        decode_rgb(path, max_pixels=max_pixels).load()
    except FileNotFoundError:
        return "file not found"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, ImageTooLarge) as exc:
        return f"too large to decode safely ({exc}); to admit it, raise data.max_image_pixels"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"unreadable image ({exc.__class__.__name__}: {exc})"
    return None


def check_images(
    samples: list[Sample],
    image_root: Path,
    policy: str,
    threads: int = 4,
    progress: bool = True,
    max_pixels: int | None = None,
) -> tuple[list[Sample], list[dict[str, str]]]:
    """Decode every image once (refusing those above `max_pixels`, default Pillow's limit). policy 'fail': raise
    listing every bad image; 'skip': drop and report them."""

    features = [i for i, s in enumerate(samples) if is_feature_path(s.path)]
    images = [i for i, s in enumerate(samples) if not is_feature_path(s.path)]
    results: list[str | None] = [None] * len(samples)
    for i, why in zip(features, feature_problems(image_root, [samples[i].path for i in features]), strict=True):
        results[i] = why
    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = tqdm(
            pool.map(lambda i: image_problem(image_root / samples[i].path, max_pixels), images),
            total=len(images),
            desc="checking images",
            disable=not progress or not images,
            leave=False,
            unit="img",
        )
        for i, why in zip(images, found, strict=True):
            results[i] = why
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
