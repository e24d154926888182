"""Markdown tables of metrics."""

from __future__ import annotations

from typing import Any

from kc.taxonomy import Taxonomy


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}"


def metrics_table(metrics: dict[str, Any], taxonomy: Taxonomy, title: str = "AP") -> str:
    """Per-vertical AP rows, then mean per-vertical AP, mAP and (single-label data) top-1/top-5."""
    lines = [f"| vertical | classes | {title} |", "|---|---:|---:|"]
    for vert in taxonomy.verticals:
        m = metrics["per_vertical"][vert.id]
        lines.append(f"| {vert.name} | {m['classes_scored']}/{m['classes']} | {_fmt(m['ap'])} |")
    lines.append(f"| **mean per-vertical AP** | | **{_fmt(metrics['mean_per_vertical_AP'])}** |")
    lines.append(f"| **mAP (over classes)** | {metrics['classes_scored']} | **{_fmt(metrics['mAP'])}** |")
    for k in ("top1", "top5"):
        if k in metrics:
            lines.append(f"| {k} accuracy | | {_fmt(metrics[k])} |")
    return "\n".join(lines)
