"""The report's pictures (PNG, matplotlib without a display): per-vertical AP, training curves, self-paced scales,
mAP against model cost. Each function writes one file atomically and returns its path, or None when the run has
nothing to draw for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: plots are files

import matplotlib.pyplot as plt  # noqa: E402

from kc.io import atomic_write, read_json  # noqa: E402
from kc.taxonomy import Taxonomy  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name.split(" (")[0] if name.startswith("control") else name


def per_vertical_bars(result: dict[str, Any], taxonomy: Taxonomy, path: Path) -> Path:
    models = result["models"]
    ids = [v.id for v in taxonomy.verticals]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ids) * len(models) / 3 + 3), 3.6))
    for i, m in enumerate(models):
        values = [m["per_vertical_AP"].get(v, float("nan")) for v in ids]
        offset = (i - (len(models) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(ids))], values, width, label=_short(m["model"]))
    ax.set_xticks(range(len(ids)), ids, rotation=45 if len(ids) > 12 else 0, ha="right" if len(ids) > 12 else "center")
    ax.set_ylabel("AP (%)")
    ax.set_title("Mean AP per vertical")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _history(stage_dir: Path) -> list[dict[str, Any]]:
    last = stage_dir / "checkpoints" / "last.json"
    return read_json(last).get("history", []) if last.is_file() else []


def training_curves(stage_dirs: dict[str, Path], path: Path) -> Path | None:
    histories = {name: _history(d) for name, d in stage_dirs.items()}
    histories = {name: h for name, h in histories.items() if h}
    if not histories:
        return None
    fig, (loss_ax, map_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        thin = {"linewidth": 0.7, "alpha": 0.5} if name.startswith("specialist") else {}
        label = None if name.startswith("specialist") and not name.endswith("#0") else name.split(" #")[0]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], label=label, **thin)
        if any("val_mAP" in h for h in history):
            map_ax.plot(epochs, [h.get("val_mAP", float("nan")) for h in history], label=label, **thin)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="Training loss", yscale="log")
    map_ax.set(xlabel="epoch", ylabel="validation mAP (%)", title="Validation mAP")
    for ax in (loss_ax, map_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def self_paced_scales(student_dir: Path, taxonomy: Taxonomy, path: Path) -> Path | None:
    history = _history(student_dir)
    keys = [f"gamma/{v.id}" for v in taxonomy.verticals]
    if not history or keys[0] not in history[0]:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = [h["epoch"] for h in history]
    for key in keys:
        ax.plot(epochs, [h[key] for h in history], label=key.split("/", 1)[1] if len(keys) <= 12 else None)
    ax.set(xlabel="epoch", ylabel="scale gamma_v", title="Self-paced scale per vertical")
    ax.grid(alpha=0.3)
    if len(keys) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def map_vs_cost(result: dict[str, Any], path: Path) -> Path:
    fig, (params_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m in result["models"]:
        for ax, x in ((params_ax, m["parameters"]), (speed_ax, m["images_per_s"])):
            ax.scatter(x, m["mAP"], s=30)
            ax.annotate(_short(m["model"]), (x, m["mAP"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    params_ax.set(xscale="log", xlabel="parameters", ylabel="mAP (%)", title="mAP against size")
    speed_ax.set(xscale="log", xlabel="images/s (forward)", ylabel="mAP (%)", title="mAP against speed")
    for ax in (params_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.1)  # room for the labels
    return _save(fig, path)
