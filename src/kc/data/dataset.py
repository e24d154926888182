"""The torch Dataset over `Sample`s: decode, resize, augment deterministically, normalise.

Augmentation randomness comes from a generator seeded by (seed, epoch, index), so an image gets the same view in
an epoch whatever the worker count and whether or not the run was resumed mid-epoch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kc.config import DataConfig
from kc.data.decoded import DecodedImages
from kc.data.features import is_feature_path, read_feature, read_features
from kc.data.images import Preprocess, decode_rgb
from kc.data.samples import Sample
from kc.errors import DataError


class ImageDataset(Dataset):
    def __init__(
        self,
        samples: list[Sample],
        image_root: Path,
        cfg: DataConfig,
        train: bool,
        seed: int = 0,
        decoded: DecodedImages | None = None,
    ):
        self.samples = samples
        self.decoded = decoded  # the run's decoded images (data.decoded_cache), read instead of decoding
        self.image_root = image_root
        self.preprocess = Preprocess(cfg.image_size, cfg.mean, cfg.std, cfg.interpolation)
        self.size = cfg.image_size
        self.max_pixels = cfg.max_image_pixels
        self.augment = cfg.augment if train else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self, index: int) -> torch.Generator:
        """The randomness of one image's view in this epoch."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        sample = self.samples[index]
        if self.decoded is not None and (x := self.decoded.get(sample.path)) is not None:
            return x
        try:
            img = decode_rgb(self.image_root / sample.path, max_pixels=self.max_pixels, target=self.size)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{sample.where}: cannot read {self.image_root / sample.path}: {exc}") from None
        return self.preprocess.to_unit(img)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """A batch (the DataLoader asks for a batch's indices at once): feature rows in one read per array, the
        same tensors as `__getitem__` gives one by one; images one by one."""
        paths = [self.samples[i].path for i in indices]
        if not all(is_feature_path(p) for p in paths):
            return [self[i] for i in indices]
        rows = read_features(self.image_root, paths)
        return [self._feature_item(x, i) for x, i in zip(rows, indices, strict=True)]

    def _feature_item(self, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A row of precomputed features: no pixels to crop, flip or normalise."""
        if self.augment is not None and self.augment.feature_noise:
            noise = torch.randn(x.shape, generator=self.generator(index))
            x = x + self.augment.feature_noise * noise
        return x, torch.tensor(self.samples[index].labels, dtype=torch.long), index

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        sample = self.samples[index]
        if is_feature_path(sample.path):
            return self._feature_item(read_feature(self.image_root, sample.path), index)
        x = self.load(index)
        if self.augment is not None and (self.augment.hflip or self.augment.crop_padding):
            gen = self.generator(index)
            if self.augment.crop_padding:
                p = self.augment.crop_padding
                x = F.pad(x, (p, p, p, p))
                top, left = torch.randint(0, 2 * p + 1, (2,), generator=gen).tolist()
                x = x[:, top : top + self.size, left : left + self.size]
            if self.augment.hflip and torch.rand((), generator=gen) < 0.5:
                x = x.flip(-1)
        x = self.preprocess.normalise(x)
        return x, torch.tensor(self.samples[index].labels, dtype=torch.long), index


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Images stacked; labels as a (B, L) index matrix padded with -1 (dense targets are built on device)."""
    images = torch.stack([b[0] for b in batch])
    width = max(1, max(len(b[1]) for b in batch))
    labels = torch.full((len(batch), width), -1, dtype=torch.long)
    for i, b in enumerate(batch):
        labels[i, : len(b[1])] = b[1]
    return {"images": images, "labels": labels, "index": torch.tensor([b[2] for b in batch])}


def dense_targets(labels: torch.Tensor, num_classes: int, first_class: int = 0) -> torch.Tensor:
    """(B, L) padded label indices -> (B, num_classes) multi-hot float targets over the classes
    [first_class, first_class + num_classes) (a specialist's vertical; by default every class)."""
    shifted = labels - first_class
    inside = (labels >= 0) & (shifted >= 0) & (shifted < num_classes)
    targets = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    targets.scatter_(1, torch.where(inside, shifted, num_classes), 1.0)  # labels elsewhere land in the extra column
    return targets[:, :num_classes]
