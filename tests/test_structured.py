"""Structurally connected heads: block structure, batched = naive, parameter formulas, start from the generalist."""

import random

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import kc.models.heads
from conftest import tiny_config
from kc.cli import app
from kc.config import config_from_dict
from kc.errors import ConfigError
from kc.models.accounting import parameter_accounting
from kc.models.classifier import Classifier, count_parameters
from kc.models.heads import ClassBlocks, DenseHead, widened
from kc.models.self_paced import SelfPacedScales
from kc.models.structured import StructuredHead, VerticalBlocks, head_name, head_weight_formula, plan_buckets
from kc.pipeline import run_pipeline
from kc.run import prepare_run
from kc.stages import CONTROL, GENERALIST, STUDENT, load_stage, new_generalist_model, new_model
from kc.train.common import start_from_generalist
from kc.train.trainer import fingerprint_data

SIZES = [5, 1, 12, 3, 3, 7]  # verticals of very different sizes
N, S_B, S1, S2 = sum(SIZES), 10, 16, 8
STARTS = [sum(SIZES[:v]) for v in range(len(SIZES))]


def weights_only(module):
    return sum(p.numel() for name, p in module.named_parameters() if "bias" not in name)


def test_buckets_cover_every_vertical_once_and_bound_the_padding():
    rng = random.Random(0)
    sizes = [rng.choice([1, 2, 3, 50, 51, 400, 1000]) for _ in range(300)]
    buckets = plan_buckets(sizes, 0.25)
    assert sorted(v for b in buckets for v in b) == list(range(300))
    for bucket in buckets:
        padded = max(sizes[v] for v in bucket) * len(bucket)
        assert sum(sizes[v] for v in bucket) >= 0.75 * padded
    assert len(buckets) <= 12  # a few bmm calls, not 300
    assert len(plan_buckets([4] * 50, 0.0)) == 1


@pytest.mark.parametrize("own_matmul", [512, 6, 1])  # all bucketed; the two largest on their own; none bucketed
def test_batched_block_product_equals_the_per_vertical_loop_forward_and_backward(own_matmul):
    torch.manual_seed(0)
    blocks = VerticalBlocks(SIZES, own_matmul=own_matmul)
    assert len(blocks.large) == {512: 0, 6: 2, 1: 6}[own_matmul]
    assert len(blocks.buckets) + len(blocks.large) < len(SIZES) or own_matmul == 1
    hidden = torch.randn(len(SIZES), 6, 4, requires_grad=True)  # (verticals, k, batch)
    weight = torch.randn(N, 6, requires_grad=True)
    batched = blocks(hidden, weight)
    naive = blocks.loop(hidden, weight)
    torch.testing.assert_close(batched, naive)
    grads = torch.autograd.grad(batched.square().sum(), [hidden, weight])
    expected = torch.autograd.grad(naive.square().sum(), [hidden, weight])
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shared_units", [0, 3])
def test_fc_sc_logits_of_a_vertical_get_no_gradient_from_other_verticals_private_blocks(shared_units):
    torch.manual_seed(0)
    head = StructuredHead(S_B, [S1, S2], SIZES, "fc-sc", shared_units)
    k = S2 - shared_units
    for v, (start, size) in enumerate(zip(STARTS, SIZES, strict=True)):
        head.zero_grad()
        head(torch.randn(3, S_B))[:, start : start + size].sum().backward()
        block_grad = head.private.weight.grad.view(len(SIZES), k, -1).abs().sum(dim=(1, 2))
        assert block_grad[v] > 0
        assert torch.all(block_grad[torch.arange(len(SIZES)) != v] == 0)
        out_grad = head.out_private_weight.grad.abs().sum(dim=1)
        assert torch.all(out_grad[:start] == 0) and torch.all(out_grad[start + size :] == 0)
        if shared_units:
            assert head.shared.weight.grad.abs().sum() > 0  # shared units feed every vertical


def test_sc_sc_blocks_are_private_in_both_layers():
    torch.manual_seed(0)
    head = StructuredHead(S_B, [S1, S2], SIZES, "sc-sc")
    v, start = 2, STARTS[2]
    head(torch.randn(3, S_B))[:, start : start + SIZES[v]].sum().backward()
    first = head.sc1.weight.grad.view(len(SIZES), S1, S_B).abs().sum(dim=(1, 2))
    second = head.sc2_weight.grad.abs().sum(dim=(1, 2))
    others = torch.arange(len(SIZES)) != v
    assert first[v] > 0 and second[v] > 0
    assert torch.all(first[others] == 0) and torch.all(second[others] == 0)


