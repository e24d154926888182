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

Written: `features.npy` (float16, rows x dim), `manifest.jsonl` (paths `features.npy#<row>`, labels, split),
`taxonomy.json`. Val and test are `val_images` / `test_images` images of classes drawn at random (a test split with
every class would not fit a 2-core machine's evaluation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kc.data.benchmark import grid_taxonomy
from kc.io import atomic_write, atomic_write_text
from kc.taxonomy import Taxonomy


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
    seed: int = 0


FEATURE_PRESETS = {
    "features-100k": FeatureBenchmarkSpec(),  # 100,000 classes in 1,000 verticals
    "features-1k": FeatureBenchmarkSpec(verticals=10, val_images=500, test_images=1000),  # the same, 1,000 classes
}


def generate_feature_benchmark(out: Path, spec: FeatureBenchmarkSpec) -> Path:
    """Write the benchmark to `out`; returns the manifest path. Same spec, same bytes."""
    if 2**spec.fine_dims < spec.classes_per_vertical:
        raise ValueError(f"fine_dims {spec.fine_dims} gives fewer sign patterns than {spec.classes_per_vertical}")
    rng = np.random.default_rng(spec.seed)
    V, K, D = spec.verticals, spec.classes_per_vertical, spec.dim
    vertical_points = rng.normal(0.0, 1.0, (V, D)).astype(np.float32)
    centres = np.repeat(vertical_points, K, axis=0)
    for v in range(V):
        axes = rng.choice(D, spec.fine_dims, replace=False)
        codes = rng.choice(2**spec.fine_dims, K, replace=False)
        signs = ((codes[:, None] >> np.arange(spec.fine_dims)) & 1) * 2.0 - 1.0
        centres[v * K : (v + 1) * K, axes] += spec.fine_scale * signs
    C = V * K
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
    shift = rng.integers(1, K, int(noisy.sum()))
    vertical = train_classes[noisy] // K
    labels[: len(train_classes)][noisy] = vertical * K + (train_classes[noisy] % K + shift) % K

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
    return manifest


def feature_taxonomy(spec: FeatureBenchmarkSpec) -> Taxonomy:
    return grid_taxonomy(spec.verticals, spec.classes_per_vertical, 3, "feature benchmark")
