"""data.decoded_cache: every image decoded once per run, the same tensors as decoding every epoch."""

import torch

from conftest import tiny_config
from kc.config import config_from_dict
from kc.data.dataset import ImageDataset
from kc.run import prepare_run
from kc.stages import GENERALIST
from kc.train.generalist import train_generalist


def config(tiny_benchmark, run_dir, decoded):
    data = tiny_config(tiny_benchmark, run_dir, epochs=1)
    # 16 px images read at 12 px (a resize, bicubic) with crops and flips: every step of decoding is exercised
    data["data"] |= {"image_size": 12, "interpolation": "bicubic", "decoded_cache": decoded}
    data["data"]["augment"] = {"hflip": True, "crop_padding": 2}
    return config_from_dict(data)


def test_the_cache_gives_the_tensors_decoding_gives(tmp_path, tiny_benchmark):
    run = prepare_run(config(tiny_benchmark, tmp_path / "run", True), progress=False)
    assert run.decoded is not None and len(run.decoded.rows) == sum(len(v) for v in run.splits.values())
    for split, train in (("train", True), ("test", False)):
        samples = run.splits[split]
        cached = ImageDataset(samples, run.image_root, run.cfg.data, train=train, seed=3, decoded=run.decoded)
        decoded = ImageDataset(samples, run.image_root, run.cfg.data, train=train, seed=3)
        cached.set_epoch(2), decoded.set_epoch(2)
        for i in range(len(samples)):
            assert torch.equal(cached[i][0], decoded[i][0]), (split, i)


def test_the_cache_is_built_once_and_can_be_switched_on_for_an_existing_run(tmp_path, tiny_benchmark):
    plain = prepare_run(config(tiny_benchmark, tmp_path / "run", False), progress=False)
    assert plain.decoded is None
    run = prepare_run(config(tiny_benchmark, tmp_path / "run", True), progress=False)  # same run, now cached
    array = next((run.dir / "data").glob("decoded_12_bicubic.npy"))
    built = array.stat().st_mtime_ns
    again = prepare_run(config(tiny_benchmark, tmp_path / "run", True), progress=False)
    assert array.stat().st_mtime_ns == built and again.decoded is not None


def test_training_from_the_cache_ends_with_the_same_weights(tmp_path, tiny_benchmark):
    weights = []
    for decoded in (False, True):
        run = prepare_run(config(tiny_benchmark, tmp_path / f"run-{decoded}", decoded), progress=False)
        train_generalist(run, progress=False, verbose=False)
        weights.append((run.stage_dir(GENERALIST) / "checkpoints" / "best.safetensors").read_bytes())
    assert weights[0] == weights[1]
