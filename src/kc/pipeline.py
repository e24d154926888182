"""`kc pipeline`: generalist -> specialists -> student -> controls -> comparison report, resumable at every stage.

Finished stages are skipped and an interrupted one resumes from its last checkpoint, so re-running the same
command after any interruption finishes the run. Each stage's wall time is kept in RUN/timings.json and its peak
resident memory (MiB, `kc.memory`) in RUN/memory.json (a stage skipped because it was already done keeps the
figures of when it ran).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kc import distributed
from kc.evaluate import plots
from kc.evaluate.compare import ChosenTeachers, compare_splits
from kc.evaluate.report import report_html, run_report
from kc.io import atomic_write_json, atomic_write_text, read_json
from kc.jobs import run_shard_jobs
from kc.memory import PeakMemory
from kc.models.accounting import accounting_tables, parameter_accounting
from kc.run import Run
from kc.stages import GENERALIST, STAGES, STUDENT, controls_to_train, specialist_dirs, stage_complete
from kc.train.controls import TRAIN
from kc.train.generalist import train_generalist
from kc.train.specialists import train_specialists
from kc.train.student import cache_targets
from kc.train.teacher_choice import REFERENCE, chooses, load_reference, specialist_teaches, teacher_choice

TIMINGS, MEMORY = "timings.json", "memory.json"


def stage_records(run: Run) -> tuple[dict[str, float], dict[str, float]]:
    """What RUN/timings.json and RUN/memory.json hold so far: each stage's seconds and peak resident MiB."""
    paths = run.dir / TIMINGS, run.dir / MEMORY
    timings, memory = (read_json(p) if p.is_file() else {} for p in paths)
    return timings, memory


def _stage_dirs(run: Run, stage: str) -> list[Path]:
    if stage == "specialists":
        return [d for v in range(run.taxonomy.num_verticals) for d in specialist_dirs(run, v)]
    if stage == "cache":
        return []
    return [run.stage_dir(stage)]


def run_pipeline(
    run: Run,
    *,
    progress: bool = True,
    verbose: bool = True,
    on_step: Callable[[int], None] | None = None,
    specialist_jobs: int = 1,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Every stage in turn; with `specialist_jobs` N > 1 the specialists train in N local processes at once (one per
    GPU on a machine with several), each given the command line's `overrides`."""
    timings, memory = stage_records(run)
    kw = {"progress": progress, "verbose": verbose, "on_step": on_step}

    def specialists() -> None:
        if specialist_jobs > 1:
            run_shard_jobs(run, "specialists", specialist_jobs, overrides)
        else:
            train_specialists(run, **kw)

    stages: list[tuple[str, Callable[[], Any]]] = [
        (GENERALIST, lambda: train_generalist(run, **kw)),
        ("specialists", specialists),
    ]
    controls = controls_to_train(run)
    if chooses(run):  # the labelled-only control is then a candidate teacher: trained before the student
        stages.append((REFERENCE, lambda: TRAIN[REFERENCE](run, **kw)))
        controls = [name for name in controls if name != REFERENCE]
    # The cache resumes shard by shard; a complete one costs a glance. Cross-fitted teachers are read from it only.
    if run.cfg.student.teachers == "cache" or run.cfg.specialists.folds > 1:
        stages.append(("cache", lambda: cache_targets(run, progress=progress)))
    for name in [STUDENT, *controls]:
        stages.append((name, lambda name=name: TRAIN[name](run, **kw)))

    def record(name: str, seconds: float, peak_mib: float) -> None:
        timings[name], memory[name] = seconds, round(peak_mib)
        if distributed.is_main():
            atomic_write_json(run.dir / TIMINGS, timings)
            atomic_write_json(run.dir / MEMORY, memory)

    for name, train in stages:
        done_before = all(stage_complete(d) for d in _stage_dirs(run, name))
        start = time.perf_counter()
        with PeakMemory() as peak:
            train()
        if not done_before or name not in timings:
            record(name, time.perf_counter() - start, peak.mib)
    start = time.perf_counter()
    with PeakMemory() as peak:
        result = compare_run(run, progress=progress)  # every rank scores its part of the val and test images
    record("evaluation", time.perf_counter() - start, peak.mib)
    distributed.on_main(lambda: write_report(run, result))
    return result


def compare_run(run: Run, progress: bool = False) -> dict[str, Any]:
    """Every trained model of the run on val and test (`compare_splits`), with the teachers the student learned
    from under `student.teacher_choice: better_on_val`."""
    teachers = ChosenTeachers(specialist_teaches(run), lambda: load_reference(run)) if chooses(run) else None
    return compare_splits(run, progress=progress, teachers=teachers)


def write_report(run: Run, result: dict[str, Any]) -> None:
    """RUN/metrics.json, report.md and report.html: the comparison `result`, with each stage's time and memory."""
    timings, memory = stage_records(run)
    config_yaml = (run.dir / "config.yaml").read_text(encoding="utf-8")
    parameters = parameter_accounting(run.cfg, run.taxonomy)
    atomic_write_json(
        run.dir / "metrics.json",
        {
            **result,
            "unlabeled_images": len(run.unlabeled),
            "timings": timings,
            "peak_memory_mib": memory,
            "parameters": parameters,
            "config": run.cfg.resolved(),
        },
    )
    plots = draw_plots(run, result)
    choice = teacher_choice(run) if chooses(run) else None
    report = run_report(
        result, run.taxonomy, config_yaml, timings, accounting_tables(parameters), plots, memory, choice
    )
    atomic_write_text(run.dir / "report.md", report)
    atomic_write_text(run.dir / "report.html", report_html(report, run.dir))


def draw_plots(run: Run, result: dict[str, Any]) -> list[tuple[str, str]]:
    """RUN/plots/*.png; returns (title, path relative to the run) for each picture drawn."""
    out = run.dir / "plots"
    stages = {s.name: run.stage_dir(s.name) for s in STAGES}
    stages.update({f"specialist #{v}": specialist_dirs(run, v)[0] for v in range(run.taxonomy.num_verticals)})
    drawn = [
        ("Mean AP per vertical", plots.per_vertical_bars(result, run.taxonomy, out / "per_vertical_ap.png")),
        ("mAP against model size and speed", plots.map_vs_cost(result, out / "map_vs_cost.png")),
        ("Training curves", plots.training_curves(stages, out / "training_curves.png")),
        ("Self-paced scales over training", plots.self_paced_scales(stages[STUDENT], run.taxonomy, out / "scales.png")),
    ]
    return [(title, str(path.relative_to(run.dir))) for title, path in drawn if path is not None]
