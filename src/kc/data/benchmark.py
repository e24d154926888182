"""The built-in benchmark: a seeded, hierarchical image dataset written to disk as PNGs + manifest + taxonomy.

What it models. Real fine-grained vocabularies have verticals that differ coarsely (a car is not a bird) and
classes inside a vertical that differ in fine detail (two sparrows). Here:

- a **vertical** is a coarse look: an object shape and a hue, plus a vertical-specific 4x4 *prototype texture*;
- a **class** is the vertical's prototype with its own code written at ``fine_bits`` texture positions that only
  this vertical's classes vary (each vertical varies other positions): the object's surface tiles the class's 4x4
  pattern. A specialist needs detectors for its vertical's positions only; a network over all verticals needs
  them for the union. A small generalist is therefore limited by capacity, the regime in which specialists (and
  so knowledge concentration) help. (With one shared set of varying positions, measurement showed a small network
  learns a single universal texture reader and is limited only by training time: see docs/BENCHMARKS.md);
- **within-class variation**: object position and size, texture phase, colour and brightness jitter, background
  colour, pixel noise, and a share of texture cells replaced by noise (``texture_noise``).

With ``multilabel_fraction`` > 0, that share of images holds two objects from two different verticals (left and
right halves) and carries both labels. ``label_noise`` (default 0.2) is the share of training labels that name
another class of the same vertical: the confusions of fine-grained labelling at scale (web-scale label sets such
as the paper's are noisy); val and test labels stay clean. On clean labels, measurement showed plain distillation
worth no more than the same extra training; with noisy labels the teachers' soft targets beat the labels (see
docs/BENCHMARKS.md).
Everything follows from ``seed``: the same spec writes the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from kc.errors import DataError
from kc.io import atomic_write_json, atomic_write_text
from kc.taxonomy import ClassInfo, Taxonomy, Vertical

SHAPES = ("disc", "square", "diamond", "triangle", "ring", "cross", "hbar", "vbar")
TILE = 4


@dataclass(frozen=True)
class BenchmarkSpec:
    verticals: int = 8
    classes_per_vertical: int = 12
    train_per_class: int = 120
    val_per_class: int = 10
    test_per_class: int = 25
    image_size: int = 32
    fine_bits: int = 5
    texture_cell: int = 1
    texture_noise: float = 0.05
    pixel_noise: float = 0.06
    multilabel_fraction: float = 0.0
    label_noise: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        if self.verticals < 1 or self.classes_per_vertical < 1:
            raise DataError("benchmark: verticals and classes_per_vertical must be at least 1")
        if self.image_size < 16:
            raise DataError("benchmark: image_size must be at least 16")
        if self.texture_cell < 1:
            raise DataError("benchmark: texture_cell must be at least 1 pixel")
        if not 1 <= self.fine_bits <= TILE * TILE:
            raise DataError(f"benchmark: fine_bits must be in 1..{TILE * TILE}")
        if 2**self.fine_bits < self.classes_per_vertical:
            raise DataError(
                f"benchmark: {self.classes_per_vertical} classes per vertical need fine_bits >= "
                f"{(self.classes_per_vertical - 1).bit_length()} (each class is a distinct code on fine_bits bits)"
            )
        if not 0.0 <= self.label_noise < 1.0 or (self.label_noise > 0 and self.classes_per_vertical < 2):
            raise DataError("benchmark: label_noise must be in [0, 1) and needs at least 2 classes per vertical")
        if not 0.0 <= self.multilabel_fraction <= 1.0 or (self.multilabel_fraction > 0 and self.verticals < 2):
            raise DataError("benchmark: multilabel_fraction must be in [0, 1] and needs at least 2 verticals")


PRESETS: dict[str, BenchmarkSpec] = {
    "tiny": BenchmarkSpec(
        verticals=3, classes_per_vertical=4, train_per_class=12, val_per_class=3, test_per_class=4, image_size=16
    ),
    "default": BenchmarkSpec(),
    "large": BenchmarkSpec(
        verticals=20, classes_per_vertical=50, train_per_class=60, val_per_class=5, test_per_class=10, fine_bits=6
    ),
}


@dataclass(frozen=True)
class _Design:
    """Everything about the classes that does not vary between images."""

    hues: np.ndarray  # (V,) in [0, 1)
    shapes: list[str]  # (V,)
    patterns: np.ndarray  # (V, K, TILE, TILE) bool


def _design(spec: BenchmarkSpec, rng: np.random.Generator) -> _Design:
    V, K = spec.verticals, spec.classes_per_vertical
    hues = (np.arange(V) / V + rng.uniform(0, 0.5 / V)) % 1.0
    shapes = [SHAPES[v % len(SHAPES)] for v in range(V)]
    patterns = np.zeros((V, K, TILE, TILE), dtype=bool)
    for v in range(V):
        # The vertical's classes share its prototype texture and differ only at the vertical's own `fine_bits`
        # positions, each class a distinct code there: a specialist needs detectors for its positions, a
        # generalist for the union over verticals.
        proto = rng.random(TILE * TILE) < 0.5
        positions = rng.choice(TILE * TILE, size=spec.fine_bits, replace=False)
        codes = rng.choice(2**spec.fine_bits, size=K, replace=False)
        for k, code in enumerate(codes):
            pattern = proto.copy()
            pattern[positions] = [(int(code) >> j) & 1 for j in range(spec.fine_bits)]
            patterns[v, k] = pattern.reshape(TILE, TILE)
    return _Design(hues, shapes, patterns)


def _shape_mask(shape: str, n: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    dy, dx = (yy - cy) / r, (xx - cx) / r
    if shape == "disc":
        return dy**2 + dx**2 <= 1
    if shape == "square":
        return (np.abs(dy) <= 0.85) & (np.abs(dx) <= 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= 1.1
    if shape == "triangle":
        return (dy <= 0.8) & (dy >= -1.0 + 2 * np.abs(dx) * 0.9)
    if shape == "ring":
        d = dy**2 + dx**2
        return (d <= 1) & (d >= 0.3)
    if shape == "cross":
        return ((np.abs(dy) <= 0.35) & (np.abs(dx) <= 1)) | ((np.abs(dx) <= 0.35) & (np.abs(dy) <= 1))
    if shape == "hbar":
        return (np.abs(dy) <= 0.5) & (np.abs(dx) <= 1)
    if shape == "vbar":
        return (np.abs(dx) <= 0.5) & (np.abs(dy) <= 1)
    raise ValueError(shape)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _draw_object(
    img: np.ndarray,
    design: _Design,
    spec: BenchmarkSpec,
    v: int,
    k: int,
    box: tuple[int, int, int, int],
    rng: np.random.Generator,
) -> None:
    """Draw class (v, k) into img[y0:y1, x0:x1] in place."""
    y0, y1, x0, x1 = box
    h, w = y1 - y0, x1 - x0
    n = min(h, w)
    r = n * rng.uniform(0.30, 0.46)
    cy = y0 + rng.uniform(r, h - r) if h > 2 * r else y0 + h / 2
    cx = x0 + rng.uniform(r, w - r) if w > 2 * r else x0 + w / 2
    size = img.shape[0]
    mask = _shape_mask(design.shapes[v], size, cy, cx, r)
    sub = np.zeros_like(mask)
    sub[y0:y1, x0:x1] = True
    mask &= sub
    # Texture: the class's 4x4 pattern tiled with a random phase; some cells replaced by noise.
    pattern = design.patterns[v, k]
    cell = spec.texture_cell
    oy, ox = rng.integers(0, TILE * cell, size=2)
    yy, xx = np.mgrid[0:size, 0:size]
    bits = pattern[((yy + oy) // cell) % TILE, ((xx + ox) // cell) % TILE]
    noisy = rng.random((size, size)) < spec.texture_noise
    bits = np.where(noisy, rng.random((size, size)) < 0.5, bits)
    hue = design.hues[v] + rng.normal(0, 0.02)
    bright = _hsv_to_rgb(hue, rng.uniform(0.55, 0.8), rng.uniform(0.8, 1.0))
    dark = bright * rng.uniform(0.35, 0.55)
    texture = np.where(bits[..., None], bright, dark)
    img[mask] = texture[mask]


def render(
    design: _Design, spec: BenchmarkSpec, objects: list[tuple[int, int]], rng: np.random.Generator
) -> np.ndarray:
    """An (S, S, 3) uint8 image of one object, or two side by side."""
    size = spec.image_size
    bg = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.7))
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    if len(objects) == 1:
        boxes = [(0, size, 0, size)]
    else:
        half = size // 2
        boxes = [(size // 4, size // 4 + half, 0, half), (size // 4, size // 4 + half, half, size)]
    for (v, k), box in zip(objects, boxes, strict=True):
        _draw_object(img, design, spec, v, k, box, rng)
    img += rng.normal(0, spec.pixel_noise, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _mislabel(obj: tuple[int, int], classes: int, rate: float, rng: np.random.Generator) -> tuple[int, int]:
    """With probability `rate`, another class of the same vertical: the confusions of fine-grained labelling."""
    v, k = obj
    if rng.random() < rate:
        k = (k + 1 + int(rng.integers(classes - 1))) % classes
    return v, k


def grid_taxonomy(
    verticals: int, classes_per_vertical: int, digits: int, source: str, describe: Callable[[int], str] | None = None
) -> Taxonomy:
    """Verticals v00.. (`digits` wide), each with classes vNN.c000..; `describe(v)` is added to vertical names."""
    vid = [f"v{v:0{digits}d}" for v in range(verticals)]
    extra = [f" ({describe(v)})" if describe else "" for v in range(verticals)]
    return Taxonomy(
        [Vertical(vid[v], f"vertical {vid[v][1:]}{extra[v]}") for v in range(verticals)],
        [
            ClassInfo(f"{vid[v]}.c{k:03d}", f"class {k:03d} of vertical {vid[v][1:]}", vid[v])
            for v in range(verticals)
            for k in range(classes_per_vertical)
        ],
        source=source,
    )


def benchmark_taxonomy(spec: BenchmarkSpec) -> Taxonomy:
    shape = lambda v: SHAPES[v % len(SHAPES)]  # noqa: E731
    return grid_taxonomy(spec.verticals, spec.classes_per_vertical, 2, "benchmark", shape)


def generate_benchmark(out: Path, spec: BenchmarkSpec, progress: bool = True) -> Path:
    """Write images/, manifest.csv, taxonomy.json and benchmark.json under `out`; return the manifest path.

    Re-running with the same spec on a complete output is a no-op; a different spec is refused.
    """
    spec.validate()
    out = Path(out)
    done = out / "benchmark.json"
    if done.is_file():
        existing = json.loads(done.read_text())
        if existing == asdict(spec):
            return out / "manifest.csv"
        differs = sorted(k for k, v in asdict(spec).items() if existing.get(k) != v)
        raise DataError(
            f"{out}: holds a benchmark with another spec (differs in: {', '.join(differs)}); "
            "delete that directory or choose another one"
        )
    rng = np.random.default_rng(spec.seed)
    design = _design(spec, rng)
    noise_rng = np.random.default_rng([spec.seed, 7])  # its own stream: noise leaves the images unchanged
    taxonomy = benchmark_taxonomy(spec)
    V, K = spec.verticals, spec.classes_per_vertical
    rows = []
    counts = {"train": spec.train_per_class, "val": spec.val_per_class, "test": spec.test_per_class}
    total = V * K * sum(counts.values())
    bar = tqdm(total=total, desc="writing benchmark", disable=not progress, unit="img")
    for split_no, (split, per_class) in enumerate(counts.items()):
        for v in range(V):
            for k in range(K):
                for i in range(per_class):
                    img_rng = np.random.default_rng([spec.seed, split_no, v, k, i])
                    objects = [(v, k)]
                    if rng.random() < spec.multilabel_fraction:
                        other_v = (v + 1 + int(rng.integers(V - 1))) % V
                        objects.append((other_v, int(rng.integers(K))))
                        if rng.random() < 0.5:
                            objects.reverse()
                    rel = f"images/{split}/v{v:02d}/c{k:03d}_{i:05d}.png"
                    path = out / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(render(design, spec, objects, img_rng)).save(path, compress_level=1)
                    if split == "train" and spec.label_noise > 0:
                        objects = [_mislabel(o, K, spec.label_noise, noise_rng) for o in objects]
                    labels = ";".join(
                        taxonomy.classes[taxonomy.class_index[f"v{a:02d}.c{b:03d}"]].id for a, b in sorted(set(objects))
                    )
                    rows.append((rel, labels, split))
                    bar.update()
    bar.close()
    taxonomy.save(out / "taxonomy.json")
    lines = ["path,labels,split"] + [",".join(r) for r in rows]
    atomic_write_text(out / "manifest.csv", "\n".join(lines) + "\n")
    atomic_write_json(done, asdict(spec))  # written last: its presence marks a complete benchmark
    return out / "manifest.csv"
