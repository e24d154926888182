"""The built-in benchmark at 100,000 classes, as precomputed features (so that it trains on a CPU).

Pixels at 100K classes are out of reach of 2 CPU cores, so this mode skips the backbone: each image is a
`dim`-dimensional feature vector (the output a frozen backbone would give), and every stage trains the network's
head on them (backbone `kc_features`). The structure mirrors the image benchmark:

- a **vertical** is a point in feature space (coarse: verticals lie far apart);
- a **class** is its vertical's point moved by +-`fine_scale` along `fine_dims` feature axes that the vertical
  draws for itself (each vertical its own axes, each class its own sign pattern): telling a vertical's classes
  apart needs those axes, and the union over 1,000 verticals is every axis, so a head with a narrow hidden layer
  over all classes is limited by capacity, where specialists (and knowledge concentration) help;
- an **image** is its class's point plus Gaussian noise (`noise`); `label_noise` of the training labels name
  another class of the same vertical, as in the image benchmark.

With `size_ratio` > 1 the verticals are of unequal sizes, geometrically spaced from the smallest to `size_ratio`
times it (the paper's 20 verticals hold about 1.5K to 24K of its 100K classes), and a vertical of more classes
than `2**fine_dims` varies as many more axes as its sign patterns need. The `paper-*` presets are built so that
the method can show something (the regime the paper measured in): 20 verticals, clean labels, and val and test
splits whose "vertical-only" chance floor (each class ranked at random among its vertical's images) stays low.

Written: `features.npy` (float16, rows x dim), `manifest.jsonl` (paths `features.npy#<row>`, labels, split),
`taxonomy.json`; with `unlabeled_per_class` > 0 also `unlabeled.npy` and `unlabeled.jsonl` (paths only, for
`data.unlabeled`): more images of every class, from a random stream of their own (the labelled files keep their
bytes). Val and test are `val_images` / `test_images` images of classes drawn at random (a test split with
every class would not fit a 2-core machine's evaluation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kc.data.benchmark import grid_taxonomy
from kc.io import atomic_write, atomic_write_text
from kc.taxonomy import ClassInfo, Taxonomy, Vertical


@dataclass(frozen=True)
class FeatureBenchmarkSpec:
    verticals: int = 1000
    classes_per_vertical: int = 100
    train_per_class: int = 8
    val_images: int = 2000
    test_images: int = 4000
    dim: int = 128
    fine_dims: int = 8
    fine_scale: float = 1.0
    noise: float = 0.4
    label_noise: float = 0.2
    size_ratio: float = 1.0
    unlabeled_per_class: int = 0  # images a class drawn like the training ones, written without labels
    seed: int = 0

    def vertical_sizes(self) -> list[int]:
        """Classes per vertical: all `classes_per_vertical`, or (size_ratio > 1) geometrically spaced, smallest
        first, summing to verticals x classes_per_vertical."""
        V, total = self.verticals, self.verticals * self.classes_per_vertical
        if self.size_ratio == 1.0 or V == 1:
            return [self.classes_per_vertical] * V
        weights = self.size_ratio ** (np.arange(V) / (V - 1))
        sizes = np.maximum(1, np.floor(weights / weights.sum() * total)).astype(int)
        sizes[-1] += total - int(sizes.sum())  # the rounding's remainder goes to the largest
        return sizes.tolist()

    def fine_dims_of(self, size: int) -> int:
        """Axes a vertical of `size` classes varies: enough sign patterns for each class to have its own."""
        return max(self.fine_dims, int(np.ceil(np.log2(max(2, size)))))


FEATURE_PRESETS = {
    "features-100k": FeatureBenchmarkSpec(),  # 100,000 classes in 1,000 verticals
    "features-1k": FeatureBenchmarkSpec(verticals=10, val_images=500, test_images=1000),  # the same, 1,000 classes
    # The paper's regime at three scales: 20 verticals of unequal sizes (16x from smallest to largest), clean labels.
    "paper-1k": FeatureBenchmarkSpec(
        verticals=20,
        classes_per_vertical=50,
        train_per_class=30,
        val_images=2000,
        test_images=2000,
        fine_dims=6,
        label_noise=0.0,
        size_ratio=16.0,
    ),
    "paper-10k": FeatureBenchmarkSpec(
        verticals=20,
        classes_per_vertical=500,
        train_per_class=10,
        val_images=4000,
        test_images=4000,
        fine_dims=6,
        label_noise=0.0,
        size_ratio=16.0,
    ),
    "paper-100k": FeatureBenchmarkSpec(
        verticals=20,
        classes_per_vertical=5000,
        train_per_class=8,
        val_images=4000,
        test_images=4000,
        fine_dims=6,
        label_noise=0.0,
        size_ratio=16.0,
    ),
}


def class_centres(spec: FeatureBenchmarkSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """(C, dim) float32: each class's centre, its vertical's point plus its sign pattern on the vertical's axes.
    The generator's first draws (from `rng`, by default a new one of the spec's seed): more images of the same
    classes can be drawn around them."""
    rng = np.random.default_rng(spec.seed) if rng is None else rng
    sizes = spec.vertical_sizes()
    vertical_points = rng.normal(0.0, 1.0, (spec.verticals, spec.dim)).astype(np.float32)
    centres = np.repeat(vertical_points, sizes, axis=0)
    first_class = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for size, first in zip(sizes, first_class, strict=True):
        dims = spec.fine_dims if spec.size_ratio == 1.0 else spec.fine_dims_of(size)
        axes = rng.choice(spec.dim, dims, replace=False)
        codes = rng.choice(2**dims, size, replace=False)
        signs = ((codes[:, None] >> np.arange(dims)) & 1) * 2.0 - 1.0
        centres[first : first + size, axes] += spec.fine_scale * signs
    return centres


def generate_feature_benchmark(out: Path, spec: FeatureBenchmarkSpec) -> Path:
    """Write the benchmark to `out`; returns the manifest path. Same spec, same bytes."""
    sizes = spec.vertical_sizes()
    if spec.size_ratio == 1.0 and 2**spec.fine_dims < spec.classes_per_vertical:
        raise ValueError(f"fine_dims {spec.fine_dims} gives fewer sign patterns than {spec.classes_per_vertical}")
    if any(spec.fine_dims_of(size) > spec.dim for size in sizes):
        raise ValueError(f"dim {spec.dim} is too small for a vertical of {max(sizes)} classes")
    rng = np.random.default_rng(spec.seed)
    D = spec.dim
    centres = class_centres(spec, rng)
    vertical_of_class = np.repeat(np.arange(spec.verticals), sizes)
    first_class = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    C = int(sum(sizes))
    train_classes = np.repeat(np.arange(C), spec.train_per_class)
    val_classes = rng.integers(0, C, spec.val_images)
    test_classes = rng.integers(0, C, spec.test_images)
    classes = np.concatenate([train_classes, val_classes, test_classes])
    splits = ["train"] * len(train_classes) + ["val"] * len(val_classes) + ["test"] * len(test_classes)
    features = np.empty((len(classes), D), dtype=np.float16)
    for begin in range(0, len(classes), 65536):  # in blocks: bounded memory at any size
        block = classes[begin : begin + 65536]
        features[begin : begin + len(block)] = centres[block] + rng.normal(0.0, spec.noise, (len(block), D))
    labels = classes.copy()
    noisy = rng.random(len(train_classes)) < spec.label_noise
    noisy_classes = train_classes[noisy]
    size = np.asarray(sizes)[vertical_of_class[noisy_classes]]
    first = first_class[vertical_of_class[noisy_classes]]
    if spec.size_ratio == 1.0:  # the draw the equal-size presets were written with: their bytes stay the same
        shift = rng.integers(1, spec.classes_per_vertical, len(noisy_classes))
    else:  # another class of the same vertical (a 1-class vertical keeps its label)
        shift = rng.integers(1, np.maximum(2, size))
    labels[: len(train_classes)][noisy] = first + (noisy_classes - first + shift) % size

    out.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add '.npy' to a temporary name
            np.save(f, features, allow_pickle=False)

    atomic_write(out / "features.npy", write)
    taxonomy = feature_taxonomy(spec)
    taxonomy.save(out / "taxonomy.json")
    ids = [c.id for c in taxonomy.classes]
    lines = [
        json.dumps({"path": f"features.npy#{row}", "labels": [ids[c]], "split": split})
        for row, (c, split) in enumerate(zip(labels.tolist(), splits, strict=True))
    ]
    manifest = out / "manifest.jsonl"
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    if spec.unlabeled_per_class > 0:
        write_unlabeled(out, spec, centres)
    return manifest


UNLABELED_STREAM = 10_000  # the unlabeled images' random stream is seeded spec.seed + this


def write_unlabeled(out: Path, spec: FeatureBenchmarkSpec, centres: np.ndarray) -> Path:
    """`unlabeled_per_class` images of every class around its centre (class by class), without labels:
    `unlabeled.npy` and the manifest `unlabeled.jsonl` (returned)."""
    rng = np.random.default_rng(UNLABELED_STREAM + spec.seed)
    classes = np.repeat(np.arange(len(centres)), spec.unlabeled_per_class)
    features = np.empty((len(classes), spec.dim), dtype=np.float16)
    for begin in range(0, len(classes), 65536):  # in blocks: bounded memory at any size (the same draws)
        block = classes[begin : begin + 65536]
        features[begin : begin + len(block)] = centres[block] + rng.normal(0.0, spec.noise, (len(block), spec.dim))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, features, allow_pickle=False)

    atomic_write(out / "unlabeled.npy", write)
    manifest = out / "unlabeled.jsonl"
    atomic_write_text(
        manifest, "".join(json.dumps({"path": f"unlabeled.npy#{row}"}) + "\n" for row in range(len(classes)))
    )
    return manifest


def feature_taxonomy(spec: FeatureBenchmarkSpec) -> Taxonomy:
    if spec.size_ratio == 1.0:
        return grid_taxonomy(spec.verticals, spec.classes_per_vertical, 3, "feature benchmark")
    sizes = spec.vertical_sizes()
    digits = len(str(max(sizes) - 1))
    verticals = [Vertical(f"v{v:02d}", f"vertical {v:02d} ({size} classes)") for v, size in enumerate(sizes)]
    classes = [
        ClassInfo(f"v{v:02d}.c{k:0{digits}d}", f"class {k} of vertical {v:02d}", f"v{v:02d}")
        for v, size in enumerate(sizes)
        for k in range(size)
    ]
    return Taxonomy(verticals, classes, source="feature benchmark")
