"""Markdown tables of metrics, and a run's report."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
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
    result: dict[str, Any],
    taxonomy: Taxonomy,
    config_yaml: str,
    timings: dict[str, float],
    parameters_md: str = "",
    plots: list[tuple[str, str]] | None = None,
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
    if plots:
        parts += ["## Plots"] + [f"![{title}]({path})" for title, path in plots]
    if parameters_md:
        parts += ["## Parameters", parameters_md]
    if timings:
        parts += [
            "## Wall time per stage",
            "| stage | seconds |\n|---|---:|\n" + "\n".join(f"| {k} | {v:.1f} |" for k, v in timings.items()),
        ]
    parts += ["## Config", f"```yaml\n{config_yaml.rstrip()}\n```"]
    return "\n\n".join(parts) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def report_html(markdown: str, base: Path) -> str:
    """The report as one self-contained HTML page (images inlined): the subset of Markdown run_report writes,
    headings, tables, fenced code, images and paragraphs."""
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            body.append("<pre>" + html.escape("\n".join(lines[i + 1 : end])) + "</pre>")
            i = end + 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, data = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-:") for c in r)]
            body.append(
                "<table><tr>"
                + "".join(f"<th>{_inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in data)
                + "</table>"
            )
            continue
        image = re.fullmatch(r"!\[(.*)\]\((.+)\)", line)
        if image:
            data = base64.b64encode((base / image.group(2)).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}"
        "img{max-width:100%}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>kc run report</title><style>{style}</style>'
        f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
