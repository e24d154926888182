"""The student loss over sampled verticals: the full loss exactly when every vertical is drawn, an unbiased estimate
of it when few are, and logits computed only for the verticals a step touches."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kc.data.dataset import dense_targets
from kc.distill.loss import distillation_loss, entry_losses
from kc.distill.sampled import SampledVerticalsLoss, width_groups
from kc.distill.targets import OnlineTeachers
from kc.models.classifier import Classifier, ClassSubset
from kc.models.heads import ClassBlocks, DenseHead
from kc.models.self_paced import SelfPacedScales
from kc.models.structured import StructuredHead
from kc.taxonomy import Taxonomy
from kc.train.student import train_student
from test_pipeline import trained_teachers

SIZES = [5, 3, 4, 2]
TAX = Taxonomy.from_dict(
    {
        "verticals": ["a", "b", "c", "d"],
        "classes": [{"id": f"{v}{i}", "vertical": v} for v, n in zip("abcd", SIZES, strict=True) for i in range(n)],
    }
)
# image 0: a; 1: b; 2: a and c (two labels in c); 3: no label; 4: d; 5: c
LABELS = torch.tensor([[1, -1, -1], [6, -1, -1], [0, 9, 11], [-1, -1, -1], [12, -1, -1], [10, -1, -1]])
IMAGES = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0))


def teachers(unselected="zero", top_k=3):
    torch.manual_seed(1)
    specialists = [nn.Sequential(nn.Flatten(), nn.Linear(12, n)) for n in SIZES]
    return OnlineTeachers(specialists, TAX, top_k=top_k, temperature=2.0, unselected=unselected)


def student(head="dense", variant="vertical", norm="image"):
    torch.manual_seed(2)
    voc = TAX.vertical_of_class
    if head == "dense":
        top = DenseHead(12, [8], TAX.num_classes)
    else:
        top = StructuredHead(12, [8, 4], SIZES, structure="fc-sc")
    kind = {"centred": norm == "centred", "running": norm == "running"}
    scales = SelfPacedScales(voc, variant, init_noise=0.3, **kind) if variant else None
    return Classifier(nn.Flatten(), top, scales)


def batch():
    return {"images": IMAGES, "labels": LABELS, "index": torch.arange(6)}


def full_loss(model, t, weights, mode, truth_weight=0.3, has_truth=None):
    soft = t(IMAGES, LABELS)
    voc = torch.tensor(TAX.vertical_of_class)
    truth = dense_targets(LABELS, TAX.num_classes)
    return distillation_loss(
        model(IMAGES),
        soft,
        truth,
        voc,
        weights,
        mode=mode,
        truth_weight=truth_weight,
        temperature=2.0,
        has_truth=has_truth,
    )


def sampled(t, weights, drawn, mode, unselected, truth_weight=0.3, labelled_images=None):
    return SampledVerticalsLoss(
        t,
        weights,
        drawn,
        mode=mode,
        truth_weight=truth_weight,
        temperature=2.0,
        unselected=unselected,
        labelled_images=labelled_images,
    )


@pytest.mark.parametrize(
    ("mode", "unselected", "head", "variant", "norm"),
    [
        ("none", "zero", "dense", "vertical", "image"),
        ("max", "zero", "dense", "class", "image"),
        ("weighted", "ignore", "dense", "vertical", "image"),
        ("none", "ignore", "dense", None, "image"),
        ("weighted", "zero", "structured", "vertical", "image"),
        ("max", "ignore", "structured", "none", "image"),
        ("none", "zero", "dense", "vertical", "centred"),
        ("weighted", "ignore", "structured", "class", "centred"),
        ("none", "zero", "dense", "vertical", "running"),
        ("weighted", "ignore", "structured", "class", "running"),
    ],
)
def test_drawing_every_vertical_gives_the_full_loss_and_its_gradients(mode, unselected, head, variant, norm):
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5])
    t = teachers(unselected)
    full_model, sampled_model = student(head, variant, norm), student(head, variant, norm)
    full = full_loss(full_model, t, weights, mode)
    part = sampled(t, weights, drawn=10, mode=mode, unselected=unselected)(sampled_model, batch())
    assert part.item() == pytest.approx(full.item(), rel=1e-5)
    full.backward()
    part.backward()
    for (name, a), b in zip(full_model.named_parameters(), sampled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(full_model.named_buffers(), sampled_model.buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=name)  # a running normalisation moved alike


@pytest.mark.parametrize(("mode", "unselected"), [("max", "zero"), ("weighted", "zero"), ("weighted", "ignore")])
def test_with_unlabeled_images_drawing_every_vertical_gives_the_full_loss(mode, unselected):
    """Images from index 3 on are unlabeled: their label routed them and is not truth, on both loss paths."""
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5])
    t = teachers(unselected)
    full_model, sampled_model = student("structured", "vertical"), student("structured", "vertical")
    full = full_loss(full_model, t, weights, mode, has_truth=torch.arange(6) < 3)
    part = sampled(t, weights, drawn=10, mode=mode, unselected=unselected, labelled_images=3)(sampled_model, batch())
    assert part.item() == pytest.approx(full.item(), rel=1e-5)
    full.backward()
    part.backward()
    for (name, a), b in zip(full_model.named_parameters(), sampled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["max", "weighted"])
def test_an_unlabeled_image_learns_the_soft_targets_alone(mode):
    """Per image, the loss with truth withheld is mode none's loss, and differs from the loss with truth."""
    weights = torch.ones(4)
    t = teachers("zero")
    model = student("dense", "vertical")
    soft = t(IMAGES, LABELS)
    voc = torch.tensor(TAX.vertical_of_class)
    truth = dense_targets(LABELS, TAX.num_classes)
    with torch.no_grad():
        logits = model(IMAGES)

    def per_image(mode, has_truth=None):
        terms = entry_losses(
            logits,
            soft.values,
            truth,
            weights[voc].unsqueeze(0) * soft.defined,
            mode=mode,
            truth_weight=0.3,
            temperature=2.0,
            has_truth=has_truth,
        )
        return sum(entries.sum(dim=1) for entries in terms.values())

    labelled = (torch.arange(6) < 3).unsqueeze(1)
    mixed, plain, with_truth = per_image(mode, labelled), per_image("none"), per_image(mode)
    torch.testing.assert_close(mixed[3:], plain[3:])  # unlabeled: soft targets only
    torch.testing.assert_close(mixed[:3], with_truth[:3])  # labelled: the truth as before
    assert not torch.allclose(with_truth[3:], plain[3:])  # (which would differ had their labels been truth)


