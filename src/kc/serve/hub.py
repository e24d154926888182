"""Exports in the Hugging Face Hub's (timm's) model layout, which timm, `kc predict` and `kc serve` load back.

    EXPORT/config.json         architecture `kc_classifier`, num_classes, label_names, model_args (what rebuilds
                               the stage: its model and student sections, the verticals' sizes), pretrained_cfg
                               (input size, interpolation, mean, std)
    EXPORT/model.safetensors   the stage's weights
    EXPORT/README.md           the model card, with the Hub's YAML front matter (library_name, tags, license, ...)
    EXPORT/taxonomy.json, kc_model.json   kc's label table and manifest, as in every kc export

timm builds it once kc has registered the architecture:

    import kc.serve.hub  # registers kc_classifier with timm
    model = timm.create_model("local-dir:EXPORT", pretrained=True)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import timm
import yaml
from timm.models import register_model
from torch import nn

from kc.config import ModelConfig, StudentConfig
from kc.errors import CheckpointError
from kc.hub_layout import CONFIG, LOCAL_DIR, WEIGHTS, local_dir_config
from kc.io import atomic_write_json, atomic_write_text, read_json
from kc.models.weights import load_weights, save_weights
from kc.run import Run
from kc.stages import build_stage_model

ARCHITECTURE = "kc_classifier"


def portable_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The model section as it rebuilds the architecture anywhere: a local-dir backbone becomes its timm
    architecture and no file of this machine is named (the export's weights replace every pretrained one)."""
    folder = local_dir_config(model_cfg.backbone)
    backbone = folder["architecture"] if folder is not None else model_cfg.backbone
    return model_cfg.model_copy(update={"backbone": backbone, "pretrained": None})


@register_model
def kc_classifier(
    pretrained: bool = False,
    pretrained_cfg: dict[str, Any] | None = None,
    *,
    stage: str,
    model: dict[str, Any],
    student: dict[str, Any],
    vertical_sizes: list[int],
    num_classes: int | None = None,
    **ignored: Any,  # timm's own arguments (pretrained_cfg_overlay, cache_dir, pretrained_model_args)
) -> nn.Module:
    """A kc stage's network from its config.json's model_args; with `pretrained`, its weights from the folder."""
    if num_classes is not None and num_classes != sum(vertical_sizes):
        raise ValueError(f"this kc model has {sum(vertical_sizes)} classes; it cannot be made with {num_classes}")
    net = build_stage_model(
        stage, ModelConfig.model_validate(model), StudentConfig.model_validate(student), vertical_sizes
    )
    if pretrained:
        folder = (pretrained_cfg or {}).get("file")
        if folder is None:
            raise ValueError("kc_classifier has no published weights; load an export: local-dir:EXPORT")
        load_weights(Path(folder) / WEIGHTS, net)
    net.pretrained_cfg = dict(pretrained_cfg or {})
    net.num_classes = sum(vertical_sizes)
    return net


def hub_config(run: Run, stage: str) -> dict[str, Any]:
    """config.json: what timm reads (architecture, model_args, pretrained_cfg) and the labels."""
    d = run.cfg.data
    return {
        "architecture": ARCHITECTURE,
        "num_classes": run.taxonomy.num_classes,
        "label_names": [c.id for c in run.taxonomy.classes],
        "model_args": {
            "stage": stage,
            "model": portable_model_config(run.cfg.model).model_dump(mode="json"),
            "student": run.cfg.student.model_dump(mode="json"),
            "vertical_sizes": run.taxonomy.vertical_sizes(),
        },
        "pretrained_cfg": {
            "input_size": [3, d.image_size, d.image_size],
            "interpolation": d.interpolation,
            "crop_pct": 1.0,  # kc resizes the shorter side to image_size and centre-crops
            "crop_mode": "center",
            "mean": list(d.mean),
            "std": list(d.std),
            "num_classes": run.taxonomy.num_classes,
        },
    }


def write_hub_files(run: Run, stage: str, net: nn.Module, out: Path) -> Path:
    """config.json and model.safetensors in `out`; returns the weights file."""
    atomic_write_json(out / CONFIG, hub_config(run, stage))
    save_weights(out / WEIGHTS, net)
    return out / WEIGHTS


def front_matter(run: Run, license: str) -> str:
    """The Hub's model-card metadata: YAML between --- lines."""
    source = run.cfg.data.manifest or run.cfg.data.image_folder or run.cfg.data.shards
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(source)).parent.name if source else "unknown") or "unknown"
    meta = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "license": license,
        "tags": ["image-classification", "timm", "kc", "knowledge-distillation", "multi-label"],
        "datasets": [dataset],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"


def usage(out_name: str) -> str:
    return (
        "## Load with timm\n\n```python\nimport timm\nimport kc.serve.hub  # registers kc_classifier with timm\n\n"
        f'model = timm.create_model("local-dir:{out_name}", pretrained=True).eval()\n'
        "config = timm.data.resolve_data_config(model=model)  # input size, interpolation, mean, std\n```\n"
    )


def load_hub_model(path: Path) -> nn.Module:
    """The network of a Hub-layout export, built by timm from its config.json (in eval mode)."""
    config = read_json(path / CONFIG)
    if config.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{path / CONFIG}: architecture {config.get('architecture')!r} is not {ARCHITECTURE}")
    try:
        return timm.create_model(f"{LOCAL_DIR}{path}", pretrained=True).eval()
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / CONFIG}: cannot rebuild the model ({exc}); export it again") from None


def write_readme(out: Path, name: str, run: Run, card: str, license: str) -> None:
    """README.md: the model card under the Hub's front matter, with how timm loads the export named `name`."""
    atomic_write_text(out / "README.md", front_matter(run, license) + card + "\n" + usage(name))
