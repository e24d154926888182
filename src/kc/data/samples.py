"""Reading labelled images from a manifest (CSV or JSONL) or an ImageFolder tree into `Sample`s.

Manifest CSV: a header with ``path`` and ``labels`` (and optionally ``split`` and ``negatives``); several labels
are separated by ``;``. JSONL: one object per line with the same keys, ``labels`` and ``negatives`` lists.
``negatives`` are classes verified absent from the image (Open Images' confidence-0 labels); with
``expand_ancestors`` they extend to every subclass, as positives extend to every ancestor. Paths are relative to
the image root. Every problem (unknown class, missing file, duplicate path, bad split) is reported with its file
and line, all at once.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kc.errors import DataError, format_problems, utf8_required
from kc.taxonomy import ClassInfo, Taxonomy, Vertical

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LABEL_SEPARATOR = ";"


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the image root
    labels: tuple[int, ...]  # class indices (taxonomy order), sorted, unique
    split: str | None  # train / val / test, or None until a seeded split assigns one
    where: str  # "file:line" for messages
    negatives: tuple[int, ...] = ()  # classes verified absent (Open Images' confidence-0 labels), sorted

    def with_split(self, split: str) -> Sample:
        return Sample(self.path, self.labels, split, self.where, self.negatives)


def load_manifest(path: Path, image_root: Path, taxonomy: Taxonomy, expand_ancestors: bool = False) -> list[Sample]:
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; check 'data.manifest' in your config")
    with utf8_required(path, DataError):
        rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    problems: list[str] = []
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    descendants = _descendants(taxonomy) if expand_ancestors else {}
    for where, rel, labels, split, negative_labels in rows:
        labels, negative_labels = _label_list(labels), _label_list(negative_labels)
        ok = True
        if not rel:
            problems.append(f"{where}: empty image path")
            continue
        if rel in seen:
            problems.append(f"{where}: duplicate image '{rel}' (first at {seen[rel]}); list each image once")
            ok = False
        seen.setdefault(rel, where)
        # present labels extend to their ancestors; absent ones to their subclasses (none of those is present)
        indices = _class_indices(labels, "", where, taxonomy, problems, expand_ancestors and taxonomy.ancestors)
        negatives = _class_indices(
            negative_labels, " in negatives", where, taxonomy, problems, expand_ancestors and descendants.get
        )
        ok = ok and indices is not None and negatives is not None
        indices, negatives = indices or [], negatives or []
        both = set(indices) & set(negatives)
        if both:
            names = ", ".join(taxonomy.classes[i].id for i in sorted(both))
            problems.append(f"{where}: class(es) {names} both present and verified absent; keep one")
            ok = False
        if split is not None and split not in SPLITS:
            problems.append(f"{where}: split '{split}' is not one of {', '.join(SPLITS)}")
            ok = False
        if not (image_root / _file_of(rel)).is_file():
            problems.append(f"{where}: image file not found: {image_root / rel}")
            ok = False
        if ok:
            samples.append(Sample(rel, tuple(sorted(set(indices))), split, where, tuple(sorted(set(negatives)))))
    if problems:
        raise DataError(format_problems(f"{path}: {len(problems)} problem(s) in the manifest:", problems))
    if not samples:
        raise DataError(f"{path}: the manifest lists no images")
    splits_given = {s.split is not None for s in samples}
    if len(splits_given) > 1:
        missing = next(s for s in samples if s.split is None)
        raise DataError(f"{missing.where}: no split, while other rows have one; give every row a split or none")
    return samples


def load_unlabeled(path: Path, image_root: Path, labelled: set[str]) -> list[Sample]:
    """Images without labels (`data.unlabeled`): a CSV with a ``path`` column or JSONL objects with ``path``, paths
    relative to the image root (or absolute). Every problem (labels given, missing file, duplicate, an image also in
    the labelled data, whose paths are `labelled`) is reported with its file and line, all at once."""
    if not path.is_file():
        raise DataError(f"{path}: unlabeled-image manifest not found; check 'data.unlabeled' in your config")
    with utf8_required(path, DataError):
        rows = _read_jsonl(path, labelled=False) if path.suffix == ".jsonl" else _read_csv(path, labelled=False)
    problems: list[str] = []
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for where, rel, labels, split, negatives in rows:
        if not rel:
            problems.append(f"{where}: empty image path")
        elif _label_list(labels) or _label_list(negatives):
            problems.append(f"{where}: '{rel}' has labels; list labelled images in data.manifest, not here")
        elif split is not None:
            problems.append(f"{where}: '{rel}' has a split; unlabeled images only train (remove the split)")
        elif rel in seen:
            problems.append(f"{where}: duplicate image '{rel}' (first at {seen[rel]}); list each image once")
        elif rel in labelled:
            problems.append(f"{where}: '{rel}' is also in the labelled data; list it in one manifest only")
        elif not (image_root / _file_of(rel)).is_file():
            problems.append(f"{where}: image file not found: {image_root / rel}")
        else:
            seen[rel] = where
            samples.append(Sample(rel, (), None, where))
    if problems:
        raise DataError(format_problems(f"{path}: {len(problems)} problem(s) in the unlabeled images:", problems))
    if not samples:
        raise DataError(f"{path}: lists no images; remove 'data.unlabeled' or list images in it")
    return samples


def _file_of(rel: str) -> str:
    """The file a manifest path names: itself, or for '<file>.npy#<row>' (a row of features) the array."""
    return rel.rpartition("#")[0] if ".npy#" in rel else rel


def _class_indices(
    labels: list[str], field: str, where: str, taxonomy: Taxonomy, problems: list[str], expand: Any
) -> list[int] | None:
    """Class ids -> indices (plus `expand(index)`'s, when given); None after recording any unknown id."""
    indices: list[int] = []
    known = True
    for label in labels:
        idx = taxonomy.class_index.get(label)
        if idx is None:
            problems.append(f"{where}: unknown class id '{label}'{field} (not in {taxonomy.source})")
            known = False
            continue
        indices.append(idx)
        if expand:
            indices.extend(expand(idx) or ())
    return indices if known else None


def _label_list(labels: list[str] | str | None) -> list[str]:
    if labels is None:
        return []
    if isinstance(labels, str):
        return [x.strip() for x in labels.split(LABEL_SEPARATOR) if x.strip()]
    return labels


def _descendants(taxonomy: Taxonomy) -> dict[int, list[int]]:
    """Class index -> indices of every class below it in the hierarchy."""
    out: dict[int, list[int]] = {}
    for c in range(taxonomy.num_classes):
        for a in taxonomy.ancestors(c):
            out.setdefault(a, []).append(c)
    return out


Row = tuple[str, str, list[str] | str, str | None, list[str] | str | None]


def _read_csv(path: Path, labelled: bool = True) -> list[Row]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        for required in ("path", "labels") if labelled else ("path",):
            if required not in fields:
                raise DataError(
                    f"{path}:1: the CSV header needs a '{required}' column (found: {', '.join(fields) or 'none'})"
                )
        rows = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more fields than the header has; quote paths that contain commas")
            split = (row.get("split") or "").strip() or None
            rows.append((where, (row["path"] or "").strip(), row.get("labels") or "", split, row.get("negatives")))
    return rows


def _read_jsonl(path: Path, labelled: bool = True) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "path" not in obj or (labelled and "labels" not in obj):
                raise DataError(f"{where}: each line needs an object with 'path'" + (" and 'labels'" * labelled))
            labels = obj.get("labels", [])
            if not isinstance(labels, (list, str)) or (
                isinstance(labels, list) and not all(isinstance(x, str) for x in labels)
            ):
                raise DataError(f"{where}: 'labels' must be a list of class ids")
            negatives = obj.get("negatives")
            if negatives is not None and not (
                isinstance(negatives, list) and all(isinstance(x, str) for x in negatives)
            ):
                raise DataError(f"{where}: 'negatives' must be a list of class ids")
            rows.append((where, str(obj["path"]).strip(), labels, obj.get("split"), negatives))
    return rows


def load_image_folder(root: Path) -> tuple[Taxonomy, list[Sample]]:
    """Read root/<vertical>/<class>/<image> (or root/<split>/<vertical>/<class>/<image>), deriving the taxonomy.

    Class ids are '<vertical>/<class>' so that equal class folder names in two verticals stay distinct.
    """
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; check 'data.image_folder' in your config")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    split_layout = bool(subdirs) and set(subdirs) <= set(SPLITS)
    tops = [(root / s, s) for s in subdirs] if split_layout else [(root, None)]
    verticals: dict[str, Vertical] = {}
    classes: dict[str, ClassInfo] = {}
    entries: list[tuple[str, str, str | None]] = []
    for top, split in tops:
        for vdir in sorted(p for p in top.iterdir() if p.is_dir()):
            verticals.setdefault(vdir.name, Vertical(vdir.name, vdir.name))
            for cdir in sorted(p for p in vdir.iterdir() if p.is_dir()):
                cid = f"{vdir.name}/{cdir.name}"
                classes.setdefault(cid, ClassInfo(cid, cdir.name, vdir.name))
                for img in sorted(cdir.iterdir()):
                    if img.is_file() and img.suffix.lower() in IMAGE_SUFFIXES:
                        entries.append((str(img.relative_to(root)), cid, split))
    if not classes:
        raise DataError(f"{root}: no <vertical>/<class>/ folders found; expected root/<vertical>/<class>/<image>")
    taxonomy = Taxonomy(list(verticals.values()), list(classes.values()), source=str(root))
    samples = [Sample(rel, (taxonomy.class_index[cid],), split, f"{root / rel}") for rel, cid, split in entries]
    if not samples:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return taxonomy, samples
