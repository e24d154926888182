"""`kc import-openimages`: a dataset in Open Images' published format -> kc's taxonomy.json + manifest.jsonl.

Inputs, as Open Images publishes them:
- image-level labels CSV(s): ``ImageID,Source,LabelName,Confidence``; Confidence 1 = present, 0 = verified absent;
- class descriptions CSV: ``LabelName,DisplayName``, with or without a header row;
- the label hierarchy JSON: ``{"LabelName": ..., "Subcategory": [{...}, ...]}``, nested, rooted at "Entity".

Verticals are the hierarchy's nodes at `vertical_depth` (1 = the root's children), or the nodes given by id. Each
vertical's node and everything below it become its classes, parents kept; a label reachable from several verticals
or parents (the hierarchy is a DAG) goes to the first one met depth-first, in file order. Labels outside every chosen
vertical, or absent from the hierarchy, are dropped and counted. Images keep their present labels as `labels` and
their verified-absent ones as `negatives` (evaluation then scores each class only on images verified for it, as
Open Images' does; see `verified_targets`); an image left with neither is dropped. Expanding labels along the
hierarchy is the run's choice (`data.expand_ancestors`), as in Open Images' evaluation.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kc.errors import DataError, format_problems, utf8_required
from kc.io import atomic_write_text
from kc.taxonomy import ClassInfo, Taxonomy, Vertical


@dataclass
class ImportReport:
    images: int = 0
    positives: int = 0
    negatives: int = 0
    dropped_labels: dict[str, int] = field(default_factory=dict)  # label -> annotations dropped
    missing_images: int = 0  # in the label files, not in the images folder


def read_descriptions(path: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f, utf8_required(path, DataError):
        for number, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{number}: expected 'LabelName,DisplayName'")
            if number == 1 and row[0] == "LabelName":  # some releases have a header, some not
                continue
            names[row[0]] = row[1]
    return names


def _nodes(path: Path) -> dict[str, Any]:
    try:
        root = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the hierarchy JSON: {exc}") from None
    if not isinstance(root, dict) or "LabelName" not in root:
        raise DataError(f"{path}: the hierarchy must be an object with 'LabelName' (and 'Subcategory')")
    problems: list[str] = []
    _check_node(root, "the root", problems)
    if problems:
        raise DataError(format_problems(f"{path}: {len(problems)} problem(s) in the hierarchy:", problems))
    return root


def _check_node(node: Any, where: str, problems: list[str]) -> None:
    """Every node an object with a non-empty string 'LabelName' and, optionally, a 'Subcategory' list of nodes."""
    if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str) or not node["LabelName"]:
        problems.append(f"{where}: needs an object with a non-empty string 'LabelName'")
        return
    children = node.get("Subcategory", [])
    if not isinstance(children, list):
        problems.append(f"{where} ({node['LabelName']}): 'Subcategory' must be a list of nodes")
        return
    for i, child in enumerate(children):
        _check_node(child, f"{node['LabelName']}.Subcategory[{i}]", problems)


def hierarchy_taxonomy(
    hierarchy: Path, names: dict[str, str], vertical_depth: int = 1, vertical_ids: list[str] | None = None
) -> Taxonomy:
    root = _nodes(hierarchy)
    chosen: list[dict[str, Any]] = []

    def find(node: dict[str, Any], depth: int) -> None:
        label = node["LabelName"]
        if (vertical_ids and label in vertical_ids) or (not vertical_ids and depth == vertical_depth):
            if all(c["LabelName"] != label for c in chosen):
                chosen.append(node)
            return
        for child in node.get("Subcategory", []):
            find(child, depth + 1)

    find(root, 0)
    if vertical_ids:
        missing = [v for v in vertical_ids if all(c["LabelName"] != v for c in chosen)]
        if missing:
            raise DataError(f"{hierarchy}: vertical(s) {', '.join(missing)} not found in the hierarchy")
    if not chosen:
        raise DataError(f"{hierarchy}: no node at depth {vertical_depth}; choose a smaller --vertical-depth")

    verticals, classes, assigned = [], [], set()
    for node in chosen:
        label = node["LabelName"]
        vid = f"vertical:{label}"
        verticals.append(Vertical(vid, names.get(label, label)))

        def add(n: dict[str, Any], parent: str | None, vid: str = vid) -> None:
            label = n["LabelName"]
            if label in assigned:
                return
            assigned.add(label)
            classes.append(ClassInfo(label, names.get(label, label), vid, parent))
            for child in n.get("Subcategory", []):
                add(child, label)

        add(node, None)
    return Taxonomy(verticals, classes, source=str(hierarchy))


def import_openimages(
    label_files: list[tuple[Path, str | None]],
    descriptions: Path,
    hierarchy: Path,
    images: Path,
    out: Path,
    vertical_depth: int = 1,
    vertical_ids: list[str] | None = None,
    image_ext: str = ".jpg",
) -> ImportReport:
    """Write out/taxonomy.json and out/manifest.jsonl (image paths relative to `out`); return what was kept."""
    taxonomy = hierarchy_taxonomy(hierarchy, read_descriptions(descriptions), vertical_depth, vertical_ids)
    report = ImportReport()
    per_image: dict[str, dict[str, Any]] = {}
    for path, split in label_files:
        with open(path, newline="", encoding="utf-8") as f, utf8_required(path, DataError):
            reader = csv.DictReader(f)
            needed = {"ImageID", "LabelName", "Confidence"}
            if not needed <= set(reader.fieldnames or []):
                raise DataError(f"{path}:1: the header needs {', '.join(sorted(needed))} (found {reader.fieldnames})")
            for row in reader:
                label = row["LabelName"]
                if label not in taxonomy.class_index:
                    report.dropped_labels[label] = report.dropped_labels.get(label, 0) + 1
                    continue
                try:
                    present = float(row["Confidence"]) > 0.5
                except ValueError:
                    where = f"{path}:{reader.line_num}"
                    raise DataError(f"{where}: Confidence '{row['Confidence']}' is not a number") from None
                entry = per_image.setdefault(row["ImageID"], {"labels": set(), "negatives": set(), "split": split})
                (entry["labels"] if present else entry["negatives"]).add(label)
    lines = []
    for image_id, entry in per_image.items():
        file = images / f"{image_id}{image_ext}"
        if not file.is_file():
            report.missing_images += 1
            continue
        negatives = entry["negatives"] - entry["labels"]  # a present label wins over a contradicting absent one
        record: dict[str, Any] = {"path": os.path.relpath(file, out), "labels": sorted(entry["labels"])}
        if negatives:
            record["negatives"] = sorted(negatives)
        if entry["split"]:
            record["split"] = entry["split"]
        lines.append(json.dumps(record))
        report.images += 1
        report.positives += len(entry["labels"])
        report.negatives += len(negatives)
    if not lines:
        raise DataError(f"no image of the label files was found in {images} (as <ImageID>{image_ext})")
    out.mkdir(parents=True, exist_ok=True)
    taxonomy.save(out / "taxonomy.json")
    atomic_write_text(out / "manifest.jsonl", "\n".join(lines) + "\n")
    return report