@pytest.mark.parametrize(
    ("structure", "x", "formula"),
    [
        ("fc-sc", 0, S_B * S1 + len(SIZES) * S1 * S2 + S2 * N),
        ("fc-sc", 3, S_B * S1 + S1 * 3 + len(SIZES) * S1 * (S2 - 3) + S2 * N),
        ("sc-sc", 0, S_B * S1 * len(SIZES) + len(SIZES) * S1 * S2 + S2 * N),
    ],
)
def test_parameter_counts_equal_the_papers_formulas(structure, x, formula):
    head = StructuredHead(S_B, [S1, S2], SIZES, structure, x)
    assert weights_only(head) == formula == head_weight_formula(structure, S_B, [S1, S2], len(SIZES), N, x)
    assert weights_only(DenseHead(S_B, [S1, S2], N)) == S_B * S1 + S1 * S2 + S2 * N
    assert head_weight_formula("fc-fc", S_B, [S1, S2], len(SIZES), N) == S_B * S1 + S1 * S2 + S2 * N
    # a leading dense layer is shared and counted once, as in the dense head
    deeper = StructuredHead(S_B, [12, S1, S2], SIZES, structure, x)
    assert weights_only(deeper) == head_weight_formula(structure, S_B, [12, S1, S2], len(SIZES), N, x)


