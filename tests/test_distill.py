"""Multi-teacher soft targets and the distillation loss, on hand-made teachers with known outputs."""

import pytest
import torch
from torch import nn

from kc.distill.loss import distillation_loss
from kc.distill.targets import OnlineTeachers, selected_verticals, top_k_entries
from kc.taxonomy import Taxonomy

TAX = Taxonomy.from_dict(
    {
        "verticals": ["a", "b"],
        "classes": [
            *({"id": f"a{i}", "vertical": "a"} for i in range(5)),
            *({"id": f"b{i}", "vertical": "b"} for i in range(3)),
        ],
    }
)


class FixedTeacher(nn.Module):
    """Logits that depend only on the image's first pixel (its id), and a record of the images it saw."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits  # (num images, outputs)
        self.seen: list[int] = []

    def forward(self, images):
        ids = images[:, 0, 0, 0].long()
        self.seen += ids.tolist()
        return self.logits[ids]


def teachers(other_output=False):
    g = torch.Generator().manual_seed(0)
    return [FixedTeacher(torch.randn(4, 5 + other_output, generator=g)), FixedTeacher(torch.randn(4, 3, generator=g))]


def images(n=4):
    x = torch.zeros(n, 3, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n).float()
    return x


# image 0: a-only; image 1: b-only; image 2: a and b; image 3: no label
LABELS = torch.tensor([[1, -1], [6, -1], [0, 7], [-1, -1]])


def test_selected_verticals():
    sel = selected_verticals(LABELS, torch.tensor(TAX.vertical_of_class), 2)
    assert sel.tolist() == [[True, False], [False, True], [True, True], [False, False]]


def test_soft_targets_keep_exactly_the_top_k_of_the_selected_teachers_and_zero_elsewhere():
    ts = teachers()
    soft = OnlineTeachers(ts, TAX, top_k=2, temperature=1.0)(images(), LABELS)
    probs_a = torch.sigmoid(ts[0].logits)
    # image 0: block a holds the two largest probabilities of teacher a, at their classes; block b is zero
    row = soft.values[0]
    top = probs_a[0].topk(2)
    expected = torch.zeros(5).scatter_(0, top.indices, top.values)
    assert torch.equal(row[:5], expected)
    assert (row[5:] == 0).all()
    assert int((row > 0).sum()) == 2
    # image 1: only block b (3 classes, K=2 keeps 2 of them)
    assert (soft.values[1, :5] == 0).all() and int((soft.values[1, 5:] > 0).sum()) == 2
    # image 3 has no label: no teacher, all zero
    assert (soft.values[3] == 0).all()


def test_an_image_with_labels_in_two_verticals_is_taught_by_both_teachers():
    ts = teachers()
    soft = OnlineTeachers(ts, TAX, top_k=100, temperature=1.0)(images(), LABELS)
    assert sorted(ts[0].seen) == [0, 2] and sorted(ts[1].seen) == [1, 2]  # each teacher runs once, on its images
    assert torch.allclose(soft.values[2, :5], torch.sigmoid(ts[0].logits[2]))
    assert torch.allclose(soft.values[2, 5:], torch.sigmoid(ts[1].logits[2]))


def test_temperature_and_other_output():
    ts = teachers(other_output=True)
    soft = OnlineTeachers(ts, TAX, top_k=100, temperature=2.0)(images(), LABELS)
    assert torch.allclose(soft.values[0, :5], torch.sigmoid(ts[0].logits[0, :5] / 2))  # 'other' is not a class


def test_top_k_entries_keep_the_largest_of_each_rows_own_classes():
    x = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.6, 0.2, 0.0, 0.0]])  # row 1: 2 classes, then padding
    columns, values = top_k_entries(x, 3, torch.tensor([4, 2]))
    assert columns.tolist() == [[1, 3, 2], [0, 1, -1]]
    assert torch.equal(values, torch.tensor([[0.9, 0.7, 0.5], [0.6, 0.2, 0.0]]))


def loss_and_grad(unselected, mode="none", weights=(1.0, 1.0)):
    soft = OnlineTeachers(teachers(), TAX, top_k=3, temperature=1.0, unselected=unselected)(images(), LABELS)
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    truth = torch.zeros(4, 8).scatter_(1, LABELS.clamp(min=0), 1.0) * (LABELS >= 0).any(1, keepdim=True)
    truth[3] = 0
    loss = distillation_loss(logits, soft, truth, torch.tensor(TAX.vertical_of_class), torch.tensor(weights), mode=mode)
    loss.backward()
    return loss, logits.grad, soft


def test_gradient_reaches_only_the_logits_the_targets_define():
    _, grad, soft = loss_and_grad("ignore")
    assert torch.equal(grad != 0, soft.defined)
    assert soft.defined[0, :5].all() and not soft.defined[0, 5:].any()  # image 0: vertical a only
    assert not soft.defined[3].any()  # no label, no teacher, no loss
    _, grad, soft = loss_and_grad("zero")  # the paper: every class is a target (0 outside the selected top-K)
    assert soft.defined.all() and (grad != 0).all()
    _, grad, _ = loss_and_grad("zero", weights=(1.0, 0.0))  # a vertical weighted 0 gets no gradient
    assert (grad[:, 5:] == 0).all() and (grad[:, :5] != 0).all()


def test_ground_truth_mixing():
    none, _, soft = loss_and_grad("zero", "none")
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    truth = torch.zeros(4, 8)
    truth[0, 1] = 1.0
    voc, w = torch.tensor(TAX.vertical_of_class), torch.ones(2)
    plain = distillation_loss(logits, soft, truth, voc, w, mode="none")
    maxed = distillation_loss(logits, soft, truth, voc, w, mode="max")
    manual = (
        nn.functional.binary_cross_entropy_with_logits(logits, torch.maximum(soft.values, truth), reduction="sum") / 4
    )
    assert maxed == pytest.approx(manual.item(), rel=1e-6)
    gt = nn.functional.binary_cross_entropy_with_logits(logits, truth, reduction="sum") / 4
    weighted = distillation_loss(logits, soft, truth, voc, w, mode="weighted", truth_weight=0.25)
    assert weighted == pytest.approx(0.75 * plain.item() + 0.25 * gt.item(), rel=1e-6)
