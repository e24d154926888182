"""`kc check-data`: every problem of a dataset at once, before any training, without creating a run directory.

Checks, in order, going as far as the data allows: the taxonomy; the manifest or image folder (every bad row);
every image decodes (each unreadable one listed); the unlabeled images of `data.unlabeled` likewise; and
coverage: verticals without training images (their specialists cannot train: a problem) and classes without
training or test images (warnings: never learned, or never scored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kc.config import RunConfig
from kc.data.images import check_images
from kc.data.samples import SPLITS, load_unlabeled
from kc.data.sources import load_source
from kc.data.splits import assign_splits
from kc.errors import KCError
from kc.taxonomy import Taxonomy


@dataclass
class DataReport:
    problems: list[str] = field(default_factory=list)  # stop training: fix these
    warnings: list[str] = field(default_factory=list)  # training runs, but the user should know
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _coverage(report: DataReport, taxonomy: Taxonomy, samples: list[Any]) -> None:
    counts = {split: [0] * taxonomy.num_classes for split in SPLITS}
    for s in samples:
        for c in s.labels:
            counts[s.split][c] += 1
    for v, vertical in enumerate(taxonomy.verticals):
        start, end = taxonomy.vertical_ranges[v]
        if not any(counts["train"][start:end]):
            report.problems.append(
                f"vertical '{vertical.id}': no training image has a label in it, so its specialist cannot train; "
                "add images or remove the vertical from the taxonomy"
            )
    for split, kind in (("train", "never learned"), ("test", "never scored")):
        empty = [taxonomy.classes[c].id for c in range(taxonomy.num_classes) if counts[split][c] == 0]
        if empty and samples and any(s.split == split for s in samples):
            shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
            report.warnings.append(f"{len(empty)} class(es) without a {split} image ({kind}): {shown}")
    report.stats["images_per_split"] = {split: sum(1 for s in samples if s.split == split) for split in SPLITS}


def _unreadable(report: DataReport, bad: list[dict[str, str]], image_root: Path, policy: str) -> None:
    """Each unreadable image, with its manifest line: a warning when bad images are skipped, else a problem."""
    for entry in bad:
        message = f"{entry['where']}: {image_root / entry['path']}: {entry['why']}"
        (report.warnings if policy == "skip" else report.problems).append(message)


def check_data(cfg: RunConfig, progress: bool = False) -> DataReport:
    report = DataReport()
    d = cfg.data
    try:
        taxonomy, samples, image_root = load_source(d)
    except KCError as exc:
        report.problems.append(str(exc))
        return report
    report.stats.update({"classes": taxonomy.num_classes, "verticals": taxonomy.num_verticals, "images": len(samples)})
    samples = assign_splits(samples, d.split.val, d.split.test, cfg.seed)
    kept, bad = check_images(samples, image_root, "skip", progress=progress)
    _unreadable(report, bad, image_root, d.bad_images)
    report.stats["unreadable_images"] = len(bad)
    if d.unlabeled is not None:
        try:
            unlabeled = load_unlabeled(d.unlabeled, image_root, {s.path for s in samples})
        except KCError as exc:
            report.problems.append(str(exc))
        else:
            _, bad_unlabeled = check_images(unlabeled, image_root, "skip", progress=progress)
            _unreadable(report, bad_unlabeled, image_root, d.bad_images)
            report.stats["unlabeled_images"] = len(unlabeled)
            report.stats["unreadable_images"] += len(bad_unlabeled)
    _coverage(report, taxonomy, kept)
    return report


def report_text(report: DataReport) -> str:
    s = report.stats
    lines = []
    if "images" in s:
        splits = ", ".join(f"{k} {v:,}" for k, v in s.get("images_per_split", {}).items())
        unlabeled = f", {s['unlabeled_images']:,} unlabeled" if "unlabeled_images" in s else ""
        lines.append(
            f"{s['images']:,} images ({splits}){unlabeled}, {s['classes']:,} classes in {s['verticals']:,} "
            f"verticals, {s.get('unreadable_images', 0)} unreadable"
        )
    for title, items in (("problems", report.problems), ("warnings", report.warnings)):
        if items:
            lines.append(f"{len(items)} {title}:")
            lines += ["  - " + item.replace("\n", "\n    ") for item in items]
    lines.append("data OK" if report.ok else "fix the problems above before training")
    return "\n".join(lines)
