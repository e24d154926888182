"""`kc seeds`: the whole pipeline once per seed, and what holds across seeds.

A seed here changes everything that is drawn: the benchmark (with --generate, each seed writes its own draw: a
generated preset, or `fashion-mnist`, the real images imported from Debian's package with the seed's val/test
halving and, with --train-per-class, the seed's training subset),
the split of a manifest without a split column, the generalist's initialisation and data order, every specialist,
the student and every control (their `seed` keys stay unset, so each follows the run's). Each seed is a run
directory of its own, RUN/seed_<n>, resumable like any run. The summary gives, per model, the mean and standard
deviation over seeds of each split's metrics, and for the student against every baseline the paired difference
(mean, std, wins), and the gap closed from the strongest baseline (chosen on val in each seed) on test.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from kc.config import config_from_dict, merge, parse_override
from kc.data import fashion_mnist
from kc.data.benchmark import PRESETS, generate_benchmark
from kc.data.feature_benchmark import FEATURE_PRESETS, generate_feature_benchmark
from kc.errors import ConfigError, KCError
from kc.evaluate.report import fmt_metric
from kc.io import atomic_write_json, atomic_write_text, read_json
from kc.pipeline import run_pipeline
from kc.run import prepare_run

STAGE_SECTIONS = ("generalist", "specialists", "student")
FASHION_MNIST = "fashion-mnist"  # --generate's one real-image source: imported, not generated
METRICS = ("mAP", "mean_per_vertical_AP")


def _seed_config(
    base: dict[str, Any],
    source: Path,
    seed: int,
    generate: str | None,
    label_noise: float | None,
    train_per_class: int | None,
    unlabeled_per_class: int | None,
    progress: bool,
):
    data = merge(base, {"seed": seed})
    run_root = Path(data.get("run_dir", "runs/default"))
    run_root = run_root if run_root.is_absolute() else (source.parent / run_root)
    seed_dir = run_root.resolve() / f"seed_{seed}"
    data["run_dir"] = str(seed_dir / "run" if generate else seed_dir)
    if generate:
        out = seed_dir / "benchmark"
        if generate == FASHION_MNIST:
            manifest = fashion_mnist.import_fashion_mnist(
                out, fashion_mnist.DEBIAN_DIR, seed, progress=progress, train_per_class=train_per_class
            )
        else:
            changes = {
                "seed": seed,
                "label_noise": label_noise,
                "train_per_class": train_per_class,
                "unlabeled_per_class": unlabeled_per_class,
            }
            spec = FEATURE_PRESETS.get(generate) or PRESETS[generate]
            spec = replace(spec, **{k: v for k, v in changes.items() if v is not None})
            if generate in FEATURE_PRESETS:
                manifest = generate_feature_benchmark(out, spec)
            else:
                manifest = generate_benchmark(out, spec, progress=progress)
        data["data"] = {**data.get("data", {}), "manifest": str(manifest), "taxonomy": str(out / "taxonomy.json")}
        if unlabeled_per_class:
            data["data"]["unlabeled"] = str(out / "unlabeled.jsonl")
    return config_from_dict(data, source=str(source), base=source.parent), run_root.resolve()


def run_seeds(
    config: Path,
    seeds: list[int],
    generate: str | None = None,
    overrides: list[str] | None = None,
    label_noise: float | None = None,
    train_per_class: int | None = None,
    unlabeled_per_class: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    if not seeds:
        raise KCError("--seed: give at least one seed (three or more for a claim)")
    known = [*PRESETS, *FEATURE_PRESETS, FASHION_MNIST]
    if generate is not None and generate not in known:
        raise KCError(f"--generate: '{generate}' is not one of {', '.join(known)}")
    if label_noise is not None and generate in (None, FASHION_MNIST):
        raise KCError("--label-noise applies to a generated benchmark: give --generate PRESET (not fashion-mnist) too")
    if train_per_class is not None and generate is None:
        raise KCError("--train-per-class applies to --generate: give --generate PRESET too")
    if train_per_class is not None and train_per_class < 1:
        raise KCError(f"--train-per-class: {train_per_class} must be at least 1")
    if unlabeled_per_class is not None and generate not in FEATURE_PRESETS:
        raise KCError("--unlabeled-per-class applies to --generate of a feature preset (features-*, paper-*)")
    if unlabeled_per_class is not None and unlabeled_per_class < 0:
        raise KCError(f"--unlabeled-per-class: {unlabeled_per_class} must be 0 or more")
    if not config.is_file():
        raise ConfigError(f"{config}: config file not found")
    try:
        base = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config}: not valid YAML: {exc}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"{config}: a config is a YAML mapping of keys to values")
    for text in overrides or []:
        base = merge(base, parse_override(text))
    fixed = [s for s in STAGE_SECTIONS if (base.get(s) or {}).get("seed") is not None]
    if fixed:
        raise ConfigError(
            f"{config}: {', '.join(f'{s}.seed' for s in fixed)} is set, so a seed would not change that stage; "
            "remove it for a whole-pipeline seed"
        )
    results, root = {}, None
    for seed in seeds:
        cfg, root = _seed_config(
            base, config, seed, generate, label_noise, train_per_class, unlabeled_per_class, progress
        )
        echo(f"seed {seed}: {cfg.run_dir}")
        run = prepare_run(cfg, progress=progress)
        results[seed] = run_pipeline(run, progress=progress, verbose=progress)
    summary = summarise(results)
    write_summary(root, seeds, summary, {"runs": results})
    return summary


def write_summary(out: Path, seeds: list[int], summary: dict[str, Any], sources: dict[str, Any]) -> None:
    """OUT/seeds.json (the summary with what it was made from) and OUT/seeds.md (its table)."""
    atomic_write_json(out / "seeds.json", {"seeds": seeds, "summary": summary, **sources})
    atomic_write_text(out / "seeds.md", seeds_table(summary) + "\n")


def summarise_runs(run_dirs: list[Path], out: Path) -> dict[str, Any]:
    """The seed summary of runs made one by one (on other machines, with resumes, or by hand): each RUN's
    metrics.json, written by `kc report`, keyed by the seed of its config. Writes OUT/seeds.md and seeds.json."""
    if not run_dirs:
        raise KCError("give at least one run directory (three or more seeds for a claim)")
    results: dict[int, dict[str, Any]] = {}
    where: dict[int, Path] = {}
    for run_dir in run_dirs:
        path = run_dir / "metrics.json"
        if not path.is_file():
            raise KCError(f"{path}: not found; score the run first with `kc report CONFIG --set run_dir={run_dir}`")
        try:
            result = read_json(path)
        except ValueError as exc:
            raise KCError(f"{path}: not valid JSON ({exc}); write it again with `kc report`") from None
        if not isinstance(result, dict) or not isinstance(result.get("models"), list):
            raise KCError(f"{path}: not the metrics.json of `kc report` (no list of models); write it again with it")
        seed = (result.get("config") or {}).get("seed")
        if not isinstance(seed, int):
            raise KCError(f"{path}: its config has no seed; write it again with `kc report`")
        if seed in results:
            raise KCError(f"{path}: seed {seed} again (also {where[seed]}); each run must be another seed")
        stages = [m["stage"] for m in result["models"]]
        if results:
            first_seed = next(iter(results))
            expected = [m["stage"] for m in results[first_seed]["models"]]
            if stages != expected:
                raise KCError(
                    f"{path}: models {', '.join(stages)} differ from {where[first_seed]}'s ({', '.join(expected)}); "
                    "report every run with the same controls"
                )
        results[seed], where[seed] = result, run_dir
    summary = summarise(results)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, list(results), summary, {"run_dirs": {seed: str(d) for seed, d in where.items()}})
    return summary


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample std over seeds (std 0 for one seed)."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per model, mean and std over seeds; the student's paired differences and the gaps it closed."""
    seeds = list(results)
    # Each seed's models by stage, on test and on val (built once; every table below reads them).
    test = {s: {m["stage"]: m for m in results[s]["models"]} for s in seeds}
    val = {s: {m["stage"]: m for m in (results[s].get("val") or {}).get("models", [])} for s in seeds}
    stages = list(test[seeds[0]])
    models = []
    for stage in stages:
        first = test[seeds[0]][stage]
        entry = {
            "stage": stage,
            "model": first["model"],
            "parameters": first["parameters"],
            "networks_per_image": first["networks_per_image"],
            "images_per_s": statistics.median(test[s][stage]["images_per_s"] for s in seeds),
        }
        for k in (*METRICS, "within_vertical_mAP"):
            entry[f"test_{k}"] = mean_std([test[s][stage][k] for s in seeds])
        if all(stage in val[s] for s in seeds):
            entry["val_mAP"] = mean_std([val[s][stage]["mAP"] for s in seeds])
        models.append(entry)
    paired = []
    if "student" in stages:
        for stage in stages:
            if stage in ("student", "specialists_oracle", "teachers_chosen", "specialists_ensemble"):
                continue
            for k in METRICS:
                diffs = [test[s]["student"][k] - test[s][stage][k] for s in seeds]
                paired.append({"baseline": stage, "metric": k, **mean_std(diffs), "wins": sum(d > 0 for d in diffs)})
    gaps: dict[str, Any] = {}
    for which in ("from_strongest_baseline", "from_generalist", "to_chosen_teachers"):
        for k in METRICS:
            values = [results[s].get("gap_closed", {}).get(which, {}).get(k) for s in seeds]
            if all(v is not None for v in values):
                gaps[f"{which}_{k}"] = mean_std([100 * v for v in values])
    headroom = {
        f"{which}_{k}": mean_std([results[s]["headroom"][which][k] for s in seeds])
        for which in ("over_strongest_baseline", "over_generalist", "chosen_teachers_over_strongest_baseline")
        for k in METRICS
        if all(which in results[s].get("headroom", {}) for s in seeds)
    }
    per_vertical = [
        100 * v for s in seeds for v in (results[s].get("gap_closed_per_vertical") or {}).values() if v is not None
    ]
    if per_vertical:
        q = statistics.quantiles(per_vertical, n=4) if len(per_vertical) > 1 else per_vertical * 3
        gaps["per_vertical_from_strongest_baseline"] = {
            "min": min(per_vertical),
            "q1": q[0],
            "median": statistics.median(per_vertical),
            "q3": q[2],
            "max": max(per_vertical),
            "count": len(per_vertical),
        }
    # Under teacher choice: the student's lead per group of verticals (by who taught them), paired by seed.
    by_teacher = []
    if all(results[s].get("student_by_teacher") for s in seeds):
        groups = [{(r["baseline"], r["teacher"]): r for r in results[s]["student_by_teacher"]} for s in seeds]
        for key in groups[0]:
            if all(key in g and g[key]["test"] is not None for g in groups):
                diffs = [g[key]["test"] for g in groups]
                by_teacher.append(
                    {
                        "baseline": key[0],
                        "teacher": key[1],
                        "verticals": sum(g[key]["verticals"] for g in groups),
                        "vertical_wins": sum(g[key]["test_wins"] for g in groups),
                        **mean_std(diffs),
                        "wins": sum(d > 0 for d in diffs),
                    }
                )
    return {
        "seeds": seeds,
        "models": models,
        "paired_by_teacher": by_teacher,
        "paired_differences": paired,
        "gap_closed_percent": gaps,
        "specialists_headroom": headroom,
        "strongest_baseline": {s: results[s].get("strongest_baseline", {}).get("stage") for s in seeds},
        "floor_test_mAP": mean_std([results[s]["floor"]["mAP"] for s in seeds]),
    }


