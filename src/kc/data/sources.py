"""The configured data source, whichever it is: an image folder, WebDataset shards, or a manifest + taxonomy."""

from __future__ import annotations

from pathlib import Path

from kc.config import DataConfig
from kc.data.samples import Sample, load_image_folder, load_manifest
from kc.data.shards import load_shards
from kc.taxonomy import Taxonomy


def load_source(d: DataConfig) -> tuple[Taxonomy, list[Sample], Path]:
    """The configured data source (image folder, shards, or manifest + taxonomy): taxonomy, samples, image root."""
    if d.image_folder is not None:
        taxonomy, samples = load_image_folder(d.image_folder)
        return taxonomy, samples, d.image_folder
    if d.shards is not None:
        assert d.taxonomy is not None
        return (taxonomy := Taxonomy.load(d.taxonomy)), load_shards(d.shards, taxonomy, d.expand_ancestors), d.shards
    assert d.manifest is not None and d.taxonomy is not None and d.image_root is not None
    taxonomy = Taxonomy.load(d.taxonomy)
    return taxonomy, load_manifest(d.manifest, d.image_root, taxonomy, d.expand_ancestors), d.image_root
