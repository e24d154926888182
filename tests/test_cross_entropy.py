"""Summed sigmoid cross-entropy terms (kc.cross_entropy) against torch's own cross-entropy, entry by entry."""

import pytest
import torch

from kc.cross_entropy import SparseTerm, Term, entry_values, summed_bce, summed_sparse_terms, summed_terms


def reference(logits: torch.Tensor, terms: dict[str, Term]) -> dict[str, torch.Tensor]:
    return {name: entry_values(logits, term).sum() for name, term in terms.items()}


def compare(make_terms, shape=(6, 9), transposed=False) -> None:
    """Values and gradients of `summed_terms` against torch's cross-entropy summed, in float64."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape[::-1] if transposed else shape, generator=g, dtype=torch.float64) * 6
    terms = make_terms(g, shape)
    grads = []
    for fn in (summed_terms, reference):
        x = base.clone().requires_grad_()
        logits = x.t() if transposed else x  # a head that computes class by class hands its outputs transposed
        out = fn(logits, terms)
        total = sum((i + 1.5) * v for i, v in enumerate(out.values()))  # each term's gradient with its own weight
        total.backward()
        grads.append((out, x.grad))
    (fast, fast_grad), (ref, ref_grad) = grads
    assert list(fast) == list(ref)
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-10, atol=1e-12)


def soft(g, shape):
    return torch.rand(shape, generator=g, dtype=torch.float64) * (torch.rand(shape, generator=g) < 0.5)


def hard(g, shape):
    return (torch.rand(shape, generator=g) < 0.2).double()


@pytest.mark.parametrize(
    "weight",
    [
        lambda g, s: 1.0,
        lambda g, s: 0.3,
        lambda g, s: torch.rand(s[0], 1, generator=g, dtype=torch.float64),  # per row
        lambda g, s: torch.rand(1, s[1], generator=g, dtype=torch.float64),  # per column
        lambda g, s: torch.rand(s[1], generator=g, dtype=torch.float64),  # per column, broadcast from 1-D
        lambda g, s: torch.rand(s, generator=g, dtype=torch.float64) * (torch.rand(s, generator=g) < 0.7),
    ],
    ids=["one", "scalar", "rows", "columns", "columns-1d", "entries"],
)
def test_one_term_of_any_weight_layout_matches_torch(weight):
    compare(lambda g, s: {"a": Term(weight(g, s), soft(g, s))})


@pytest.mark.parametrize("transposed", [False, True])
def test_several_terms_and_temperatures_match_torch_each_with_its_own_gradient(transposed):
    def terms(g, s):
        rows = torch.rand(s[0], 1, generator=g, dtype=torch.float64)
        return {
            "soft": Term(rows, soft(g, s), temperature=2.0),
            "truth": Term(1 - rows, hard(g, s)),
            "sharper": Term(0.5, soft(g, s), temperature=0.5),
            "soft again": Term(torch.rand(s, generator=g, dtype=torch.float64), soft(g, s), temperature=2.0),
        }

    compare(terms, transposed=transposed)


def test_extreme_logits_stay_finite_and_exact():
    """Confident logits (far below and above zero) in float32: no overflow in softplus, the gradient is exact."""
    x = torch.tensor([[-400.0, -30.0, 0.0, 30.0, 90.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 0.5, 1.0, 0.0]])
    loss = summed_bce(x, t)
    loss.backward()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(x.detach(), t, reduction="sum")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()) - t)


def test_a_target_not_of_the_logits_shape_is_refused():
    with pytest.raises(ValueError, match="term 'a': target of shape \\(3, 1\\), logits of shape \\(3, 4\\)"):
        summed_terms(torch.zeros(3, 4), {"a": Term(1.0, torch.zeros(3, 1))})


@pytest.mark.parametrize("padded", [False, True])
def test_sparse_targets_sum_as_their_dense_terms_over_each_rows_own_entries(padded):
    """`summed_sparse_terms` against torch's cross-entropy on the dense targets, padding (and anything in it) left
    out: values and gradients, two temperatures, a column named twice in a row adding up, rows without targets."""
    g = torch.Generator().manual_seed(0)
    rows, width = 5, 8
    sizes = torch.tensor([8, 6, 8, 3, 7]) if padded else torch.full((rows,), width)
    valid = torch.arange(width) < sizes.unsqueeze(1)
    base = torch.randn(rows, width, generator=g, dtype=torch.float64) * 6
    columns = torch.tensor([[0, 5, 5], [1, -1, -1], [7, 2, -1], [-1, -1, -1], [6, 0, 3]])
    values = torch.rand(rows, 3, generator=g, dtype=torch.float64) * (columns >= 0)
    labels = torch.tensor([[3], [0], [-1], [2], [6]])
    weight = torch.rand(rows, generator=g, dtype=torch.float64)
    terms = {
        "soft": SparseTerm(weight, columns, values, temperature=2.0),
        "truth": SparseTerm(1 - weight, labels, (labels >= 0).double()),
    }

    def dense(term: SparseTerm) -> Term:
        target = torch.zeros(rows, width, dtype=torch.float64)
        target.index_put_(
            (
                torch.arange(rows).unsqueeze(1).expand_as(term.columns)[term.columns >= 0],
                term.columns[term.columns >= 0],
            ),
            term.values[term.columns >= 0],
            accumulate=True,
        )
        return Term(term.weight.unsqueeze(1) * valid, target, term.temperature)

    grads = []
    for fn in (
        lambda x: summed_sparse_terms(x, sizes, terms),
        lambda x: reference(x, {n: dense(t) for n, t in terms.items()}),
    ):
        x = base.clone().requires_grad_()
        out = fn(x)
        (out["soft"] * 1.5 + out["truth"] * 2.5).backward()
        grads.append((out, x.grad))
    (fast, fast_grad), (ref, ref_grad) = grads
    for name in terms:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert (fast_grad[~valid] == 0).all()
