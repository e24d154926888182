import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from kc.evaluate.metrics import average_precision, classification_metrics, topk_accuracy
from kc.taxonomy import Taxonomy


@pytest.mark.parametrize("seed", range(6))
def test_ap_agrees_with_sklearn_including_ties_and_empty_classes(seed):
    rng = np.random.default_rng(seed)
    n, c = 80, 30
    scores = rng.random((n, c))
    if seed % 2:
        scores = np.round(scores * 4) / 4  # many ties
    targets = (rng.random((n, c)) < 0.15).astype(int)
    targets[:, :3] = 0  # classes without a positive
    ap = average_precision(scores, targets, chunk=7)
    has_pos = targets.sum(0) > 0
    assert np.isnan(ap[~has_pos]).all()
    ref = average_precision_score(targets[:, has_pos], scores[:, has_pos], average=None)
    np.testing.assert_allclose(ap[has_pos], ref, atol=1e-12)
    macro = average_precision_score(targets[:, has_pos], scores[:, has_pos], average="macro")
    assert np.nanmean(ap) == pytest.approx(macro, abs=1e-12)


def test_perfect_and_worst_rankings():
    targets = np.array([[1], [1], [0], [0]])
    assert average_precision(np.array([[0.9], [0.8], [0.1], [0.2]]), targets)[0] == pytest.approx(1.0)
    assert average_precision(np.array([[0.1], [0.2], [0.9], [0.8]]), targets)[0] == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_per_vertical_and_headline_metrics():
    tax = Taxonomy.from_dict(
        {
            "verticals": ["a", "b"],
            "classes": [
                {"id": "a1", "vertical": "a"},
                {"id": "a2", "vertical": "a"},
                {"id": "a3", "vertical": "a"},
                {"id": "b1", "vertical": "b"},
            ],
        }
    )
    rng = np.random.default_rng(0)
    targets = np.zeros((40, 4), dtype=int)
    targets[np.arange(40), rng.integers(0, 3, 40)] = 1  # b1 has no positive
    scores = rng.random((40, 4))
    m = classification_metrics(scores, targets, tax)
    ap = average_precision(scores, targets)
    assert m["mAP"] == pytest.approx(100 * np.mean(ap[:3]))
    assert m["per_vertical"]["a"]["ap"] == pytest.approx(100 * np.mean(ap[:3]))
    assert m["per_vertical"]["b"]["classes_scored"] == 0
    assert m["mean_per_vertical_AP"] == pytest.approx(m["per_vertical"]["a"]["ap"])  # b has nothing to score
    assert m["classes_scored"] == 3
    assert m["per_class_ap"][3] is None
    assert "top1" in m  # single-label data


def test_topk():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_accuracy(scores, np.array([2, 0]), ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}
