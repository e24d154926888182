"""The one trainer: resume equivalence, atomic checkpoints, skipping finished stages, refusing changed inputs."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kc import checkpoint as ckpt_module
from kc.config import TrainConfig
from kc.errors import CheckpointError
from kc.train.trainer import Trainer, TrainingDiverged, learning_rate


class Blobs(torch.utils.data.Dataset):
    """A deterministic toy dataset in the shape the trainer expects (images, label indices, index)."""

    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x += self.y.view(-1, 1, 1, 1).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i : i + 1], i


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch["images"]), batch["labels"][:, 0])


def cfg(**kw):
    base = {
        "epochs": 3,
        "batch_size": 8,
        "checkpoint_every_steps": 4,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
    }
    return TrainConfig.model_validate({**base, **kw})


def fit(tmp_path, name, on_step=None, model=None, config=None, validate=None):
    model = model or make_model()
    trainer = Trainer(
        model,
        config or cfg(),
        tmp_path / name,
        Blobs(),
        loss_fn,
        validate,
        seed=1,
        progress=False,
        verbose=False,
        on_step=on_step,
    )
    return model, trainer.fit()


class Crash(Exception):
    pass


def crash_after(n):
    def on_step(step):
        if step == n:
            raise Crash

    return on_step


@pytest.mark.parametrize("crash_at", [4, 9, 12])  # on a checkpoint; between checkpoints (replays from 8); epoch end
def test_resumed_run_ends_with_the_same_weights(tmp_path, crash_at):
    reference, _ = fit(tmp_path, "straight")
    with pytest.raises(Crash):
        fit(tmp_path, "interrupted", on_step=crash_after(crash_at))
    resumed, result = fit(tmp_path, "interrupted")
    assert result.resumed_from_step == crash_at // 4 * 4
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert len(result.history) == 3


def test_finished_stage_is_skipped_and_changed_config_refused(tmp_path):
    _, first = fit(tmp_path, "s")
    calls = []
    _, again = fit(tmp_path, "s", on_step=calls.append)
    assert calls == [] and again.history == first.history
    with pytest.raises(CheckpointError, match="different config"):
        fit(tmp_path, "s", config=cfg(epochs=4))


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    with pytest.raises(Crash):
        fit(tmp_path, "s", on_step=crash_after(5))
    ckpt_dir = tmp_path / "s" / "checkpoints"
    before = (ckpt_dir / "last.json").read_text()
    real_save = ckpt_module.save_file

    def half_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        fit(tmp_path, "s")  # resumes at step 4; its next weights write fails half-way
    monkeypatch.setattr(ckpt_module, "save_file", real_save)
    assert (ckpt_dir / "last.json").read_text() == before
    assert not list(ckpt_dir.glob("*.tmp"))  # no temp files left behind
    model, result = fit(tmp_path, "s")  # resumes from the intact step-4 checkpoint and finishes
    assert result.resumed_from_step == 4
    reference, _ = fit(tmp_path, "reference")
    assert all(
        torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_best_checkpoint_follows_validation_metric(tmp_path):
    scores = iter([0.2, 0.9, 0.5])
    _, result = fit(tmp_path, "s", validate=lambda m: {"mAP": next(scores)})
    assert result.best_epoch == 2 and result.best_metric == 0.9
    assert [h["val_mAP"] for h in result.history] == [0.2, 0.9, 0.5]
    assert set(load_file(str(result.best_weights))) == set(make_model().state_dict())


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    def nan_loss(model, batch):
        return model(batch["images"]).sum() * float("nan")

    trainer = Trainer(make_model(), cfg(), tmp_path / "s", Blobs(), nan_loss, seed=0, progress=False, verbose=False)
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        trainer.fit()


def test_learning_rate_schedule():
    c = cfg(epochs=10)
    assert learning_rate(c, 0, 10) == pytest.approx(0.01 / 5)  # warmup: 5 steps
    assert learning_rate(c, 4, 10) == pytest.approx(0.01)
    assert learning_rate(c, 99, 10) < 1e-4
    assert learning_rate(cfg(schedule={"name": "step", "step_epochs": 2, "step_gamma": 0.5}), 45, 10) == pytest.approx(
        0.0025
    )
    tiny_warmup = cfg(schedule={"warmup_epochs": 0.5})
    assert learning_rate(tiny_warmup, 0, 1) == pytest.approx(0.01)  # never above the base LR


def test_lr_multiplier_gives_named_parameters_their_own_learning_rate(tmp_path):
    from kc.models.self_paced import SelfPacedScales
    from kc.train.trainer import make_optimizer

    model = nn.Sequential(nn.Linear(4, 3), SelfPacedScales([0, 0, 1], "vertical"))
    optimizer = make_optimizer(model, cfg(), {"1.": 100.0})
    by_scale = {g["lr_scale"]: g for g in optimizer.param_groups}
    assert [p.shape for p in by_scale[100.0]["params"]] == [torch.Size([2])]  # only the scales
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 3
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups if g["lr_scale"] == 100.0)


def test_sampled_negatives_loss_estimates_the_full_loss_and_touches_only_drawn_classes():
    from kc.models.classifier import Classifier
    from kc.models.heads import DenseHead
    from kc.train.common import ground_truth_loss

    torch.manual_seed(0)
    C = 40
    model = Classifier(nn.Flatten(), DenseHead(12, [8], C))
    labels = torch.tensor([[1, 5], [2, -1], [1, -1], [7, 9], [5, -1], [3, -1]])  # 6 positive classes, -1 = padding
    batch = {"images": torch.randn(6, 3, 2, 2), "labels": labels}
    full = ground_truth_loss("bce", C)(model, batch)
    # drawing every other class is the full loss
    torch.testing.assert_close(ground_truth_loss("bce", C, sampled_negatives=C)(model, batch), full)
    # drawing 5 of the 33 others: unbiased on average
    sampled = ground_truth_loss("bce", C, sampled_negatives=5)
    mean = torch.stack([sampled(model, batch).detach() for _ in range(3000)]).mean()
    assert abs(mean.item() - full.item()) < 0.02 * full.item()
    # gradients reach the positive and drawn classes' output rows only
    model.zero_grad()
    sampled(model, batch).backward()
    touched = (model.head.out.weight.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert len(touched) == 6 + 5 and {1, 2, 3, 5, 7, 9} <= set(touched)


def test_sampled_negatives_need_the_bce_loss():
    from kc.config import GeneralistConfig

    with pytest.raises(ValueError, match="bce only"):
        GeneralistConfig(loss="softmax", sampled_negatives=10)


def test_a_loss_given_as_named_terms_trains_on_their_sum_and_logs_each(tmp_path):
    def two_terms(model, batch):
        logits = model(batch["images"])
        return {"labels": nn.functional.cross_entropy(logits, batch["labels"][:, 0]), "small": logits.square().mean()}

    def summed(model, batch):
        terms = two_terms(model, batch)
        return terms["labels"] + terms["small"]

    runs = {}
    for name, fn in (("terms", two_terms), ("sum", summed)):
        model = make_model()
        trainer = Trainer(model, cfg(), tmp_path / name, Blobs(), fn, seed=1, progress=False, verbose=False)
        runs[name] = (model, trainer.fit())
    (terms_model, terms), (sum_model, whole) = runs["terms"], runs["sum"]
    for a, b in zip(terms_model.parameters(), sum_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the same training as the summed loss
    for entry, plain in zip(terms.history, whole.history, strict=True):
        assert entry["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-6)
        assert entry["train_loss_labels"] + entry["train_loss_small"] == pytest.approx(entry["train_loss"], rel=1e-6)
        assert "train_loss_labels" not in plain


def test_a_trainer_flushes_subnormal_floats_for_its_stage_only(tmp_path):
    """Subnormal float32 results (below 1.2e-38) slow a CPU many times over: a stage computes them as 0, as every
    kc command does (kc.numerics), and then gives the process back its IEEE arithmetic, which other code relies on
    (Python's own floats follow the same flag)."""
    subnormal = torch.tensor(1e-30, dtype=torch.float32)
    tiny = float("1e-300")  # a variable: a product of two literals would be computed when the test is compiled
    seen = []

    def recording_loss(model, batch):
        seen.append((float(subnormal * 1e-9), tiny * 1e-10))
        return loss_fn(model, batch)

    def validate(model):
        seen.append((float(subnormal * 1e-9), tiny * 1e-10))
        return {"mAP": 1.0}

    assert float(subnormal * 1e-9) > 0 and tiny * 1e-10 > 0
    Trainer(make_model(), cfg(epochs=1), tmp_path / "s", Blobs(), recording_loss, validate, progress=False).fit()
    assert seen and set(seen) == {(0.0, 0.0)}  # steps and validation alike
    assert float(subnormal * 1e-9) > 0 and tiny * 1e-10 > 0  # afterwards, as before