def test_drawing_few_verticals_estimates_the_full_loss_without_bias():
    weights = torch.ones(4)
    t = teachers("zero")
    model = student("dense", "vertical")
    with torch.no_grad():
        full = full_loss(model, t, weights, "none").item()
        loss = sampled(t, weights, drawn=1, mode="none", unselected="zero")
        torch.manual_seed(3)
        draws = torch.tensor([loss(model, batch()).item() for _ in range(400)])
    # Drawing 1 of 4 verticals has only 4 outcomes: the mean over many draws converges to the full loss.
    assert draws.std() > 0.01 * full  # the draws differ ...
    assert draws.mean().item() == pytest.approx(full, rel=0.03)  # ... and average out to the full loss


def test_the_model_computes_only_the_logits_asked_for():
    model = student("dense", "vertical")
    # columns: vertical b whole; blocks in two groups: image 0 over vertical a and image 4 over vertical d (padded
    # to 5); image 2 over vertical c
    columns = torch.tensor([5, 6, 7])
    groups = [
        ClassBlocks(torch.tensor([0, 4]), torch.tensor([[0, 1, 2, 3, 4], [12, 13, -1, -1, -1]])),
        ClassBlocks(torch.tensor([2]), torch.tensor([[8, 9, 10, 11]])),
    ]
    column_logits, (first, second) = model(IMAGES, classes=ClassSubset(columns, groups))
    every = model(IMAGES)
    torch.testing.assert_close(column_logits, every[:, 5:8])
    torch.testing.assert_close(first[0], every[0, 0:5])
    torch.testing.assert_close(first[1, :2], every[4, 12:14])
    assert (first[1, 2:] == 0).all()
    torch.testing.assert_close(second[0], every[2, 8:12])


