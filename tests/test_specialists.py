import pytest
import torch

from kc.config import ModelConfig
from kc.data.samples import Sample
from kc.evaluate.compare import gap_closed
from kc.models.classifier import build_classifier, restrict_outputs
from kc.train.specialists import specialist_loss, specialist_samples, vertical_members


def test_a_specialist_starts_with_the_generalists_outputs_on_its_vertical():
    torch.manual_seed(0)
    generalist = build_classifier(
        ModelConfig(backbone_args={"widths": [8, 16], "depth": 1}, head={"hidden": [32, 16]}), num_classes=10
    ).eval()
    x = torch.randn(5, 3, 16, 16)
    for other in (False, True):
        specialist = restrict_outputs(generalist, 3, 7, other_output=other).eval()
        out = specialist(x)
        assert out.shape == (5, 4 + other)
        torch.testing.assert_close(out[:, :4], generalist(x)[:, 3:7], rtol=0, atol=0)
        if other:
            assert (out[:, 4] == 0).all()
    assert generalist.head.out.out_features == 10  # the generalist itself is untouched


def test_specialist_training_set_is_the_vertical_plus_seeded_negatives():
    samples = [Sample(f"{i}.png", (i % 10,), "train", f"m:{i}") for i in range(100)]  # classes 0-9, 10 images each
    picked = specialist_samples(samples, 2, 4, negatives_per_image=1.5, seed=0)
    own = [s for s in picked if s.labels[0] in (2, 3)]
    assert len(own) == 20 and len(picked) == 20 + 30
    assert picked == specialist_samples(samples, 2, 4, 1.5, seed=0)
    assert picked != specialist_samples(samples, 2, 4, 1.5, seed=1)
    assert len(specialist_samples(samples, 2, 4, 0.0, seed=0)) == 20


