"""Average precision per class, mAP, per-vertical AP and top-k accuracy.

AP follows scikit-learn's `average_precision_score`: AP = sum_n (R_n - R_{n-1}) P_n over the distinct score
thresholds, so tied scores enter together. Classes without a positive have no AP (NaN) and are left out of every
mean. Classes are processed in chunks so that memory stays bounded by (images x chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from kc.taxonomy import Taxonomy


def verified_targets(targets: np.ndarray, samples: list[Any], first_class: int = 0) -> np.ndarray:
    """Open Images' evaluation rule. When any image of the split carries verified negatives, a class is scored only
    on the images labelled present (positive) or verified absent (negative) for it; every other entry becomes -1,
    which the AP functions leave out. A split without verified negatives is returned unchanged: every unlabelled
    class of an image is a negative. `targets` cover the classes from `first_class` on (a specialist's)."""
    if not any(s.negatives for s in samples):
        return targets
    out = np.full_like(targets, -1.0)
    width = targets.shape[1]

    def columns(classes: Any) -> list[int]:
        return [c - first_class for c in classes if 0 <= c - first_class < width]

    for i, s in enumerate(samples):
        out[i, columns(s.negatives)] = 0.0
        out[i, columns(s.labels)] = 1.0
    return out


def average_precision(scores: np.ndarray, targets: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Per-class AP for (N, C) scores and (N, C) targets (1 positive, 0 negative, -1 not scored: ranked below
    everything, so it changes no precision); NaN where a class has no positive."""
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if (targets < 0).any():
        scores = np.where(targets < 0, -np.inf, scores)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, C)")
    out = np.full(scores.shape[1], np.nan)
    # Only classes with a positive have an AP: at 10K classes a val split of 4,000 images has positives for about
    # a third of them, so the others are never sorted.
    scored = np.flatnonzero((targets > 0).any(axis=0))
    for start in range(0, len(scored), chunk):
        columns = scored[start : start + chunk]
        block, positive = scores[:, columns].astype(np.float64), targets[:, columns] > 0
        # Few positives a class (the usual case over a large vocabulary): counting, for each positive, the images
        # scored at or above it costs N per positive, where sorting a class's column costs about N log N.
        few = positive.sum() <= _COUNTING_POSITIVES_PER_CLASS * len(columns)
        out[columns] = _ap_by_counting(block, positive) if few else _ap_chunk(block, positive)
    return out


# Below this many positives a class on average, `_ap_by_counting` beats sorting each column (measured at 4,000
# images: a column's argsort costs about as much as counting for 40 positives).
_COUNTING_POSITIVES_PER_CLASS = 16


def _ap_by_counting(scores: np.ndarray, positive: np.ndarray, block: int = 2048) -> np.ndarray:
    """AP of columns that each have a positive, the same figure as `_ap_chunk`: the precision at a positive is
    (positives at or above its score) / (images at or above it), so tied scores enter together, and AP is its mean
    over the class's positives. Memory: N x `block` booleans."""
    rows, cols = np.nonzero(positive)
    precision = np.empty(len(rows))
    for a in range(0, len(rows), block):
        r, c = rows[a : a + block], cols[a : a + block]
        at_or_above = scores[:, c] >= scores[r, c]
        precision[a : a + block] = (at_or_above & positive[:, c]).sum(axis=0) / at_or_above.sum(axis=0)
    return np.bincount(cols, weights=precision, minlength=scores.shape[1]) / positive.sum(axis=0)


def _ap_chunk(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    tp = np.cumsum(np.take_along_axis(positive, order, axis=0), axis=0, dtype=np.float64)
    # The last row of each group of tied scores is where a threshold is evaluated.
    group_end = np.ones_like(s, dtype=bool)
    group_end[:-1] = s[:-1] != s[1:]
    tp_at_end = np.where(group_end, tp, 0.0)
    # tp at the previous threshold: tp is non-decreasing, so a running max of the shifted values gives it.
    prev = np.zeros_like(tp_at_end)
    prev[1:] = np.maximum.accumulate(tp_at_end[:-1], axis=0)
    precision = tp / np.arange(1, n + 1, dtype=np.float64)[:, None]
    n_pos = positive.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(group_end, (tp_at_end - prev) * precision, 0.0).sum(axis=0) / n_pos
    ap[n_pos == 0] = np.nan
    return ap


def streaming_average_precision(
    batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], num_classes: int
) -> np.ndarray:
    """Per-class AP, exactly as `average_precision`, without ever holding the (images x classes) score matrix.

    `batches()` yields (scores (B, C) in [0, 1], targets (B, C)) and is iterated twice, in the same order or not.
    Pass 1 keeps the score of every positive (memory: one number per label). Pass 2 counts, for each class, the
    negatives scoring at or above each of its positives' scores: one sorted search of the batch's scores against
    all classes' positive scores at once (keys 2 * class + score keep the classes apart), and only for negatives
    at or above their class's lowest positive, which for a useful model is a small share. Precision at each
    positive = positives at or above it / (those + negatives at or above it); ties enter together, as in
    scikit-learn. Memory: O(labels + batch).
    """
    pos_class, pos_score = [], []
    for scores, targets in batches():
        rows, cols = np.nonzero(np.asarray(targets) > 0)
        pos_class.append(cols)
        pos_score.append(np.asarray(scores)[rows, cols].astype(np.float64))
    classes = np.concatenate(pos_class) if pos_class else np.zeros(0, dtype=np.int64)
    values = np.concatenate(pos_score) if pos_score else np.zeros(0)
    keys = np.sort(2.0 * classes + values)  # by class, then score ascending
    counts = np.bincount(classes, minlength=num_classes)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    lowest = np.full(num_classes, np.inf)
    has_pos = counts > 0
    lowest[has_pos] = keys[offsets[:-1][has_pos]] - 2.0 * np.flatnonzero(has_pos)

    marks = np.zeros(len(keys) + 1, dtype=np.int64)
    for scores, targets in batches():
        scores = np.asarray(scores, dtype=np.float64)
        if scores.size and (scores.min() < 0 or scores.max() > 1):
            raise ValueError("streaming AP needs scores in [0, 1] (probabilities)")
        candidate = (np.asarray(targets) == 0) & (scores >= lowest)  # -1: not scored
        rows, cols = np.nonzero(candidate)
        idx = np.searchsorted(keys, 2.0 * cols + scores[rows, cols], side="right")  # thresholds <= score, + offset
        np.add.at(marks, idx - 1, 1)  # idx - 1 >= offsets[c] because the score is >= the class's lowest positive
    marks = marks[:-1]

    ap = np.full(num_classes, np.nan)
    for c in np.flatnonzero(has_pos):  # one vectorised step per class that has positives
        a, b = offsets[c], offsets[c + 1]
        thresholds = keys[a:b] - 2.0 * c
        negatives_at_or_above = np.cumsum(marks[a:b][::-1])[::-1]
        positives_at_or_above = (b - a) - np.searchsorted(thresholds, thresholds, side="left")
        ap[c] = np.mean(positives_at_or_above / (positives_at_or_above + negatives_at_or_above))
    return ap


def topk_accuracy(
    scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5), rows: int = 256
) -> dict[str, float]:
    """Top-k accuracy for single-label data (`labels`: (N,) class indices); `rows` images at a time, so that the
    partition's (images x classes) index array stays small at 100K classes."""
    hits = dict.fromkeys(ks, 0)
    for a in range(0, scores.shape[0], rows):
        block, truth = -scores[a : a + rows], labels[a : a + rows, None]
        for k in ks:
            k_eff = min(k, scores.shape[1])
            top = np.argpartition(block, k_eff - 1, axis=1)[:, :k_eff]
            hits[k] += int((top == truth).any(axis=1).sum())
    return {f"top{k}": hits[k] / scores.shape[0] if scores.shape[0] else 0.0 for k in ks}


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def classification_metrics(scores: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy) -> dict:
    """mAP over classes, per-vertical AP (mean over the vertical's classes) and their mean, top-k when single-label.

    Percentages (0-100) throughout, as the paper reports them.
    """
    result = metrics_from_ap(average_precision(scores, targets), taxonomy, int(scores.shape[0]))
    counts = (targets > 0).sum(axis=1)
    if scores.shape[0] and (counts == 1).all():
        result.update({k: 100 * v for k, v in topk_accuracy(scores, targets.argmax(axis=1)).items()})
    return result


def metrics_from_ap(ap: np.ndarray, taxonomy: Taxonomy, images: int) -> dict:
    """mAP, per-vertical AP and their mean (percent) from per-class AP."""
    per_vertical = {}
    for v, vert in enumerate(taxonomy.verticals):
        start, end = taxonomy.vertical_ranges[v]
        block = ap[start:end]
        per_vertical[vert.id] = {
            "ap": 100 * _nanmean(block),
            "classes_scored": int((~np.isnan(block)).sum()),
            "classes": end - start,
        }
    vertical_aps = np.array([m["ap"] for m in per_vertical.values()])
    result = {
        "mAP": 100 * _nanmean(ap),
        "mean_per_vertical_AP": _nanmean(vertical_aps),
        "classes_scored": int((~np.isnan(ap)).sum()),
        "images": images,
        "per_vertical": per_vertical,
        "per_class_ap": [None if np.isnan(a) else 100 * float(a) for a in ap],
    }
    return result


def vertical_rows(targets: np.ndarray, start: int, end: int) -> np.ndarray:
    """The images (rows) with a positive among the classes [start, end): a vertical's own images."""
    return np.flatnonzero((targets[:, start:end] > 0).any(axis=1))


def within_vertical_ap(scores: np.ndarray, targets: np.ndarray, taxonomy: Taxonomy) -> np.ndarray:
    """Per-class AP with each class ranked among its vertical's own images only (those with a label in the
    vertical): how well a model tells a vertical's classes apart, whatever it does across verticals."""
    ap = np.full(targets.shape[1], np.nan)
    for start, end in taxonomy.vertical_ranges:
        rows = vertical_rows(targets, start, end)
        if len(rows):
            ap[start:end] = average_precision(scores[rows, start:end], targets[rows, start:end])
    return ap


def vertical_floor_ap(targets: np.ndarray, taxonomy: Taxonomy, draws: int = 10, seed: int = 0) -> np.ndarray:
    """Per-class AP of the "vertical-only" scorer, the chance floor of a split: it knows each image's verticals and
    nothing else (an image of the class's vertical above every other image, in random order among them). Its
    expected AP is estimated over `draws` seeded random orders. Over all images and within vertical it is the same:
    every positive of a class lies among its vertical's images."""
    rng = np.random.default_rng(seed)
    ap = np.full(targets.shape[1], np.nan)
    for start, end in taxonomy.vertical_ranges:
        rows = vertical_rows(targets, start, end)
        if not len(rows):
            continue
        block = targets[rows, start:end]
        ap[start:end] = np.mean(
            [
                average_precision(np.repeat(rng.random((len(rows), 1)), end - start, axis=1), block)
                for _ in range(draws)
            ],
            axis=0,
        )
    return ap