def test_rows_are_padded_to_their_group_of_similar_verticals_not_to_the_largest():
    sizes = [14362, 897, 5000, 4100, 13000, 1000, 2000]
    groups = width_groups(sizes, max_padding=0.2)
    widest = {g: max(n for n, h in zip(sizes, groups, strict=True) if h == g) for g in groups}
    assert all(n >= 0.8 * widest[g] for n, g in zip(sizes, groups, strict=True))  # no row over 20% padding
    assert groups[0] == groups[4] and groups[2] == groups[3] and groups[1] == groups[5]  # similar sizes share
    assert len(set(groups)) == 4
    # The test taxonomy's 4 verticals of 5, 3, 4 and 2 classes make 3 groups: the loss's rows of vertical d are 2
    # wide, not 5, and every test above that compares the sampled loss to the full one crosses groups.
    assert width_groups(SIZES) == [0, 1, 0, 2]
    loss = sampled(teachers(), torch.ones(4), drawn=0, mode="none", unselected="zero")
    groups = loss._pair_groups(torch.tensor([0, 3, 2, 0, 1]))
    assert [g.tolist() for g in groups] == [[0, 2, 3], [4], [1]]


def test_with_nothing_to_draw_no_column_is_computed():
    # unselected: ignore without the truth's weighting: verticals an image does not select carry no loss at all
    loss = sampled(teachers("ignore"), torch.ones(4), drawn=3, mode="none", unselected="ignore")
    assert loss.drawn == 0
    seen = {}

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images, classes=None):
            seen["columns"] = len(classes.columns)
            return self.inner(images, classes=classes)

    value = loss(Spy(student()), batch())
    assert seen["columns"] == 0 and torch.isfinite(value)


class Interrupt(Exception):
    pass


def test_a_student_on_sampled_verticals_trains_and_resumes_to_the_same_weights(tmp_path, tiny_benchmark):
    run = trained_teachers(tmp_path / "run", tiny_benchmark)
    run.cfg.student.sampled_verticals = 1  # 1 of the 3 verticals drawn per step, besides each image's own
    run.cfg.student.epochs = 2
    straight = train_student(run, progress=False, verbose=False)
    weights = run.dir / "student" / "checkpoints" / "best.safetensors"
    reference = load_file(str(weights))
    assert straight.history[-1]["val_mAP"] > 0
    shutil.rmtree(run.dir / "student")

    def interrupt(step):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_student(run, progress=False, verbose=False, on_step=interrupt)
    train_student(run, progress=False, verbose=False)
    resumed = load_file(str(weights))
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)  # the same draws after resume


@pytest.mark.parametrize("sampled_verticals", [None, 2])
def test_a_student_keeping_the_truth_logs_its_two_loss_terms_apart(tmp_path, tiny_benchmark, sampled_verticals):
    run = trained_teachers(tmp_path / "run", tiny_benchmark)
    run.cfg.student.ground_truth = "weighted"
    run.cfg.student.sampled_verticals = sampled_verticals
    run.cfg.student.epochs = 1
    (entry,) = train_student(run, progress=False, verbose=False).history
    assert entry["train_loss_distillation"] > 0 and entry["train_loss_ground_truth"] > 0
    assert entry["train_loss_distillation"] + entry["train_loss_ground_truth"] == pytest.approx(entry["train_loss"])
