"""Verticals from data: planted groupings are recovered from predictions alone; the command writes a taxonomy."""

import numpy as np
import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import tiny_config
from kc.cli import app
from kc.config import config_from_dict
from kc.discover import agreement, class_embeddings, spherical_kmeans
from kc.run import prepare_run
from kc.stages import GENERALIST, new_model
from kc.taxonomy import Taxonomy

SIZES = [10, 20, 12, 18]
GROUP = np.repeat(np.arange(len(SIZES)), SIZES)


def predictions(seed, images=2000, batch=100):
    """Each image shows one group: its classes' probabilities rise together, plus noise."""
    rng = np.random.default_rng(seed)
    for _ in range(images // batch):
        active = rng.integers(len(SIZES), size=batch)
        logits = rng.normal(-3, 1, (batch, len(GROUP))) + 3.0 * (GROUP[None, :] == active[:, None])
        yield 1 / (1 + np.exp(-logits))


@pytest.mark.parametrize("seed", range(3))
def test_a_planted_grouping_is_recovered_from_predictions(seed):
    labels = spherical_kmeans(class_embeddings(predictions(seed), len(GROUP), seed=seed), 4, seed=seed)
    assert agreement(labels, GROUP.tolist()) == 1.0
    assert sorted(np.bincount(labels).tolist()) == sorted(SIZES)


def test_balanced_clusters_have_equal_sizes_and_stay_mostly_faithful():
    embeddings = class_embeddings(predictions(0), len(GROUP))
    labels = spherical_kmeans(embeddings, 4, balanced=True)
    assert np.bincount(labels).tolist() == [15, 15, 15, 15]
    assert agreement(labels, GROUP.tolist()) >= 0.8
    with pytest.raises(ValueError, match="cannot make 61 clusters"):
        spherical_kmeans(embeddings, 61)


def test_discover_command_writes_a_valid_taxonomy(tmp_path, tiny_benchmark):
    run = prepare_run(config_from_dict(tiny_config(tiny_benchmark, tmp_path / "run")), progress=False)
    weights = run.stage_dir(GENERALIST) / "checkpoints"
    weights.mkdir(parents=True)
    save_file(new_model(run, GENERALIST).state_dict(), str(weights / "best.safetensors"))
    out = tmp_path / "found.json"
    result = CliRunner().invoke(app, ["discover-verticals", str(run.dir), "-k", "2", "--balanced", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "12 classes in 2 verticals (sizes: min 6, median 6, max 6)" in result.output
    found = Taxonomy.load(out)
    assert sorted(c.id for c in found.classes) == sorted(c.id for c in run.taxonomy.classes)
    assert [found.vertical_size(v) for v in range(2)] == [6, 6]
