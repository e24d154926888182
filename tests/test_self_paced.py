"""Self-paced output scales: y_v = gamma_v * x_v / ||x_v|| per vertical, batched."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import tiny_config
from kc.config import TrainConfig, config_from_dict
from kc.data.dataset import ImageDataset, collate, dense_targets
from kc.models.self_paced import SelfPacedScales
from kc.run import prepare_run
from kc.stages import CONTROL, STUDENT
from kc.train.common import block_norms, start_from_generalist
from kc.train.generalist import train_generalist
from kc.train.trainer import Trainer

VOC = [0, 0, 0, 1, 1, 2, 2, 2, 2]  # verticals of 3, 2 and 4 classes


def blocks(x):
    return [x[:, 0:3], x[:, 3:5], x[:, 5:9]]


def test_init_is_sqrt_of_vertical_size_and_class_variant_has_one_scale_per_class():
    vertical = SelfPacedScales(VOC, "vertical")
    assert vertical.gamma.tolist() == pytest.approx([math.sqrt(3), math.sqrt(2), math.sqrt(4)])
    assert isinstance(vertical.gamma, nn.Parameter)
    per_class = SelfPacedScales(VOC, "class")
    assert per_class.gamma.shape == (9,)
    assert per_class.gamma.tolist() == pytest.approx([math.sqrt(3)] * 3 + [math.sqrt(2)] * 2 + [2.0] * 4)
    fixed = SelfPacedScales(VOC, "fixed")
    assert not any(True for _ in fixed.parameters()) and "gamma" in dict(fixed.named_buffers())
    assert SelfPacedScales(VOC, "vertical", init=10.0).gamma.tolist() == [10.0, 10.0, 10.0]
    torch.manual_seed(0)
    noisy = SelfPacedScales(VOC, "vertical", init_noise=1e-3).gamma
    assert (noisy - vertical.gamma).abs().max() < 1e-2 and not torch.equal(noisy, vertical.gamma)
    with pytest.raises(ValueError, match="not one of"):
        SelfPacedScales(VOC, "global")


def test_each_vertical_block_has_norm_gamma_and_ignores_the_scale_of_its_logits():
    layer = SelfPacedScales(VOC, "vertical")
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor([0.5, 2.0, 3.0]))
    x = torch.randn(4, 9)
    y = layer(x)
    for block, g in zip(blocks(y), [0.5, 2.0, 3.0], strict=True):
        torch.testing.assert_close(block.norm(dim=1), torch.full((4,), g))
    rescaled = x.clone()
    rescaled[:, 3:5] *= 7.0  # rescaling one vertical's logits changes nothing
    torch.testing.assert_close(layer(rescaled), y)
    assert torch.equal(SelfPacedScales(VOC, "none")(x), x)


@pytest.mark.parametrize("variant", ["vertical", "class", "fixed"])
def test_batched_layer_equals_a_per_vertical_loop(variant):
    torch.manual_seed(0)
    layer = SelfPacedScales(VOC, variant, init_noise=0.1)
    x = torch.randn(5, 9)
    scale = layer.per_class_scale()
    expected = torch.cat([b / b.norm(dim=1, keepdim=True) for b in blocks(x)], dim=1) * scale
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("variant", ["vertical", "class"])
def test_centred_layer_equals_a_per_vertical_loop(variant):
    torch.manual_seed(0)
    layer = SelfPacedScales(VOC, variant, init_noise=0.1, centred=True)
    x = torch.randn(5, 9) - 4.0
    scale = layer.per_class_scale()
    parts = []
    for a, b in ((0, 3), (3, 5), (5, 9)):
        m = x[:, a:b].mean(dim=1, keepdim=True)
        parts.append(m + (x[:, a:b] - m) / (x[:, a:b] - m).norm(dim=1, keepdim=True) * scale[a:b])
    torch.testing.assert_close(layer(x), torch.cat(parts, dim=1))
    # the block form (padded rows of one vertical each) gives the same values
    rows = torch.tensor([[0, 1, 2, 0], [3, 4, 0, 0], [5, 6, 7, 8]])
    padded = torch.stack([torch.cat([x[1, r[:n]], torch.zeros(4 - n)]) for r, n in zip(rows, (3, 2, 4), strict=True)])
    blocks_out = layer.scale_blocks(padded, rows)
    expected = layer(x)[1]
    for row, (r, n) in enumerate(zip(rows, (3, 2, 4), strict=True)):
        torch.testing.assert_close(blocks_out[row, :n], expected[r[:n]])
        assert (blocks_out[row, n:] == 0).all()


@pytest.mark.parametrize("centred", [False, True])
def test_a_row_major_loss_gradient_reaches_class_major_logits_contiguous_and_exact(centred):
    # the structured heads hand over the transpose of (classes, B) logits; a loss's gradient comes back (B, classes)
    torch.manual_seed(0)
    layer = SelfPacedScales(VOC, "vertical", init_noise=0.1, centred=centred)
    class_major = (torch.randn(9, 5) - 4.0).requires_grad_()
    arriving = []  # the gradient as the backward computes it (.grad itself is always made contiguous)
    class_major.register_hook(arriving.append)
    upstream = torch.randn(5, 9)
    layer(class_major.t()).backward(upstream)
    assert arriving[0].is_contiguous()  # strided, every elementwise op of the backward ran 3x slower
    reference = class_major.detach().t().clone().requires_grad_()
    layer.eval()  # the same formula without the copy into class-major order
    layer(reference).backward(upstream)
    torch.testing.assert_close(class_major.grad, reference.grad.t())


def test_running_norms_divide_every_image_alike_and_follow_the_training_batches():
    torch.manual_seed(0)
    layer = SelfPacedScales(VOC, "vertical", init=torch.tensor([2.0, 3.0, 4.0]), running=True, momentum=0.5)
    torch.testing.assert_close(layer.running_norm, torch.tensor([2.0, 3.0, 4.0]))  # started where the scales are
    x = torch.randn(6, 9) * 5.0 - 3.0
    layer.eval()
    torch.testing.assert_close(layer(x), x)  # gamma = r: the input unchanged, the generalist's function kept
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor([1.0, 6.0, 2.0]))
    y = layer(x)
    torch.testing.assert_close(y, x * torch.tensor([0.5] * 3 + [2.0] * 2 + [0.5] * 4))  # one factor per vertical
    assert torch.equal(y.argsort(dim=0), x.argsort(dim=0))  # every class ranks the images as before: AP unchanged
    torch.testing.assert_close(layer.running_norm, torch.tensor([2.0, 3.0, 4.0]))  # eval moves nothing
    layer.train()
    target = torch.stack([b.norm(dim=1).mean() for b in blocks(x)])
    for _ in range(30):
        layer(x)
    torch.testing.assert_close(layer.running_norm, target)  # training moves it to the batches' mean block norm
    torch.testing.assert_close(
        layer(x), x / target.repeat_interleave(torch.tensor([3, 2, 4])) * layer.per_class_scale()
    )
    with pytest.raises(ValueError, match="choose one"):
        SelfPacedScales(VOC, "vertical", centred=True, running=True)


def test_centred_scales_keep_the_ranking_across_verticals_that_the_papers_lose():
    """A planted prior-biased generalist: an image's own vertical's block sits at level -7 (its true class 3
    higher), every other block at -11 with a wider shape. Ranked by the raw logits, positives come first. The
    paper's normalisation divides each block's level out, so an absent block's highest entries rise to the
    positives' height; the centred one keeps the level. Both start at the generalist's median block norms."""
    from kc.evaluate.metrics import average_precision

    torch.manual_seed(0)
    voc = [v for v in range(4) for _ in range(5)]
    n = 400
    vertical = torch.arange(n) % 4
    truth = torch.zeros(n, 20)
    truth[torch.arange(n), vertical * 5 + torch.randint(0, 5, (n,))] = 1
    own = torch.tensor(voc)[None, :] == vertical[:, None]
    logits = torch.where(own, -7.0 + 0.5 * torch.randn(n, 20), -11.0 + 2.0 * torch.randn(n, 20)) + 3.0 * truth

    def val_map(scores):
        return 100 * float(average_precision(torch.sigmoid(scores).numpy(), truth.numpy()).mean())

    def at_generalist_norms(centred):
        x = logits - logits.view(n, 4, 5).mean(2).repeat_interleave(5, 1) if centred else logits
        return SelfPacedScales(voc, "vertical", init=x.view(n, 4, 5).norm(dim=2).median(dim=0).values, centred=centred)

    generalist = val_map(logits)
    with torch.no_grad():
        centred, paper = val_map(at_generalist_norms(True)(logits)), val_map(at_generalist_norms(False)(logits))
    assert centred > generalist - 1.0, (centred, generalist)
    assert paper < generalist - 10.0, (paper, generalist)


def test_gamma_receives_gradient_and_changes_under_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), SelfPacedScales(VOC, "vertical"))
    start = model[1].gamma.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(32, 6), (torch.rand(32, 9) < 0.2).float()
    for _ in range(5):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        assert model[1].gamma.grad is not None and (model[1].gamma.grad != 0).all()
        optimizer.step()
    assert not torch.equal(model[1].gamma, start)


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(40, 6, generator=g)
        self.y = torch.randint(0, 9, (40,), generator=g)

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return self.x[i], self.y[i : i + 1], i


class Crash(Exception):
    pass


@pytest.mark.parametrize("norm", ["image", "centred", "running"])
def test_scales_survive_checkpoint_and_resume(tmp_path, norm):
    def make():
        torch.manual_seed(0)
        kind = {"centred": norm == "centred", "running": norm == "running"}
        return nn.Sequential(nn.Linear(6, 9), SelfPacedScales(VOC, "vertical", **kind))

    def loss(model, batch):
        logits = model(batch["images"])
        target = torch.zeros_like(logits).scatter_(1, batch["labels"], 1.0)
        return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(logits)

    cfg = TrainConfig(epochs=2, batch_size=8, checkpoint_every_steps=3, optimizer={"name": "adamw", "lr": 0.05})

    def fit(name, on_step=None):
        model = make()
        Trainer(
            model,
            cfg,
            tmp_path / name,
            Data(),
            loss,
            seed=0,
            progress=False,
            verbose=False,
            on_step=on_step,
            scalars=lambda m: {"gamma/v0": float(m[1].gamma[0].detach())},
        ).fit()
        return model

    straight = fit("a")

    def crash(step):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        fit("b", crash)
    resumed = fit("b")
    assert torch.equal(straight[1].gamma, resumed[1].gamma)
    assert not torch.equal(straight[1].gamma, make()[1].gamma)  # it did train
    for a, b in zip(straight[1].buffers(), resumed[1].buffers(), strict=True):
        assert torch.equal(a, b)  # a running norm resumes where it was
    history = json.loads((tmp_path / "b" / "checkpoints" / "last.json").read_text())["history"]
    assert [round(h["gamma/v0"], 6) for h in history][-1] == round(float(resumed[1].gamma[0].detach()), 6)


def test_scales_started_from_the_generalist_keep_its_outputs(tmp_path, tiny_benchmark):
    """init 'generalist': each vertical's scale starts at the median norm of the generalist's logit blocks, so the
    student starts near the generalist's function; sqrt(N_v) is far from it once logits carry the prior bias."""
    cfg = tiny_config(tiny_benchmark, tmp_path / "run", epochs=1)
    cfg["model"]["head"]["output_bias"] = "prior"
    run = prepare_run(config_from_dict(cfg), progress=False)
    train_generalist(run, progress=False, verbose=False)
    generalist = start_from_generalist(run, CONTROL).eval()
    batch = next(
        iter(
            DataLoader(
                ImageDataset(run.splits["train"], run.image_root, run.cfg.data, train=False), 64, collate_fn=collate
            )
        )
    )
    targets = dense_targets(batch["labels"], run.taxonomy.num_classes)

    def start(init):
        run.cfg.student.self_paced.init = init
        student = start_from_generalist(run, STUDENT).eval()
        with torch.no_grad():
            return student, nn.functional.binary_cross_entropy_with_logits(student(batch["images"]), targets)

    with torch.no_grad():
        reference = nn.functional.binary_cross_entropy_with_logits(generalist(batch["images"]), targets)
    measured, from_generalist = start("generalist")
    torch.testing.assert_close(measured.output_scales.gamma, block_norms(run, generalist))
    sizes = torch.tensor([run.taxonomy.vertical_size(v) for v in range(run.taxonomy.num_verticals)])
    assert (measured.output_scales.gamma > 2 * sizes.sqrt()).all()  # prior-biased logits: norms far above sqrt(N_v)
    _, from_sqrt = start("sqrt")
    assert abs(from_generalist - reference) < 0.2 * abs(from_sqrt - reference)
    # running norms start at the measured block norms whatever gamma's start: with init 'generalist' the student
    # is the generalist itself (each block divided and multiplied by the same norm), with 'sqrt' the paper's scale
    run.cfg.student.self_paced.running = True
    same, _ = start("generalist")
    torch.testing.assert_close(same.output_scales.running_norm, block_norms(run, generalist))
    with torch.no_grad():
        torch.testing.assert_close(same(batch["images"]), generalist(batch["images"]), rtol=1e-5, atol=1e-4)
    paper_scale, _ = start("sqrt")
    torch.testing.assert_close(paper_scale.output_scales.running_norm, block_norms(run, generalist))
    torch.testing.assert_close(paper_scale.output_scales.gamma, sizes.sqrt().float())
