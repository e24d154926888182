"""`kc predict`: top-k labels for image files, folders or a manifest, batched, printed or written as JSONL/CSV."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kc.data.images import decode_rgb
from kc.errors import DataError
from kc.io import atomic_write
from kc.serve.labels import LabelPicker
from kc.serve.runtime import LoadedModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_SUFFIXES = {".csv", ".jsonl"}


def _manifest_paths(manifest: Path) -> list[Path]:
    """The `path` of every row of a CSV (header with a `path` column) or JSONL manifest, relative to its folder."""
    base, paths = manifest.parent, []
    text = manifest.read_text(encoding="utf-8")
    if manifest.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if "path" not in (reader.fieldnames or []):
            raise DataError(f"{manifest}:1: no 'path' column in the header {reader.fieldnames}; add one")
        paths = [base / row["path"] for row in reader]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                paths.append(base / json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{manifest}:{number}: expected a JSON object with a 'path' key") from None
    return paths


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files from files, folders (recursively, by suffix) and manifests, in the order given."""
    out: list[Path] = []
    for item in inputs:
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.suffix.lower() in MANIFEST_SUFFIXES and item.is_file():
            out += _manifest_paths(item)
        elif item.is_file():
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not out:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (suffixes: {sorted(IMAGE_SUFFIXES)})")
    return out


def _load(model: LoadedModel, path: Path) -> np.ndarray | str:
    try:
        return model.preprocess(decode_rgb(path, target=model.preprocess.size)).numpy()
    except Exception as exc:  # every unreadable image becomes an error record, not a crash
        return f"{exc.__class__.__name__}: {exc}"


def predict_images(
    model: LoadedModel,
    paths: list[Path],
    picker: LabelPicker,
    *,
    top_k: int = 5,
    threshold: float = 0.0,
    verticals: list[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """One record per image, in input order: {"path", "labels": [...]} or {"path", "error"}."""
    picker.vertical_mask(verticals)  # an unknown vertical fails before any work
    with ThreadPoolExecutor(max_workers=4) as pool, tqdm(total=len(paths), disable=not progress, unit="img") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            loaded = list(pool.map(lambda p: _load(model, p), chunk))
            good = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
            scores = model.scores(np.stack([loaded[i] for i in good])) if good else None
            row_of = {i: r for r, i in enumerate(good)}
            for i, path in enumerate(chunk):
                if isinstance(loaded[i], str):
                    yield {"path": str(path), "error": loaded[i]}
                else:
                    labels = picker.pick(scores[row_of[i]], top_k, threshold, verticals)
                    yield {"path": str(path), "labels": labels}
            bar.update(len(chunk))


def format_line(record: dict[str, Any]) -> str:
    if "error" in record:
        return f"{record['path']}\tERROR {record['error']}"
    labels = ", ".join(f"{x['name']} [{x['vertical']}] {x['score']:.3f}" for x in record["labels"])
    return f"{record['path']}\t{labels or '(no label above the threshold)'}"


def write_records(records: list[dict[str, Any]], out: Path) -> None:
    """JSONL (one object per image) or CSV (one row per image and label), by the file's suffix; atomically."""
    if out.suffix == ".csv":

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["path", "rank", "class_id", "name", "vertical", "score", "hierarchy", "error"])
                for r in records:
                    if "error" in r:
                        writer.writerow([r["path"], "", "", "", "", "", "", r["error"]])
                    for rank, x in enumerate(r.get("labels", []), 1):
                        row = [r["path"], rank, x["id"], x["name"], x["vertical"], f"{x['score']:.6f}"]
                        writer.writerow(row + [" > ".join(x["path"]), ""])

        atomic_write(out, write)
    elif out.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    else:
        raise DataError(f"--out {out}: write .jsonl or .csv")
