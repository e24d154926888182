"""Turning a model's scores into labels: the label table of a taxonomy, top-k with thresholds and vertical filters."""

from __future__ import annotations

from typing import Any

import numpy as np

from kc.errors import KCError
from kc.taxonomy import Taxonomy


def label_table(taxonomy: Taxonomy) -> list[dict[str, Any]]:
    """One entry per model output, in output order: id, name, vertical and hierarchy path."""
    return [
        {
            "index": i,
            "id": c.id,
            "name": c.name,
            "vertical": c.vertical,
            "path": taxonomy.path(i),
        }
        for i, c in enumerate(taxonomy.classes)
    ]


class LabelPicker:
    """Top-k labels of one image's scores, optionally only above a threshold (global or per class) and only in
    some verticals."""

    def __init__(self, taxonomy: Taxonomy, class_thresholds: dict[str, float] | None = None):
        self.taxonomy = taxonomy
        self.table = label_table(taxonomy)
        self.thresholds = np.zeros(taxonomy.num_classes, dtype=np.float32)
        for class_id, value in (class_thresholds or {}).items():
            if class_id not in taxonomy.class_index:
                raise KCError(f"thresholds: '{class_id}' is not a class of this model; use ids from its labels")
            self.thresholds[taxonomy.class_index[class_id]] = value

    def vertical_mask(self, verticals: list[str] | None) -> np.ndarray | None:
        if not verticals:
            return None
        mask = np.zeros(self.taxonomy.num_classes, dtype=bool)
        for vid in verticals:
            if vid not in self.taxonomy.vertical_index:
                known = ", ".join(v.id for v in self.taxonomy.verticals[:20])
                raise KCError(f"vertical '{vid}' is not a vertical of this model (verticals: {known})")
            start, end = self.taxonomy.vertical_ranges[self.taxonomy.vertical_index[vid]]
            mask[start:end] = True
        return mask

    def pick(
        self, scores: np.ndarray, top_k: int = 5, threshold: float = 0.0, verticals: list[str] | None = None
    ) -> list[dict[str, Any]]:
        keep = scores >= np.maximum(self.thresholds, threshold)
        mask = self.vertical_mask(verticals)
        if mask is not None:
            keep &= mask
        candidates = np.flatnonzero(keep)
        if candidates.size > top_k:
            part = np.argpartition(-scores[candidates], top_k - 1)[:top_k]
            candidates = candidates[part]
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        return [{**self.table[i], "score": float(scores[i])} for i in order]