def test_fc_sc_with_every_unit_shared_is_fc_fc_in_function_and_parameter_count():
    torch.manual_seed(0)
    dense = DenseHead(S_B, [S1, S2], N)
    shared_all = StructuredHead(S_B, [S1, S2], SIZES, "fc-sc", shared_units=S2).copy_from_dense(dense)
    assert count_parameters(shared_all) == count_parameters(dense)
    assert weights_only(shared_all) == weights_only(dense)
    features = torch.randn(5, S_B)
    torch.testing.assert_close(shared_all(features), dense(features), rtol=0, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize(
    ("structure", "x", "hidden"), [("fc-sc", 0, [S1, S2]), ("fc-sc", 5, [S1, S2]), ("sc-sc", 0, [12, S1, S2])]
)
def test_a_head_copied_from_a_dense_head_computes_the_same_function(structure, x, hidden, activation):
    torch.manual_seed(0)
    dense = DenseHead(S_B, hidden, N, activation=activation)
    head = StructuredHead(S_B, hidden, SIZES, structure, x, activation=activation).copy_from_dense(dense)
    features = torch.randn(7, S_B)
    torch.testing.assert_close(head(features), dense(features), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="widths and classes must match"):
        StructuredHead(S_B, hidden, SIZES, structure, x).copy_from_dense(DenseHead(S_B, [S1, S2 + 1], N))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("structure", ["fc-fc", "fc-sc", "sc-sc"])
def test_a_widened_head_starts_as_the_narrow_one_and_its_added_units_learn(structure, activation):
    torch.manual_seed(0)
    dense = DenseHead(S_B, [S1, S2], N, activation=activation)
    wide = widened(dense, [S1 + 8, S2 + 3])
    head = (
        wide if structure == "fc-fc" else StructuredHead(S_B, [S1 + 8, S2 + 3], SIZES, structure, activation=activation)
    )
    if structure != "fc-fc":
        head.copy_from_dense(wide)
    features = torch.randn(9, S_B)
    logits = head(features)
    torch.testing.assert_close(logits, dense(features), rtol=1e-5, atol=1e-5)
    logits.square().sum().backward()
    # the output weights reading the last layer's added units: zero at the start, a gradient at once
    out = head.out.weight if structure == "fc-fc" else head.out_private_weight
    assert out[:, S2:].abs().max() == 0 and out.grad[:, S2:].abs().sum() > 0
    with pytest.raises(ValueError, match="each at least as wide"):
        widened(dense, [S1 - 1, S2])
    with pytest.raises(ValueError, match="as many layers"):
        widened(dense, [S1, S2, 4])


@pytest.mark.parametrize("structure", ["fc-sc", "sc-sc"])
def test_a_leaky_unit_negative_for_every_input_still_learns_where_a_relu_unit_is_dead(structure):
    features = torch.randn(32, S_B)
    grads = {}
    for activation in ("relu", "leaky_relu"):
        torch.manual_seed(0)
        dense = DenseHead(S_B, [S1, S2], N, activation=activation)
        with torch.no_grad():
            dense.hidden[2].bias[0] = -1e3  # the last hidden layer's first unit: negative for every input
        head = StructuredHead(S_B, [S1, S2], SIZES, structure, activation=activation).copy_from_dense(dense)
        head(features).square().sum().backward()
        # the incoming weights of every vertical's copy of that unit: (verticals, inputs)
        layer = head.sc2_weight if structure == "sc-sc" else head.private.weight
        grads[activation] = layer.grad.view(len(SIZES), S2, -1)[:, 0]
    assert grads["relu"].abs().max() == 0  # dead: no gradient reaches it, so it can never come back
    assert grads["leaky_relu"].abs().min() > 0  # every vertical's copy of the unit still gets a gradient


def test_sc_sc_started_from_specialists_computes_each_specialists_head_on_its_vertical():
    torch.manual_seed(0)
    dense = DenseHead(S_B, [S1, S2], N)
    specialists = [DenseHead(S_B, [S1, S2], n + 1) for n in SIZES]  # with an 'other' output, dropped
    head = StructuredHead(S_B, [S1, S2], SIZES, "sc-sc").copy_from_dense(dense).copy_from_specialists(specialists)
    features = torch.randn(6, S_B)
    logits = head(features)
    for (start, n), specialist in zip(zip(STARTS, SIZES, strict=True), specialists, strict=True):
        torch.testing.assert_close(logits[:, start : start + n], specialist(features)[:, :n], rtol=1e-5, atol=1e-5)
    fc_sc = StructuredHead(S_B, [S1, S2], SIZES, "fc-sc", 2).copy_from_dense(dense).copy_from_specialists(specialists)
    assert torch.equal(fc_sc.out_bias[STARTS[2] : STARTS[2] + 12], specialists[2].out.bias[:12])
    assert torch.equal(fc_sc.shared.weight, dense.hidden[2].weight[:2])  # shared units stay the generalist's


def test_head_names_follow_the_paper():
    assert head_name("fc-fc", [4096, 512]) == "FC4096-FC512"
    assert head_name("fc-sc", [4096, 512]) == "FC4096-SC512"
    assert head_name("sc-sc", [4096, 512]) == "SC4096-SC512"
    assert head_name("fc-sc", [4096, 512], 128) == "FC4096-SC512(x=128)"


def test_config_rejects_structures_the_hidden_widths_cannot_hold(tmp_path, tiny_benchmark):
    data = tiny_config(tiny_benchmark, tmp_path)
    data["model"]["head"]["hidden"] = [32]
    data["student"] = {"head": {"structure": "sc-sc"}}
    with pytest.raises(ConfigError, match="needs at least 2 widths"):
        config_from_dict(data)
    data["student"] = {"head": {"structure": "fc-sc", "shared_units": 33}}
    with pytest.raises(ConfigError, match="exceeds the block width 32"):
        config_from_dict(data)
    for widths in ([16], [32, 8], [64, 64]):
        data["student"] = {"head": {"structure": "fc-fc", "hidden": widths}}
        with pytest.raises(ConfigError, match="each at least as wide"):
            config_from_dict(data)
    data["student"] = {"head": {"structure": "fc-sc", "hidden": [64], "shared_units": 40}}
    assert config_from_dict(data).student.head.hidden == [64]  # the block is the student's own width
    data["student"] = {"head": {"structure": "fc-sc", "hidden": [64], "init": "specialists"}}
    with pytest.raises(ConfigError, match="remove student.head.hidden or set init: generalist"):
        config_from_dict(data)


def test_the_head_activation_reaches_every_stage_and_leaves_earlier_runs_fingerprints_alone(tmp_path, tiny_benchmark):
    data = tiny_config(tiny_benchmark, tmp_path / "run")
    data["student"] = {"head": {"structure": "sc-sc"}}
    before = fingerprint_data(config_from_dict(data).model_dump(mode="json"))
    assert "activation" not in before["model"]["head"]  # the default: as every run trained before the key
    data["model"]["head"]["activation"] = "leaky_relu"
    run = prepare_run(config_from_dict(data), progress=False)
    assert fingerprint_data(run.cfg.model_dump(mode="json"))["model"]["head"]["activation"] == "leaky_relu"
    for model in (new_generalist_model(run), new_model(run, STUDENT), new_model(run, CONTROL)):
        kinds = {type(m) for m in model.head.modules()}
        assert torch.nn.LeakyReLU in kinds and torch.nn.ReLU not in kinds


def test_structured_wider_student_and_control_start_as_the_generalist_and_train(tmp_path, tiny_benchmark):
    data = tiny_config(tiny_benchmark, tmp_path / "run")
    epochs = {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "checkpoint_every_steps": 4}
    data["specialists"] = dict(epochs)
    head = {"structure": "fc-sc", "shared_units": 4, "hidden": [40, 20]}  # wider than the generalist's [32, 16]
    data["student"] = {**epochs, "head": head, "self_paced": {"variant": "none"}}
    data["controls"] = {"kinds": ["same_compute"]}
    run = prepare_run(config_from_dict(data), progress=False)
    result = run_pipeline(run, progress=False, verbose=False)

    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run)).eval()
    images = torch.randn(4, 3, 16, 16)
    for stage in (STUDENT, CONTROL):
        start = start_from_generalist(run, stage).eval()
        assert isinstance(start.head, StructuredHead)
        with torch.no_grad():
            torch.testing.assert_close(start(images), generalist(images), rtol=1e-5, atol=1e-5)
        trained = load_file(str(run.stage_dir(stage) / "checkpoints" / "best.safetensors"))
        assert trained["head.private.weight"].shape == (3 * (20 - 4), 40)
        assert not torch.equal(trained["head.out_private_weight"], start.head.out_private_weight.detach())
    params = {m["model"]: m["parameters"] for m in result["models"]}
    assert params["student"] == params["control: same compute"] > params["generalist"]

    # parameter accounting (kc describe, the report) counts what the stages build
    totals = {r["model"]: r["total"] for r in parameter_accounting(run.cfg, run.taxonomy)["models"]}
    for stage in (GENERALIST, STUDENT, CONTROL):
        assert totals[stage] == count_parameters(new_model(run, stage))
    assert "| control | FC40-SC20(x=4) |" in (run.dir / "report.md").read_text()


