"""Decoding images, and checking a whole dataset's images before any training starts."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from kc.data.samples import Sample
from kc.errors import DataError, format_problems


def decode_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, EXIF rotation applied. Raises OSError/ValueError on unreadable files."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Composite transparency onto white rather than letting it turn black.
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return img.convert("RGB")


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
    paths = [image_root / s.path for s in samples]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(
            tqdm(
                pool.map(image_problem, paths),
                total=len(paths),
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
