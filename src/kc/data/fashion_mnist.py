"""Fashion-MNIST as a kc dataset: real photographs of clothing (Zalando; MIT licence), from its original IDX files.

`kc import-fashion-mnist OUT` reads the four IDX files (gzipped or not) from `--source`, by default where Debian's
package `dataset-fashion-mnist` puts them (/usr/share/datasets/fashion-mnist: `apt-get install
dataset-fashion-mnist`), and writes OUT/images/<split>/<class>/<n>.png (28 x 28 grey), OUT/manifest.csv and
OUT/taxonomy.json. Nothing is downloaded.

Splits: the 60,000 training images are `train`; the 10,000 official test images are divided at random (seeded) into
`val` and `test` halves, so that choices read val and the record is test, as the evidence protocol asks.

Verticals, a grouping by kind of garment (documented here, the only choice made about the data): tops (T-shirt/top,
pullover, coat, shirt: the classes most often confused with each other), footwear (sandal, sneaker, ankle boot),
and the rest (trouser, dress, bag).
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from kc.errors import DataError
from kc.io import atomic_write_json, atomic_write_text
from kc.taxonomy import ClassInfo, Taxonomy, Vertical

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
VERTICALS = {
    "tops": ("T-shirt/top", "Pullover", "Coat", "Shirt"),
    "footwear": ("Sandal", "Sneaker", "Ankle boot"),
    "other": ("Trouser", "Dress", "Bag"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def class_id(name: str) -> str:
    return name.lower().replace("/", "-").replace(" ", "-")


def fashion_taxonomy() -> Taxonomy:
    verticals = [Vertical(v, v) for v in VERTICALS]
    classes = [ClassInfo(class_id(c), c, v) for v, members in VERTICALS.items() for c in members]
    return Taxonomy(verticals, classes, source="Fashion-MNIST, verticals by kind of garment")


def _find(source: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (source / name).is_file():
            return source / name
    hint = (
        "install them with `apt-get install dataset-fashion-mnist` (Debian, Ubuntu)"
        if source == DEBIAN_DIR
        else "give --source the folder that holds them"
    )
    raise DataError(f"{source / stem}[.gz]: Fashion-MNIST IDX file not found; {hint}")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX array (uint8): images (n, rows, cols) for magic 2051, labels (n,) for 2049."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    dims = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * dims
    if len(data) < header or struct.unpack(">i", data[:4])[0] != magic:
        raise DataError(f"{path}: not an IDX {'image' if dims == 3 else 'label'} file (magic number {magic} expected)")
    shape = struct.unpack(f">{dims}i", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"{path}: holds {len(data) - header} bytes of data, its header says {int(np.prod(shape))}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def import_fashion_mnist(
    out: Path, source: Path = DEBIAN_DIR, seed: int = 0, progress: bool = True, train_per_class: int | None = None
) -> Path:
    """Write the dataset under `out`; returns the manifest path. Same files and seed, same bytes.
    `train_per_class`: keep only that many training images of each class (a seeded draw; val and test stay whole),
    for the low-data regime in which pretrained weights matter most."""
    arrays = {}
    for split, (images_file, labels_file) in FILES.items():
        images = read_idx(_find(source, images_file), IMAGES_MAGIC)
        labels = read_idx(_find(source, labels_file), LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(f"{source}: {split} has {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() >= len(CLASSES):
            raise DataError(f"{source / labels_file}: label {labels.max()} outside the 10 Fashion-MNIST classes")
        arrays[split] = (images, labels)
    rng = np.random.default_rng(seed)
    test_images, test_labels = arrays.pop("test")
    order = rng.permutation(len(test_images))
    half = len(order) // 2
    arrays["val"] = (test_images[order[:half]], test_labels[order[:half]])
    arrays["test"] = (test_images[order[half:]], test_labels[order[half:]])
    if train_per_class is not None:
        if train_per_class < 1:
            raise DataError(f"--train-per-class: {train_per_class} must be at least 1")
        images, labels = arrays["train"]
        kept = np.sort(
            np.concatenate(
                [rng.permutation(np.flatnonzero(labels == c))[:train_per_class] for c in range(len(CLASSES))]
            )
        )
        arrays["train"] = (images[kept], labels[kept])

    rows = ["path,labels,split"]
    total = sum(len(labels) for _, labels in arrays.values())
    with tqdm(total=total, desc="writing Fashion-MNIST", disable=not progress, unit="img") as bar:
        for split, (images, labels) in arrays.items():
            for n, (pixels, label) in enumerate(zip(images, labels, strict=True)):
                name = class_id(CLASSES[label])
                rel = f"images/{split}/{name}/{n:05d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, "L").save(out / rel, compress_level=1)
                rows.append(f"{rel},{name},{split}")
                bar.update()
    fashion_taxonomy().save(out / "taxonomy.json")
    atomic_write_text(out / "manifest.csv", "\n".join(rows) + "\n")
    counts = {split: len(labels) for split, (_, labels) in arrays.items()}
    info = {"source": str(source), "seed": seed, "train_per_class": train_per_class, "images": counts}
    atomic_write_json(out / "fashion_mnist.json", info)
    return out / "manifest.csv"


def describe(out: Path) -> str:
    info = json.loads((out / "fashion_mnist.json").read_text(encoding="utf-8"))
    return ", ".join(f"{n:,} {split}" for split, n in info["images"].items())
