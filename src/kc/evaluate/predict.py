"""Running a model over a split: scores (N, C) and targets (N, C) as numpy arrays."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from kc import distributed
from kc.config import DataConfig
from kc.data.dataset import ImageDataset, collate, dense_targets
from kc.data.samples import Sample


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    samples: list[Sample],
    image_root: Path,
    data_cfg: DataConfig,
    num_classes: int,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    activation: str = "sigmoid",
    first_class: int = 0,
    with_targets: bool = True,
    progress: bool = False,
    desc: str = "predicting",
) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
    """(scores, targets, seconds of the forward pass) per batch, for evaluations that need not hold every image's
    scores at once. Targets cover the classes [first_class, first_class + num_classes): a specialist's vertical
    needs no (N, all classes) matrix); `with_targets=False`: none (0 columns), for scores alone."""
    device = torch.device(device)
    dataset = ImageDataset(samples, image_root, data_cfg, train=False)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=data_cfg.num_workers
    )
    was_training = model.training
    model.eval().to(device)
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
            images = batch["images"].to(device)
            start = time.perf_counter()
            logits = model(images).float()
            probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            targets = dense_targets(batch["labels"], num_classes if with_targets else 0, first_class)
            yield probs.cpu().numpy(), targets.numpy(), seconds
    finally:
        model.train(was_training)


def predict(
    model: nn.Module,
    samples: list[Sample],
    image_root: Path,
    data_cfg: DataConfig,
    num_classes: int,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores, targets, and images per second of the forward passes (decoding excluded); options as
    `predict_batches`. Under torchrun every rank scores its part of the images and every rank gets all the scores
    (call it on every rank)."""
    start, end = distributed.part(len(samples))
    if not distributed.is_main():
        options["progress"] = False
    # Filled in place, not concatenated from a list: at 100K classes one more copy of the scores is 1.6 GB.
    scores = targets = np.zeros((0, num_classes), dtype=np.float32)
    model_seconds, row = 0.0, 0
    for batch_scores, batch_targets, seconds in predict_batches(
        model, samples[start:end], image_root, data_cfg, num_classes, **options
    ):
        if not row:
            scores = np.empty((end - start, batch_scores.shape[1]), dtype=np.float32)
            targets = np.empty((end - start, batch_targets.shape[1]), dtype=np.float32)
        scores[row : row + len(batch_scores)] = batch_scores
        targets[row : row + len(batch_scores)] = batch_targets
        row += len(batch_scores)
        model_seconds += seconds
    all_scores = distributed.gather_rows(scores)
    all_targets = distributed.gather_rows(targets)
    slowest = float(distributed.gather_rows(np.array([model_seconds])).max())  # the ranks run side by side
    return all_scores, all_targets, len(samples) / slowest if slowest > 0 else 0.0
