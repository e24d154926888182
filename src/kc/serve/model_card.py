"""MODEL_CARD.md for an export: what the model recognises, what it was trained on, how well it does, how to use it."""

from __future__ import annotations

from typing import Any

from kc.io import read_json
from kc.run import Run


def _metrics_section(stage: str, metrics: dict[str, Any] | None) -> list[str]:
    if not metrics:
        return ["No evaluation report in the run (run `kc report RUN` before exporting to include one)."]
    lines = [
        f"From the run's report ({metrics.get('split', 'test')} split, {metrics.get('images', '?')} images; AP in "
        "percent):",
        "",
        "| model | mean per-vertical AP | mAP | parameters | networks / image |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in metrics.get("models", []):
        mark = "**" if m["model"].startswith(stage) else ""  # the exported model's row
        lines.append(
            f"| {mark}{m['model']}{mark} | {m['mean_per_vertical_AP']:.2f} | {m['mAP']:.2f} | "
            f"{m['parameters']:,} | {m['networks_per_image']} |"
        )
    return lines


def model_card(run: Run, manifest: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    taxonomy = run.taxonomy
    check_path = run.dir / "data" / "check.json"
    check = read_json(check_path) if check_path.is_file() else {}
    data = run.cfg.data
    source = data.manifest or data.image_folder or data.shards
    verticals = "\n".join(
        f"| {v.id} | {v.name} | {taxonomy.vertical_size(i)} |" for i, v in enumerate(taxonomy.verticals)
    )
    parity = manifest.get("parity", {})
    p = manifest["preprocess"]
    resize = p.get("interpolation", "bilinear")
    parts = [
        f"# Model card: kc {manifest['stage']} ({manifest['format']})",
        "## What it is",
        f"One image classifier over {taxonomy.num_classes:,} classes in {taxonomy.num_verticals} verticals, trained "
        "with kc (knowledge concentration: specialists per vertical distilled into one network). Output: one "
        f"{manifest['activation']} score per class; the label table (ids, names, verticals, hierarchy) is "
        "`taxonomy.json`, in output order.",
        "## Verticals",
        "| id | name | classes |\n|---|---|---:|\n" + verticals,
        "## Training data",
        f"Source: `{source}`; images: {check.get('images', '?')} ({check.get('split_sizes', {})} by split; "
        f"{len(check.get('skipped', []))} unreadable skipped). Split seed {run.cfg.seed}.",
        "## Evaluation",
        "\n".join(_metrics_section(manifest["stage"], metrics)),
        "## Use",
        f"Input: RGB images, shorter side resized ({resize}) to {p['size']} and centre-cropped to "
        f"{p['size']}x{p['size']}, scaled to [0, 1], normalised with mean {list(p['mean'])} and std "
        f"{list(p['std'])}; tensor (B, 3, "
        f"{p['size']}, {p['size']}) named `images`; output `logits` (B, {taxonomy.num_classes}). "
        "`kc predict` and `kc serve` do all of this given this directory.",
        f"Export check: the {manifest['format']} network matched the PyTorch model on "
        f"{parity.get('images', '?')} images with a max abs logit difference of "
        f"{parity.get('max_abs_logit_difference', float('nan')):.2g} (tolerance {parity.get('tolerance', '?')}).",
        "## Intended use and limits",
        "Tagging and retrieval over the classes listed in `taxonomy.json`. Images unlike the training data (other "
        "domains, sizes, classes outside the taxonomy) get confident-looking but meaningless scores; scores are "
        "per-class sigmoid probabilities, not calibrated across classes unless checked on your data. Choose "
        "per-class thresholds on held-out data before acting on scores.",
        "## Provenance",
        f"Run `{manifest['source']['run']}`, weights `{manifest['source']['weights']}` "
        f"(sha256 prefix {manifest['source']['sha256_16']}); exported {manifest['created']} with kc "
        f"{manifest['versions']['kc']}, torch {manifest['versions']['torch']}.",
    ]
    return "\n\n".join(parts) + "\n"
