"""Parameter accounting: backbone and head of each model of a run, and of every head structure at the run's sizes.

Models are built on PyTorch's meta device (shapes without memory), so even 100K-class heads are counted instantly.
Head weights are checked against the paper's formulas (`head_weight_formula`); a mismatch is a bug and raises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kc.config import RunConfig, student_hidden
from kc.models.classifier import create_backbone
from kc.models.heads import DenseHead
from kc.models.self_paced import SelfPacedScales
from kc.models.structured import StructuredHead, head_name, head_weight_formula
from kc.taxonomy import Taxonomy


def _split(module: nn.Module) -> tuple[int, int]:
    """(weights, biases) of a module."""
    weights = biases = 0
    for name, p in module.named_parameters():
        if "bias" in name.rsplit(".", 1)[-1]:
            biases += p.numel()
        else:
            weights += p.numel()
    return weights, biases


def head_structures(hidden: list[int], configured: tuple[str, int]) -> list[tuple[str, int]]:
    """Every structure the hidden widths allow (FC-SC(x) at a quarter and a half of the block width) and the one
    the student is configured with."""
    out = [("fc-fc", 0)]
    if hidden:
        out.append(("fc-sc", 0))
        out += [("fc-sc", x) for x in sorted({hidden[-1] // 4, hidden[-1] // 2}) if 0 < x < hidden[-1]]
    if len(hidden) >= 2:
        out.append(("sc-sc", 0))
    return out + ([configured] if configured not in out else [])


def parameter_accounting(cfg: RunConfig, taxonomy: Taxonomy) -> dict[str, Any]:
    """The parameters of the generalist, student, control and specialists, and of each head structure."""
    hidden, N, M = cfg.model.head.hidden, taxonomy.num_classes, taxonomy.num_verticals
    K = cfg.specialists.folds  # cross-fitted: K specialists per vertical
    sizes = taxonomy.vertical_sizes()
    with torch.device("meta"):
        backbone = create_backbone(cfg.model, with_weights=False)
        s_b = backbone.num_features
        backbone_params = sum(p.numel() for p in backbone.parameters())

        def head(structure: str, x: int, widths: list[int]) -> dict[str, Any]:
            module = (
                DenseHead(s_b, widths, N) if structure == "fc-fc" else StructuredHead(s_b, widths, sizes, structure, x)
            )
            weights, biases = _split(module)
            formula = head_weight_formula(structure, s_b, widths, M, N, x)
            if weights != formula:
                raise AssertionError(f"{structure} x={x}: {weights} head weights, formula says {formula}")
            return {"head": head_name(structure, widths, x), "weights": weights, "formula": formula, "biases": biases}

        sh = cfg.student.head
        structures = [head(s, x, hidden) for s, x in head_structures(hidden, (sh.structure, sh.shared_units))]
        student_widths = student_hidden(sh, cfg.model)
        student_name = head_name(sh.structure, student_widths, sh.shared_units)
        if all(s["head"] != student_name for s in structures):  # the student's own widths
            structures.append(head(sh.structure, sh.shared_units, student_widths))
        specialist_heads = [_split(DenseHead(s_b, hidden, n + int(cfg.specialists.other_output))) for n in sizes]

    scales = SelfPacedScales(taxonomy.vertical_of_class, cfg.student.self_paced.variant)
    scale_params = sum(p.numel() for p in scales.parameters())
    dense = structures[0]["weights"] + structures[0]["biases"]
    student_head = next(s for s in structures if s["head"] == student_name)
    student_head_params = student_head["weights"] + student_head["biases"]
    models = [
        ("generalist", structures[0]["head"], backbone_params, dense, 0, 1),
        ("student", student_head["head"], backbone_params, student_head_params, scale_params, 1),
        ("control", student_head["head"], backbone_params, student_head_params, 0, 1),
        (
            f"specialists ({M * K}, together)",
            f"{structures[0]['head']} each",
            M * K * backbone_params,
            K * sum(w + b for w, b in specialist_heads),
            0,
            M * K,
        ),
    ]
    generalist_total = backbone_params + dense
    rows = [
        {
            "model": name,
            "head": head_label,
            "backbone": bb,
            "head_parameters": hp,
            "self_paced_scales": sp,
            "total": bb + hp + sp,
            "vs_generalist": (bb + hp + sp) / generalist_total,
            "networks": networks,
        }
        for name, head_label, bb, hp, sp, networks in models
    ]
    for s in structures:
        s["vs_fc_fc_head"] = (s["weights"] + s["biases"]) / dense
        s["model_total"] = backbone_params + s["weights"] + s["biases"]
        s["vs_generalist"] = s["model_total"] / generalist_total
    return {
        "backbone": cfg.model.backbone,
        "feature_size": s_b,
        "hidden": hidden,
        "classes": N,
        "verticals": M,
        "models": rows,
        "structures": structures,
    }


def accounting_tables(acc: dict[str, Any]) -> str:
    lines = [
        f"Backbone `{acc['backbone']}` (feature size s_b = {acc['feature_size']}), head widths {acc['hidden']}, "
        f"{acc['classes']:,} classes in {acc['verticals']} verticals.",
        "",
        "| model | head | backbone | head | self-paced scales | total | x generalist |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in acc["models"]:
        lines.append(
            f"| {r['model']} | {r['head']} | {r['backbone']:,} | {r['head_parameters']:,} | "
            f"{r['self_paced_scales']:,} | {r['total']:,} | {r['vs_generalist']:.2f} |"
        )
    lines += [
        "",
        "Head structures at these sizes (weights counted on the built module = the paper's formula; biases apart):",
        "",
        "| head | weights | biases | x FC-FC head | model total | x generalist |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in acc["structures"]:
        lines.append(
            f"| {s['head']} | {s['weights']:,} | {s['biases']:,} | {s['vs_fc_fc_head']:.2f} | "
            f"{s['model_total']:,} | {s['vs_generalist']:.2f} |"
        )
    return "\n".join(lines)
