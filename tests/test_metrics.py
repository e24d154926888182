import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from kc.evaluate.metrics import (
    _ap_by_counting,
    _ap_chunk,
    average_precision,
    classification_metrics,
    streaming_average_precision,
    topk_accuracy,
)
from kc.taxonomy import Taxonomy


@pytest.mark.parametrize("share", [0.03, 0.15, 0.6])  # few positives a class (counted) and many (sorted)
@pytest.mark.parametrize("seed", range(6))
def test_ap_agrees_with_sklearn_including_ties_and_empty_classes(seed, share):
    rng = np.random.default_rng(seed)
    n, c = 80, 30
    scores = rng.random((n, c))
    if seed % 2:
        scores = np.round(scores * 4) / 4  # many ties
    targets = (rng.random((n, c)) < share).astype(int)
    targets[rng.integers(0, n, c), np.arange(c)] = 1  # every class from the 4th on has a positive
    targets[:, :3] = 0  # classes without a positive
    ap = average_precision(scores, targets, chunk=7)
    has_pos = targets.sum(0) > 0
    assert np.isnan(ap[~has_pos]).all()
    ref = average_precision_score(targets[:, has_pos], scores[:, has_pos], average=None)
    np.testing.assert_allclose(ap[has_pos], ref, atol=1e-12)
    macro = average_precision_score(targets[:, has_pos], scores[:, has_pos], average="macro")
    assert np.nanmean(ap) == pytest.approx(macro, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_counting_and_sorting_give_the_same_ap(seed):
    """The two ways `average_precision` computes a class's AP agree, ties and unscored (-1) entries included."""
    rng = np.random.default_rng(seed)
    n, c = 120, 40
    scores = np.round(rng.random((n, c)) * (3 if seed % 2 else 1000)) / 1000
    targets = (rng.random((n, c)) < 0.1).astype(int)
    targets[rng.integers(0, n, c), np.arange(c)] = 1
    targets[rng.random((n, c)) < 0.2] = -1
    targets[rng.integers(0, n, c), np.arange(c)] = 1
    scores = np.where(targets < 0, -np.inf, scores)
    positive = targets > 0
    np.testing.assert_allclose(_ap_by_counting(scores, positive, block=7), _ap_chunk(scores, positive), atol=1e-12)


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


@pytest.mark.parametrize("seed", range(4))
def test_streaming_ap_equals_exact_ap_without_the_score_matrix(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 25
    scores = rng.random((n, c)).astype(np.float32)
    if seed % 2:
        scores = np.round(scores * 8) / 8  # ties within and across positives and negatives
    targets = rng.random((n, c)) < 0.1
    targets[:, 0] = False  # no positive: NaN
    scores[targets] = np.minimum(1.0, scores[targets] + 0.25)

    def batches():  # in another order on each pass: the result must not depend on it
        order = rng.permutation(n)
        for i in range(0, n, 37):
            rows = order[i : i + 37]
            yield scores[rows], targets[rows]

    streaming = streaming_average_precision(batches, c)
    exact = average_precision(scores, targets)
    assert np.isnan(streaming[0]) and np.isnan(exact[0])
    np.testing.assert_allclose(streaming[1:], exact[1:], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        streaming_average_precision(lambda: iter([(scores * 3, targets)]), c)


def test_evaluation_switches_to_streaming_with_the_same_result(tmp_path, tiny_benchmark):
    from safetensors.torch import save_file

    from conftest import tiny_config
    from kc.config import config_from_dict
    from kc.evaluate.stage import evaluate_stage
    from kc.run import prepare_run
    from kc.stages import GENERALIST, new_model

    run = prepare_run(config_from_dict(tiny_config(tiny_benchmark, tmp_path / "run")), progress=False)
    weights = run.stage_dir(GENERALIST) / "checkpoints"
    weights.mkdir(parents=True)
    save_file(new_model(run, GENERALIST).state_dict(), str(weights / "best.safetensors"))
    in_memory = evaluate_stage(run, GENERALIST, progress=False)
    streaming = evaluate_stage(run, GENERALIST, progress=False, max_score_bytes=0)
    assert streaming["streaming"] and "streaming" not in in_memory
    assert streaming["mAP"] == pytest.approx(in_memory["mAP"], abs=1e-9)
    assert streaming["per_class_ap"] == pytest.approx(in_memory["per_class_ap"], abs=1e-9)
