"""Backbone + head = a classifier; building one from config; loading local pretrained backbone weights."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

import kc.data.features  # noqa: F401  (registers kc_features with timm)
import kc.models.convnet  # noqa: F401  (registers kc_convnet with timm)
from kc.config import ModelConfig
from kc.errors import CheckpointError, ConfigError
from kc.hub_layout import LOCAL_DIR
from kc.models.heads import ClassBlocks, DenseHead


@dataclass
class ClassSubset:
    """The logits a sampled loss needs: `columns` (K,) for every image, and per (image, vertical) pair its
    vertical's classes for that image alone, in groups padded each to its own width (`ClassBlocks`). With output
    scales, the columns must hold whole verticals and each block row one vertical's classes, all of them."""

    columns: torch.Tensor
    blocks: list[ClassBlocks]


class Classifier(nn.Module):
    """backbone -> head -> output scales (the student's self-paced scales; identity otherwise)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, output_scales: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.output_scales = output_scales if output_scales is not None else nn.Identity()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(
        self, images: torch.Tensor, classes: torch.Tensor | ClassSubset | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits over every class; over `classes` (K,) only: without output scales the head computes just those
        classes (sampled-negative training), with them all are computed and those kept (a vertical's scale needs
        its whole block); or for a `ClassSubset`: its (B, K) column logits and each group's (P, S) block logits
        (the sampled student loss), computed by the head for those classes alone.
        An argument of forward, not a method beside it, so that it works through DistributedDataParallel."""
        if classes is None:
            return self.output_scales(self.head(self.backbone(images)))
        if isinstance(classes, ClassSubset):
            return self._subset_logits(images, classes)
        if self._unscaled():
            return self.head.class_logits(self.backbone(images), classes)
        return self.forward(images)[:, classes]

    def _unscaled(self) -> bool:
        """Whether the output scales leave the logits as they are: none, or self-paced scales of variant none."""
        return getattr(self.output_scales, "variant", "none") == "none"

    def _subset_logits(self, images: torch.Tensor, subset: ClassSubset) -> tuple[torch.Tensor, list[torch.Tensor]]:
        columns, blocks = self.head.subset_logits(self.backbone(images), subset.columns, subset.blocks)
        blocks = [logits.masked_fill(b.classes < 0, 0.0) for logits, b in zip(blocks, subset.blocks, strict=True)]
        if not self._unscaled():
            columns = self.output_scales.scale_columns(columns, subset.columns)
            blocks = [
                self.output_scales.scale_blocks(logits, b.classes.clamp(min=0))
                for logits, b in zip(blocks, subset.blocks, strict=True)
            ]
        return columns, blocks


def create_backbone(cfg: ModelConfig, with_weights: bool = True) -> nn.Module:
    """A timm model by name, or a local-dir:PATH folder (with its weights), with its classifier removed
    (num_classes=0): it returns pooled features. `with_weights` False: the architecture only."""
    if cfg.backbone.startswith(LOCAL_DIR):  # checked when the config was read (kc.hub_layout.local_dir_config)
        try:
            return timm.create_model(cfg.backbone, pretrained=with_weights, num_classes=0, **cfg.backbone_args)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"model.backbone {cfg.backbone}: cannot be loaded by timm: {exc}") from None
    if not timm.is_model(cfg.backbone):
        close = timm.list_models(f"*{cfg.backbone.split('_')[0]}*")[:8]
        raise ConfigError(
            f"model.backbone: '{cfg.backbone}' is not a timm model"
            + (f"; did you mean one of: {', '.join(close)}" if close else "")
        )
    try:
        backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, **cfg.backbone_args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.backbone_args: not accepted by '{cfg.backbone}': {exc}") from None
    if cfg.pretrained is not None and with_weights:
        load_backbone_weights(backbone, cfg.pretrained)
    return backbone


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load local weights (safetensors, or a torch file read with weights_only=True); classifier keys are ignored."""
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {path} not found (weights are never downloaded; give a local file)")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc}") from None
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable]
    if not usable or len(missing) > len(own) // 2:
        raise CheckpointError(
            f"{path}: only {len(usable)} of the backbone's {len(own)} tensors match by name and shape; "
            f"is it a checkpoint of this backbone? First missing: {', '.join(missing[:5])}"
        )
    backbone.load_state_dict(usable, strict=False)


def build_classifier(cfg: ModelConfig, num_classes: int, with_weights: bool = True) -> Classifier:
    backbone = create_backbone(cfg, with_weights)
    head = DenseHead(backbone.num_features, cfg.head.hidden, num_classes, cfg.head.dropout, cfg.head.activation)
    if cfg.head.output_bias == "prior":
        # At 100K classes a zero-biased sigmoid head starts at a loss of 69,000 per image, and its gradients flatten
        # the hidden layers before any class is learnt (measured: the feature benchmark stayed at chance).
        nn.init.constant_(head.out.bias, -math.log(num_classes))
    return Classifier(backbone, head)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def restrict_outputs(model: Classifier, start: int, end: int, other_output: bool = False) -> Classifier:
    """A copy of `model` whose output layer keeps only classes [start, end): a specialist made from a generalist.

    Backbone and hidden layers are copied unchanged and the kept output rows copied exactly, so the new model's
    outputs equal the old model's on those classes until it is trained. An 'other' output, if asked for, starts
    with zero weights and bias (probability 0.5 on every image).
    """
    specialist = copy.deepcopy(model)
    old = model.head.out
    new = nn.Linear(old.in_features, end - start + (1 if other_output else 0))
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[: end - start].copy_(old.weight[start:end])
        new.bias[: end - start].copy_(old.bias[start:end])
    specialist.head.out = new
    return specialist


class LogitMean(nn.Module):
    """Several models of the same outputs as one: the mean of their logits. A vertical's cross-fitted specialists
    (specialists.folds > 1), each trained without one fold of the images, score val and test images together."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)