def test_vertical_members_give_every_specialist_the_same_samples_as_its_own_pass():
    # classes 0-9 in verticals of 2 (class c -> vertical c // 2); some images carry labels in two verticals
    samples = [Sample(f"{i}.png", (i % 10,) + ((i * 7) % 10,) * (i % 3 == 0), "train", f"m:{i}") for i in range(100)]
    members = vertical_members(samples, [c // 2 for c in range(10)], 5)
    for v in range(5):
        start, end = 2 * v, 2 * v + 2
        expected = specialist_samples(samples, start, end, 1.0, seed=3)
        assert specialist_samples(samples, start, end, 1.0, seed=3, own=members[v]) == expected
        assert all(any(start <= c < end for c in samples[i].labels) for i in members[v])


def test_specialist_loss_targets_its_classes_and_other():
    labels = torch.tensor([[3, -1], [8, -1]])  # in the vertical [2, 5); outside it
    logits = torch.zeros(2, 4, requires_grad=True)
    model = lambda images: logits  # noqa: E731
    loss = specialist_loss(2, 5, 10, other_output=True)(model, {"images": torch.zeros(2), "labels": labels})
    loss.backward()
    # d/dlogit of BCE at logit 0 is sigmoid(0) - target: -0.5 where the target is 1
    assert logits.grad[0].tolist() == [0.25, -0.25, 0.25, 0.25]  # class 3 is column 1; 'other' target 0
    assert logits.grad[1].tolist() == [0.25, 0.25, 0.25, -0.25]  # no class of the vertical: 'other' target 1


def test_gap_closed():
    assert gap_closed(30.0, 20.0, 40.0) == 0.5
    assert gap_closed(30.0, 20.0, 20.0) is None


def test_a_specialist_to_load_has_the_trained_specialists_layout(tmp_path, tiny_benchmark):
    """Built at the vertical's size, it holds the same tensors as a specialist cut from the generalist, so the trained
    weights load into it (strictly: load_weights refuses a missing or surplus key) and give the same outputs."""
    from conftest import tiny_config
    from kc.config import config_from_dict
    from kc.models.weights import load_weights, save_weights
    from kc.run import prepare_run
    from kc.stages import new_generalist_model, new_specialist_model

    for other in (False, True):
        data = tiny_config(tiny_benchmark, tmp_path / f"other_{other}")
        data["specialists"] = {"other_output": other}
        run = prepare_run(config_from_dict(data), progress=False)
        start, end = run.taxonomy.vertical_ranges[1]
        trained = restrict_outputs(new_generalist_model(run), start, end, other_output=other).eval()
        built = new_specialist_model(run, 1)
        assert {k: v.shape for k, v in built.state_dict().items()} == {
            k: v.shape for k, v in trained.state_dict().items()
        }
        save_weights(tmp_path / f"specialist_{other}.safetensors", trained)
        load_weights(tmp_path / f"specialist_{other}.safetensors", built)
        x = torch.randn(3, 3, 16, 16)
        torch.testing.assert_close(built.eval()(x), trained(x), rtol=0, atol=0)


def test_specialists_in_parallel_jobs_equal_specialists_in_turn(tmp_path, tiny_benchmark):
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import tiny_config
    from kc.config import config_from_dict
    from kc.run import prepare_run
    from kc.stages import specialist_dir
    from kc.train.generalist import train_generalist

    data = tiny_config(tiny_benchmark, tmp_path / "turn")
    data["specialists"] = {"epochs": 1, "batch_size": 16, "eval_batch_size": 64}
    run = prepare_run(config_from_dict(data), progress=False)
    train_generalist(run, progress=False, verbose=False)
    parallel = tmp_path / "parallel"
    parallel.mkdir()
    for name in ("config.yaml", "taxonomy.json", "data", "generalist"):
        (shutil.copytree if (run.dir / name).is_dir() else shutil.copy)(run.dir / name, parallel / name)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as each of the parallel jobs gets on 2 cores
    kc = [sys.executable, "-m", "kc.cli", "specialists"]
    subprocess.run([*kc, str(run.dir), "--no-progress"], env=env, check=True, capture_output=True)
    done = subprocess.run([*kc, str(parallel), "--jobs", "3", "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    moved = prepare_run(config_from_dict({**data, "run_dir": str(parallel)}), progress=False)
    for v in range(run.taxonomy.num_verticals):
        a = load_file(str(specialist_dir(run, v) / "checkpoints" / "best.safetensors"))
        b = load_file(str(specialist_dir(moved, v) / "checkpoints" / "best.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), v
    bad = subprocess.run([*kc, str(parallel), "--shard", "3/2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "I must lie in [0, N)" in bad.stderr


def test_specialists_with_centred_scales_start_as_the_generalist_ranks_classes_then_train_and_load(
    tmp_path, tiny_benchmark
):
    """specialists.self_paced: each specialist's one block of logits, centred and normalised, times a learned scale
    started at the generalist's median centred block norm on the specialist's training images. Per image that is an
    increasing affine map of the block, so every image's order of its vertical's classes is the generalist's; the
    'other' output is a block of its own, left as it is. Trained, the scale moves, and the weights load back."""
    from conftest import tiny_config
    from kc.config import config_from_dict
    from kc.errors import ConfigError
    from kc.run import prepare_run
    from kc.stages import GENERALIST, load_specialists, load_stage, new_generalist_model
    from kc.train.common import block_norms, with_measured_scales
    from kc.train.generalist import train_generalist
    from kc.train.specialists import specialist_training_samples, train_specialists

    data = tiny_config(tiny_benchmark, tmp_path / "run")
    scales = {"variant": "vertical", "centred": True, "init": "generalist"}
    data["specialists"] = {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "other_output": True}
    data["specialists"]["self_paced"] = scales
    run = prepare_run(config_from_dict(data), progress=False)
    train_generalist(run, progress=False, verbose=False)
    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run)).eval()
    start, end = run.taxonomy.vertical_ranges[1]
    samples = specialist_training_samples(run, 1, run.splits["train"])
    cut = restrict_outputs(generalist, start, end, other_output=True)
    block = [0] * (end - start) + [1]
    specialist = with_measured_scales(run, cut, run.cfg.specialists.self_paced, samples, block).eval()
    norms = block_norms(run, cut, centred=True, samples=samples, vertical_of_class=block)
    assert float(specialist.output_scales.gamma[0].detach()) == pytest.approx(float(norms[0]))
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        out, before = specialist(x), generalist(x)[:, start:end]
    assert (out[:, :-1].argsort(dim=1) == before.argsort(dim=1)).all()
    torch.testing.assert_close(out[:, -1], torch.zeros(6))  # 'other' (zero-initialised) keeps its logit

    train_specialists(run, progress=False, verbose=False)
    loaded = load_specialists(run)[1]  # loads strictly: the scales were saved and are built back
    assert loaded.output_scales.centred and loaded.output_scales.gamma.shape == (2,)
    assert float(loaded.output_scales.gamma[0].detach()) != pytest.approx(float(norms[0]), abs=1e-4)  # it learned

    data["specialists"]["self_paced"] = {"variant": "vertical"}  # the paper's formula on the one 'other' logit
    with pytest.raises(ConfigError, match="other_output"):
        config_from_dict(data)