def test_describe_command_needs_no_run(tmp_path, tiny_benchmark):
    data = tiny_config(tiny_benchmark, tmp_path / "never_made")
    data["student"] = {"head": {"structure": "sc-sc"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    out = CliRunner().invoke(app, ["describe", str(path)])
    assert out.exit_code == 0, out.output
    assert "| student | SC32-SC16 |" in out.output and "| FC32-SC16(x=8) |" in out.output
    assert not (tmp_path / "never_made").exists()


def subset_heads():
    return [
        DenseHead(S_B, [S1, S2], N),
        StructuredHead(S_B, [S1, S2], SIZES, "fc-sc"),
        StructuredHead(S_B, [S1, S2], SIZES, "fc-sc", shared_units=3),
        StructuredHead(S_B, [S1, S2], SIZES, "sc-sc"),
    ]


@pytest.mark.parametrize(
    ("index", "own_matmul"),
    [(0, 512), (0, 1), (1, 512), (2, 512), (3, 512)],
    ids=["fc-fc", "fc-fc, a matmul per vertical", "fc-sc", "fc-sc(x=3)", "sc-sc"],
)
def test_the_logits_of_a_subset_of_classes_equal_those_of_every_class_forward_and_backward(
    index, own_matmul, monkeypatch
):
    # own_matmul 1: rows of any width take the dense head's path for wide verticals (one matmul per vertical)
    monkeypatch.setattr(kc.models.heads, "OWN_MATMUL_CLASSES", own_matmul)
    torch.manual_seed(0)
    head = subset_heads()[index]
    features = torch.randn(5, S_B)
    # columns across verticals, out of order; rows: image 3 over vertical 2 (12 classes), image 0 over vertical 0,
    # image 3 over vertical 5, each padded to 12 with -1 (padding's logits are dropped)
    columns = torch.tensor([20, 0, 6, 1, 17, 5])
    rows = torch.tensor([3, 0, 3])
    blocks = torch.tensor([list(range(6, 18)), list(range(0, 5)) + [-1] * 7, list(range(24, 31)) + [-1] * 5])
    real = torch.tensor([[True] * 12, [True] * 5 + [False] * 7, [True] * 7 + [False] * 5])

    def subset_loss():
        column_logits, (block_logits,) = head.subset_logits(features, columns, [ClassBlocks(rows, blocks)])
        return column_logits, block_logits, column_logits.square().sum() + block_logits[real].square().sum()

    def full_loss():
        every = head(features)
        column_logits, block_logits = every[:, columns], every[rows.unsqueeze(1), blocks]
        return column_logits, block_logits, column_logits.square().sum() + block_logits[real].square().sum()

    params = list(head.parameters())
    *logits, loss = subset_loss()
    *expected, expected_loss = full_loss()
    torch.testing.assert_close(logits[0], expected[0])
    torch.testing.assert_close(logits[1][real], expected[1][real])
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected_loss, params), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(head.class_logits(features, columns), expected[0])


@pytest.mark.parametrize("variant", ["none", "vertical"])
def test_a_sampled_loss_computes_every_class_only_where_scales_need_whole_blocks(variant, monkeypatch):
    torch.manual_seed(0)
    head = StructuredHead(S_B, [S1, S2], SIZES, "sc-sc")
    vertical_of_class = [v for v, size in enumerate(SIZES) for _ in range(size)]
    model = Classifier(torch.nn.Identity(), head, SelfPacedScales(vertical_of_class, variant))
    features, classes = torch.randn(4, S_B), torch.tensor([3, 20, 9])
    expected = model(features)[:, classes]
    calls = []
    full_forward = StructuredHead.forward
    monkeypatch.setattr(StructuredHead, "forward", lambda self, x: calls.append(1) or full_forward(self, x))
    torch.testing.assert_close(model(features, classes=classes), expected)
    # scales of variant none leave the logits alone: the subset's alone are computed; real scales need all
    assert len(calls) == (0 if variant == "none" else 1)