def plus_minus(x: dict[str, float] | None) -> str:
    """`mean_std`'s result as 'mean ± std'."""
    return "n/a" if x is None else f"{fmt_metric(x['mean'])} ± {fmt_metric(x['std'])}"


def seeds_table(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = [
        f"Seeds {', '.join(map(str, seeds))} (each the whole pipeline); mean ± std over seeds. Val chooses, test is "
        f"the record. Test chance floor (vertical-only scorer): mAP {plus_minus(summary['floor_test_mAP'])}.",
        "",
        "| model | val mAP | test mAP | test mean per-vertical AP | test within-vertical mAP | parameters | "
        "networks / image | images/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in summary["models"]:
        lines.append(
            f"| {m['model']} | {plus_minus(m.get('val_mAP'))} | {plus_minus(m['test_mAP'])} | "
            f"{plus_minus(m['test_mean_per_vertical_AP'])} | {plus_minus(m['test_within_vertical_mAP'])} | "
            f"{m.get('parameters', 0):,} | {m.get('networks_per_image', '')} | {m.get('images_per_s', 0):,.0f} |"
        )
    if summary["paired_differences"]:
        lines += ["", "| student - baseline (test) | metric | mean ± std | wins |", "|---|---|---:|---:|"]
        for p in summary["paired_differences"]:
            lines.append(
                f"| {p['baseline']} | {p['metric']} | {p['mean']:+.2f} ± {p['std']:.2f} | {p['wins']}/{len(seeds)} |"
            )
    if summary.get("paired_by_teacher"):
        lines += [
            "",
            "| student - baseline (test, per-vertical AP) | in the verticals taught by | mean ± std | seeds won | "
            "verticals won |",
            "|---|---|---:|---:|---:|",
        ]
        for p in summary["paired_by_teacher"]:
            lines.append(
                f"| {p['baseline']} | {p['teacher']} | {p['mean']:+.2f} ± {p['std']:.2f} | {p['wins']}/{len(seeds)} | "
                f"{p['vertical_wins']}/{p['verticals']} |"
            )
    if summary["gap_closed_percent"]:
        lines += ["", "| gap closed (test, %) | mean ± std |", "|---|---:|"]
        for k, v in summary["gap_closed_percent"].items():
            if "mean" in v:
                lines.append(f"| {k.replace('_', ' ')} | {v['mean']:.1f} ± {v['std']:.1f} |")
        spread = summary["gap_closed_percent"].get("per_vertical_from_strongest_baseline")
        if spread:
            lines += [
                "",
                f"Per vertical, from the strongest baseline (test, {spread['count']} vertical-seeds with a gap): "
                f"min {spread['min']:.0f}%, quartiles {spread['q1']:.0f}% / {spread['median']:.0f}% / "
                f"{spread['q3']:.0f}%, max {spread['max']:.0f}% (the paper, from its generalist: 10-40%).",
            ]
        headroom = summary.get("specialists_headroom") or {}
        if headroom.get("chosen_teachers_over_strongest_baseline_mAP"):
            lines += [
                "",
                "Teachers as chosen on val (oracle-routed) minus the strongest baseline, test mAP: "
                f"{plus_minus(headroom['chosen_teachers_over_strongest_baseline_mAP'])}.",
            ]
        if headroom.get("over_strongest_baseline_mAP"):
            lines += [
                "",
                "Specialists (oracle-routed) minus the strongest baseline, test mAP: "
                f"{plus_minus(headroom['over_strongest_baseline_mAP'])}; minus the generalist: "
                f"{plus_minus(headroom['over_generalist_mAP'])} (what the teachers can add to the student at most, "
                "and the paper's gap).",
            ]
        chosen = ", ".join(f"seed {s}: {b}" for s, b in summary["strongest_baseline"].items())
        lines += ["", f"Strongest baseline, chosen on val mAP: {chosen}."]
    return "\n".join(lines)
