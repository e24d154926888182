"""Verticals from data: cluster classes by how the generalist's predicted probabilities co-vary over images.

Hinton et al. (2015) formed their JFT specialists' class groups by clustering the covariance matrix of the
generalist's predictions. A (classes x classes) covariance does not fit at 100K classes, so each class is embedded
instead by a random projection of its centred probability column over the held-out images: E = (P - mean)^T R with
R a seeded (images x d) Gaussian matrix, accumulated batch by batch (memory: classes x d). Inner products of these
embeddings approximate the covariance (Johnson-Lindenstrauss); rows are L2-normalised, so clusters gather classes
whose predictions rise and fall together (a correlation), whatever their frequency. Clustering: spherical k-means
with k-means++ seeding, best of several seeded restarts; `balanced` caps every cluster at ceil(classes / k):
each centre keeps the most similar of the classes that prefer it, the others choose again among centres with room.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from kc.taxonomy import ClassInfo, Taxonomy, Vertical


def class_embeddings(batches: Iterable[np.ndarray], num_classes: int, dims: int = 64, seed: int = 0) -> np.ndarray:
    """(classes, dims) embeddings from batches of (B, classes) predicted probabilities, streaming."""
    rng = np.random.default_rng(seed)
    projected = np.zeros((num_classes, dims))
    column_sums = np.zeros(num_classes)
    projection_sums = np.zeros(dims)
    images = 0
    for probs in batches:
        probs = np.asarray(probs, dtype=np.float64)
        r = rng.standard_normal((probs.shape[0], dims))
        projected += probs.T @ r
        column_sums += probs.sum(axis=0)
        projection_sums += r.sum(axis=0)
        images += probs.shape[0]
    if images == 0:
        raise ValueError("no predictions to cluster")
    centred = projected - np.outer(column_sums / images, projection_sums)  # = (P - mean)^T R
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.maximum(norms, 1e-12)


def _assign(embeddings: np.ndarray, centres: np.ndarray, capacity: int | None) -> np.ndarray:
    similarity = embeddings @ centres.T
    if capacity is None:
        return similarity.argmax(axis=1)
    # Balanced: every open centre takes, of the classes that prefer it, the most similar ones up to its room; the
    # others choose again among the centres still open. Each round fills at least one centre or ends.
    labels = np.full(len(embeddings), -1)
    room = np.full(len(centres), capacity)
    waiting = np.arange(len(embeddings))
    while len(waiting):
        sim = similarity[waiting].copy()
        sim[:, room == 0] = -np.inf
        choice = sim.argmax(axis=1)
        best = sim[np.arange(len(waiting)), choice]
        order = np.lexsort((-best, choice))  # by centre, most similar first
        ranked_choice = choice[order]
        group_start = np.searchsorted(ranked_choice, ranked_choice, side="left")
        accepted = order[(np.arange(len(order)) - group_start) < room[ranked_choice]]
        labels[waiting[accepted]] = choice[accepted]
        room -= np.bincount(choice[accepted], minlength=len(centres))
        waiting = waiting[labels[waiting] < 0]
    return labels


def spherical_kmeans(
    embeddings: np.ndarray, k: int, balanced: bool = False, restarts: int = 5, iterations: int = 50, seed: int = 0
) -> np.ndarray:
    """Cluster labels (classes,) for unit-norm embeddings; the restart with the highest total similarity wins."""
    n = len(embeddings)
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} classes")
    capacity = math.ceil(n / k) if balanced else None
    rng = np.random.default_rng(seed)
    best, best_score = None, -np.inf
    for _ in range(restarts):
        # k-means++ seeding on the cosine distance
        centres = [embeddings[rng.integers(n)]]
        for _ in range(1, k):
            distance = np.clip(1 - np.max(embeddings @ np.array(centres).T, axis=1), 0, None)
            p = distance / distance.sum() if distance.sum() > 0 else None
            centres.append(embeddings[rng.choice(n, p=p)])
        centres = np.array(centres)
        labels = np.full(n, -1)
        for _ in range(iterations):
            new = _assign(embeddings, centres, capacity)
            if np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = embeddings[labels == j]
                if len(members):
                    mean = members.sum(axis=0)
                    centres[j] = mean / max(np.linalg.norm(mean), 1e-12)
        score = float(np.sum(embeddings * centres[labels]))
        if score > best_score:
            best, best_score = labels, score
    assert best is not None
    return best


def grouped_taxonomy(taxonomy: Taxonomy, labels: np.ndarray, prefix: str = "cluster") -> Taxonomy:
    """The same classes regrouped into the discovered verticals (named after their first classes). Class parents
    are dropped: a parent may have landed in another cluster."""
    k = int(labels.max()) + 1
    verticals = []
    for j in range(k):
        members = [taxonomy.classes[i].name for i in np.flatnonzero(labels == j)]
        shown = ", ".join(members[:3]) + (", ..." if len(members) > 3 else "")
        verticals.append(Vertical(f"{prefix}_{j:03d}", f"{prefix} {j:03d}: {shown}"))
    classes = [ClassInfo(c.id, c.name, verticals[int(labels[i])].id) for i, c in enumerate(taxonomy.classes)]
    used = sorted(set(labels.tolist()))
    return Taxonomy([verticals[j] for j in used], classes, source="discovered")


def agreement(labels: np.ndarray, reference: list[int]) -> float:
    """Share of classes whose cluster's most common reference vertical is their own (purity), in [0, 1]."""
    reference = np.asarray(reference)
    agree = 0
    for j in np.unique(labels):
        members = reference[labels == j]
        agree += np.bincount(members).max()
    return agree / len(labels)
