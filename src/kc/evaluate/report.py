"""Markdown tables of metrics, and a run's report."""

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


def comparison_table(result: dict[str, Any]) -> str:
    """One row per model: both headline metrics, size, networks per image and speed."""
    lines = [
        "| model | mean per-vertical AP | mAP | parameters | networks / image | images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in result["models"]:
        lines.append(
            f"| {m['model']} | {_fmt(m['mean_per_vertical_AP'])} | {_fmt(m['mAP'])} | "
            f"{m['parameters']:,} | {m['networks_per_image']} | {m['images_per_s']:,.0f} |"
        )
    gap = result.get("gap_closed")
    if gap and gap.get("mean_per_vertical_AP") is not None:
        lines.append("")
        lines.append(
            f"The student closed {100 * gap['mean_per_vertical_AP']:.0f}% of the generalist -> "
            f"specialists (oracle-routed) gap in mean per-vertical AP"
            + (f" and {100 * gap['mAP']:.0f}% in mAP" if gap.get("mAP") is not None else "")
            + " (the paper: 25%)."
        )
    return "\n".join(lines)


def per_vertical_table(result: dict[str, Any], taxonomy: Taxonomy) -> str:
    names = [m["model"] for m in result["models"]]
    lines = ["| vertical | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for vert in taxonomy.verticals:
        cells = [_fmt(m["per_vertical_AP"][vert.id]) for m in result["models"]]
        lines.append(f"| {vert.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_report(
    result: dict[str, Any], taxonomy: Taxonomy, config_yaml: str, timings: dict[str, float], parameters_md: str = ""
) -> str:
    parts = [
        "# kc run report",
        f"Test split: {result['images']} images, {taxonomy.num_classes} classes in {taxonomy.num_verticals} "
        "verticals. AP in percent; images/s are forward passes only, same batch size and threads for every model.",
        "## Comparison",
        comparison_table(result),
        "## Mean AP per vertical",
        per_vertical_table(result, taxonomy),
    ]
    for m in result["models"]:
        if m.get("self_paced_scales"):
            rows = "\n".join(f"| {vid} | {g:.3f} |" for vid, g in m["self_paced_scales"].items())
            parts += [
                f"## Self-paced scales of the {m['model']} (final)",
                "Per vertical; their trajectory over training is in the stage's history "
                "(`checkpoints/last.json`, keys `gamma/<vertical>`) and in TensorBoard.",
                "| vertical | scale |\n|---|---:|\n" + rows,
            ]
    if parameters_md:
        parts += ["## Parameters", parameters_md]
    if timings:
        parts += [
            "## Wall time per stage",
            "| stage | seconds |\n|---|---:|\n" + "\n".join(f"| {k} | {v:.1f} |" for k, v in timings.items()),
        ]
    parts += ["## Config", f"```yaml\n{config_yaml.rstrip()}\n```"]
    return "\n\n".join(parts) + "\n"
