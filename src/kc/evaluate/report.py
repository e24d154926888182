"""Markdown tables of metrics, and a run's report."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from kc.taxonomy import Taxonomy


def fmt_metric(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}"


def metrics_table(metrics: dict[str, Any], taxonomy: Taxonomy, title: str = "AP") -> str:
    """Per-vertical AP rows, then mean per-vertical AP, mAP and (single-label data) top-1/top-5."""
    lines = [f"| vertical | classes | {title} |", "|---|---:|---:|"]
    for vert in taxonomy.verticals:
        m = metrics["per_vertical"][vert.id]
        lines.append(f"| {vert.name} | {m['classes_scored']}/{m['classes']} | {fmt_metric(m['ap'])} |")
    lines.append(f"| **mean per-vertical AP** | | **{fmt_metric(metrics['mean_per_vertical_AP'])}** |")
    lines.append(f"| **mAP (over classes)** | {metrics['classes_scored']} | **{fmt_metric(metrics['mAP'])}** |")
    for k in ("top1", "top5"):
        if k in metrics:
            lines.append(f"| {k} accuracy | | {fmt_metric(metrics[k])} |")
    return "\n".join(lines)


def comparison_table(result: dict[str, Any]) -> str:
    """One row per model: val mAP (what chooses), then the test split's metrics (the record), size and speed; the
    chance floor of each split; the gap the student closed from the strongest baseline (chosen on val) and from the
    generalist."""
    val = {m["stage"]: m for m in (result.get("val") or {}).get("models", [])}
    lines = [
        "| model | val mAP | test mAP | test mean per-vertical AP | test within-vertical mAP | parameters | "
        "networks / image | images/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["models"]:
        v = val.get(m.get("stage"), {})
        lines.append(
            f"| {m['model']} | {fmt_metric(v.get('mAP'))} | {fmt_metric(m['mAP'])} | "
            f"{fmt_metric(m['mean_per_vertical_AP'])} | "
            f"{fmt_metric(m.get('within_vertical_mAP'))} | {m['parameters']:,} | {m['networks_per_image']} | "
            f"{m['images_per_s']:,.0f} |"
        )
    floors = [(name, r["floor"]) for name, r in (("test", result), ("val", result.get("val"))) if r and "floor" in r]
    if floors:
        lines.append("")
        lines.append(
            "Chance floor (each image's vertical known, random order within it): "
            + "; ".join(
                f"{name} mAP {fmt_metric(f['mAP'])}, mean per-vertical AP {fmt_metric(f['mean_per_vertical_AP'])}"
                for name, f in floors
            )
            + "."
        )
    if result.get("unfinished"):
        lines.append("")
        names = ", ".join(result["unfinished"])
        lines.append(
            f"Not scored, still training (or stopped before the end of its schedule): {names}; finish it (its "
            "command resumes) and report again."
        )
    gap, strongest = result.get("gap_closed"), result.get("strongest_baseline")
    if gap and strongest:
        lines.append("")
        lines.append(
            f"Gap closed by the student (test), from the strongest baseline, {strongest['model']} (chosen on "
            f"{strongest['chosen_on']}), to the specialists (oracle-routed): {_share(gap['from_strongest_baseline'])}. "
            f"From the generalist (the paper's measure; the paper: 25%): {_share(gap['from_generalist'])}."
        )
        if "to_chosen_teachers" in gap:
            lines.append("")
            lines.append(
                "Some verticals were taught by the labelled-only control, not their specialist: from the strongest "
                f"baseline to the teachers as chosen (oracle-routed), the student closed "
                f"{_share(gap['to_chosen_teachers'])}."
            )
    headroom = result.get("headroom")
    if headroom and strongest:
        over_base, over_generalist = headroom["over_strongest_baseline"]["mAP"], headroom["over_generalist"]["mAP"]
        lines.append("")
        lines.append(
            f"Headroom (test mAP): the specialists (oracle-routed) stand {over_base:+.2f} above the strongest "
            f"baseline and {over_generalist:+.2f} above the generalist (the paper: +40.3). What they lead the "
            "strongest baseline by is the most their knowledge can add to the student."
            + (
                " Here the strongest baseline already takes most of the specialists' lead over the generalist: "
                "the benchmark is not in the regime where teachers can show much."
                if over_generalist > 0 and over_base < over_generalist / 2
                else ""
            )
        )
    return "\n".join(lines)


def _share(closed: dict[str, float | None]) -> str:
    parts = [
        f"{100 * closed[k]:.0f}% in {label}"
        for k, label in (("mAP", "mAP"), ("mean_per_vertical_AP", "mean per-vertical AP"))
        if closed.get(k) is not None
    ]
    return " and ".join(parts) or "no gap to close"


def per_vertical_table(result: dict[str, Any], taxonomy: Taxonomy) -> str:
    names = [m["model"] for m in result["models"]]
    lines = ["| vertical | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for vert in taxonomy.verticals:
        cells = [fmt_metric(m["per_vertical_AP"][vert.id]) for m in result["models"]]
        lines.append(f"| {vert.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_teacher_table(rows: list[dict[str, Any]], names: dict[str, str]) -> str:
    lines = [
        "| student minus | verticals taught by | verticals | val | test | test wins |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        val = "n/a" if r["val"] is None else f"{r['val']:+.2f}"
        test = "n/a" if r["test"] is None else f"{r['test']:+.2f}"
        lines.append(
            f"| {names.get(r['baseline'], r['baseline'])} | {r['teacher']} | {r['verticals']} | {val} | {test} | "
            f"{r['test_wins']}/{r['verticals']} |"
        )
    return "\n".join(lines)


def run_report(
    result: dict[str, Any],
    taxonomy: Taxonomy,
    config_yaml: str,
    timings: dict[str, float],
    parameters_md: str = "",
    plots: list[tuple[str, str]] | None = None,
    memory: dict[str, float] | None = None,
    teacher_choice: list[dict[str, Any]] | None = None,
) -> str:
    parts = [
        "# kc run report",
        f"Test split: {result['images']} images, {taxonomy.num_classes} classes in {taxonomy.num_verticals} "
        "verticals. AP in percent; images/s are forward passes only, same batch size and threads for every model. "
        "Val chooses (the strongest baseline, best epochs), test is the record.",
        "## Comparison",
        comparison_table(result),
        "## Mean AP per vertical",
        per_vertical_table(result, taxonomy),
    ]
    if teacher_choice:
        rows = "\n".join(
            f"| {r['vertical']} | {fmt_metric(r['specialist_val_AP'])} | {fmt_metric(r['reference_val_AP'])} | "
            f"{'its specialist' if r['teacher'] == 'specialist' else 'the labelled-only control'} |"
            for r in teacher_choice
        )
        parts += [
            "## Teachers chosen on val",
            "`student.teacher_choice: better_on_val`: each vertical taught by its specialist where that beat the "
            "labelled-only control on val (AP over the vertical's classes) by more than "
            "`student.teacher_choice_margin`, else by that control.",
            "| vertical | specialist val AP | labelled-only control val AP | teacher |\n|---|---:|---:|---|\n" + rows,
        ]
    if result.get("student_by_teacher"):
        parts += [
            "The student minus each baseline, per-vertical AP averaged over the verticals of each teacher. Where the "
            "labelled-only control teaches, the self-training control learns the student's own targets: the "
            "difference there is what training noise alone moves. Where the specialists teach, it is what they add.",
            by_teacher_table(result["student_by_teacher"], names={m["stage"]: m["model"] for m in result["models"]}),
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
        memory = memory or {}
        rows = [
            f"| {k} | {v:.1f} | {memory[k]:,.0f} |" if k in memory else f"| {k} | {v:.1f} | |"
            for k, v in timings.items()
        ]
        parts += [
            "## Wall time and peak resident memory per stage",
            "| stage | seconds | peak MiB |\n|---|---:|---:|\n" + "\n".join(rows),
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
