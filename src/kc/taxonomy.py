"""Classes, verticals and the label hierarchy.

A taxonomy file (JSON or YAML) has two lists::

    verticals:
      - {id: bird, name: Bird}
    classes:
      - {id: bird.passerine, name: Passerine, vertical: bird}
      - {id: bird.sparrow, name: Sparrow, parent: bird.passerine}   # vertical inherited from the parent

Each class belongs to exactly one vertical: given directly (``vertical``), or inherited through ``parent`` links
(a parent is another class or a vertical). Parents make a deeper hierarchy whose first level is the verticals.

Class indices are grouped by vertical (verticals in file order, classes in file order within each), so every
vertical's classes are one contiguous block of the model's outputs: per-vertical heads and scales slice them.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kc.errors import TaxonomyError, format_problems, utf8_required


@dataclass(frozen=True)
class Vertical:
    id: str
    name: str


@dataclass(frozen=True)
class ClassInfo:
    id: str
    name: str
    vertical: str
    parent: str | None = None  # a class id or a vertical id; None means a direct child of its vertical


class Taxonomy:
    """A validated taxonomy. Build it with `Taxonomy.load`, `Taxonomy.from_dict` or the constructor."""

    def __init__(self, verticals: list[Vertical], classes: list[ClassInfo], source: str = "<taxonomy>"):
        _validate_structure(verticals, classes, source)
        self.source = source
        self.verticals = list(verticals)
        self.vertical_index = {v.id: i for i, v in enumerate(self.verticals)}
        # Group classes by vertical, stable within each vertical.
        self.classes = sorted(classes, key=lambda c: self.vertical_index[c.vertical])
        self.class_index = {c.id: i for i, c in enumerate(self.classes)}
        self.vertical_of_class = [self.vertical_index[c.vertical] for c in self.classes]
        counts = Counter(self.vertical_of_class)
        self.vertical_ranges: list[tuple[int, int]] = []
        start = 0
        for v in range(len(self.verticals)):
            self.vertical_ranges.append((start, start + counts[v]))
            start += counts[v]
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------------------------- sizes
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_verticals(self) -> int:
        return len(self.verticals)

    def vertical_size(self, v: int) -> int:
        start, end = self.vertical_ranges[v]
        return end - start

    def vertical_sizes(self) -> list[int]:
        """The classes of each vertical, in vertical order (their blocks of outputs follow one another)."""
        return [end - start for start, end in self.vertical_ranges]

    # ------------------------------------------------------------------------------------------- hierarchy
    def ancestors(self, class_idx: int) -> list[int]:
        """Indices of the class's ancestor classes, nearest first (verticals are not classes)."""
        out = []
        parent = self.classes[class_idx].parent
        while parent is not None and parent in self.class_index:
            idx = self.class_index[parent]
            out.append(idx)
            parent = self.classes[idx].parent
        return out

    def path(self, class_idx: int) -> list[str]:
        """Display names from the vertical down to the class, e.g. ['Bird', 'Passerine', 'Sparrow']."""
        chain = [self.classes[i].name for i in reversed(self.ancestors(class_idx))]
        vertical = self.verticals[self.vertical_of_class[class_idx]].name
        return [vertical, *chain, self.classes[class_idx].name]

    def fingerprint(self) -> str:
        """Hash of the class list and vertical assignment: checkpoints and caches record it to detect mismatches."""
        if self._fingerprint is None:  # asked once per stage and specialist: 0.16 s each at 100K classes
            text = json.dumps([[c.id, c.vertical] for c in self.classes])
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------------------------------------------- io
    def to_dict(self) -> dict[str, Any]:
        classes = []
        for c in self.classes:
            entry: dict[str, Any] = {"id": c.id, "name": c.name, "vertical": c.vertical}
            if c.parent is not None:
                entry["parent"] = c.parent
            classes.append(entry)
        return {"verticals": [{"id": v.id, "name": v.name} for v in self.verticals], "classes": classes}

    def save(self, path: str | Path) -> None:
        from kc.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        path = Path(path)
        if not path.is_file():
            raise TaxonomyError(f"{path}: taxonomy file not found; check the path in your config")
        with utf8_required(path, TaxonomyError):
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise TaxonomyError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<taxonomy>") -> Taxonomy:
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("verticals"), list)
            or not isinstance(data.get("classes"), list)
        ):
            raise TaxonomyError(
                f"{source}: a taxonomy is a mapping with two lists, 'verticals' and 'classes' "
                "(see the kc.taxonomy module docs for the format)"
            )
        problems: list[str] = []
        verticals = []
        for i, entry in enumerate(data["verticals"]):
            entry = {"id": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
                problems.append(f"verticals[{i}]: needs a non-empty string 'id'")
                continue
            _check_keys(entry, {"id", "name"}, f"vertical '{entry['id']}'", problems)
            verticals.append(Vertical(entry["id"], str(entry.get("name", entry["id"]))))
        raw_classes = []
        for i, entry in enumerate(data["classes"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
                problems.append(f"classes[{i}]: needs a non-empty string 'id'")
                continue
            _check_keys(entry, {"id", "name", "vertical", "parent"}, f"class '{entry['id']}'", problems)
            raw_classes.append(entry)
        if problems:
            raise TaxonomyError(format_problems(f"{source}: invalid taxonomy:", problems))
        classes = _resolve_verticals(verticals, raw_classes, source)
        return cls(verticals, classes, source=source)


def _check_keys(entry: dict, allowed: set[str], what: str, problems: list[str]) -> None:
    for key in entry:
        if key not in allowed:
            problems.append(f"{what}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")


def _resolve_verticals(verticals: list[Vertical], raw: list[dict], source: str) -> list[ClassInfo]:
    """Give every class its vertical, following parent links; report unknown parents, cycles and orphans."""
    vertical_ids = {v.id for v in verticals}
    by_id: dict[str, dict] = {}
    problems: list[str] = []
    for entry in raw:
        if entry["id"] in by_id:
            problems.append(f"class '{entry['id']}': duplicate class id; class ids must be unique")
        elif entry["id"] in vertical_ids:
            problems.append(f"class '{entry['id']}': id is also a vertical id; use distinct ids")
        by_id.setdefault(entry["id"], entry)
    if problems:
        raise TaxonomyError(format_problems(f"{source}: invalid taxonomy:", problems))

    # Cycles first: they would make every walk up the hierarchy endless.
    for cid in by_id:
        chain = [cid]
        parent = by_id[cid].get("parent")
        while parent in by_id:
            if parent in chain:
                cycle = " -> ".join(chain[chain.index(parent) :] + [parent])
                raise TaxonomyError(f"{source}: class '{cid}': parent links form a cycle ({cycle}); break it")
            chain.append(parent)
            parent = by_id[parent].get("parent")

    def vertical_of(cid: str) -> str | None:
        """The first vertical met walking up from `cid`: its own 'vertical', or a vertical as parent."""
        entry = by_id[cid]
        while True:
            if entry.get("vertical") is not None:
                return entry["vertical"]
            parent = entry.get("parent")
            if parent in vertical_ids:
                return parent
            if parent not in by_id:
                return None
            entry = by_id[parent]

    classes = []
    for entry in raw:
        cid = entry["id"]
        parent = entry.get("parent")
        if parent is not None and parent not in by_id and parent not in vertical_ids:
            problems.append(
                f"class '{cid}': parent '{parent}' is neither a class nor a vertical; add it or fix the parent"
            )
            continue
        own = entry.get("vertical")
        if own is not None and own not in vertical_ids:
            problems.append(f"class '{cid}': vertical '{own}' is not listed under 'verticals'; add it")
            continue
        vertical = vertical_of(cid)
        if vertical is None:
            problems.append(f"class '{cid}': in no vertical; give it a 'vertical' or a 'parent' inside one")
            continue
        if parent is not None and parent in by_id:
            inherited = vertical_of(parent)
            if inherited is not None and inherited != vertical:
                problems.append(
                    f"class '{cid}': vertical '{vertical}' differs from its parent '{parent}' "
                    f"(in '{inherited}'); a class and its parent share a vertical"
                )
                continue
        if parent is not None and parent in vertical_ids and parent != vertical:
            problems.append(f"class '{cid}': parent is vertical '{parent}' but its vertical is '{vertical}'")
            continue
        classes.append(ClassInfo(cid, str(entry.get("name", cid)), vertical, parent if parent in by_id else None))
    if problems:
        raise TaxonomyError(format_problems(f"{source}: invalid taxonomy:", problems))
    return classes


def _validate_structure(verticals: list[Vertical], classes: list[ClassInfo], source: str) -> None:
    problems = []
    seen: set[str] = set()
    for v in verticals:
        if v.id in seen:
            problems.append(f"vertical '{v.id}': duplicate vertical id")
        seen.add(v.id)
    if not verticals:
        problems.append("no verticals: list at least one under 'verticals'")
    counts = {v.id: 0 for v in verticals}
    for c in classes:
        if c.vertical not in counts:
            problems.append(f"class '{c.id}': vertical '{c.vertical}' is not listed under 'verticals'")
        else:
            counts[c.vertical] += 1
    for vid, n in counts.items():
        if n == 0:
            problems.append(f"vertical '{vid}': empty (no class belongs to it); remove it or add classes")
    if problems:
        raise TaxonomyError(format_problems(f"{source}: invalid taxonomy:", problems))
