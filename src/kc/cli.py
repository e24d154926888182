"""The `kc` command: one thin function per subcommand (parse, call, print). User errors exit 2, no traceback."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from kc.errors import KCError
from kc.numerics import flush_subnormals_in_this_process

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="kc: knowledge concentration — one classifier over a huge label vocabulary.",
)

F = TypeVar("F", bound=Callable[..., Any])


def _print_version(asked: bool) -> None:
    if asked:
        from kc import versions

        found = versions()
        typer.echo(f"kc {found.pop('kc')} ({', '.join(f'{k} {v}' for k, v in found.items())})")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the versions and exit")
    ] = False,
) -> None:
    pass


SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key: KEY=VALUE (repeatable)")]
NoProgress = Annotated[
    bool, typer.Option("--no-progress", help="no progress bars (they are shown only on a terminal anyway)")
]


def bars(no_progress: bool) -> bool:
    """Progress bars on a terminal only: redirected output (logs, CI) gets the one-line epoch summaries alone."""
    return not no_progress and sys.stderr.isatty()


RESUME_HINT = "free some space (or fix the cause) and run the same command again: it resumes"


def user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kc import distributed
        from kc.train.trainer import TrainingStopped

        try:
            result = fn(*args, **kwargs)
            distributed.finish()
            return result
        except TrainingStopped as exc:
            typer.echo(f"kc: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KCError as exc:
            typer.echo(f"kc: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("kc: interrupted; run the same command again to resume", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:  # a write outside kc's own (a library's): a full disk needs no traceback either
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            typer.echo(f"kc: error: {exc.filename or 'a file'}: {exc.strerror}; {RESUME_HINT}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _load(config: Path, overrides: list[str] | None):
    from kc.config import load_config, merge, parse_override

    merged: dict[str, Any] = {}
    for text in overrides or []:
        merged = merge(merged, parse_override(text))
    return load_config(config, merged)


def _run_config(target: Path, overrides: list[str] | None):
    """The config of a config file, or of a run directory (its config.yaml; the directory may have been moved)."""
    overrides = list(overrides or [])
    if target.is_dir():
        if not (target / "config.yaml").is_file():
            raise KCError(f"{target}: not a run directory (no config.yaml); give a config file or a run directory")
        overrides.insert(0, f"run_dir={target.resolve()}")
        target = target / "config.yaml"
    return _load(target, overrides)


def _open_run(target: Path, overrides: list[str] | None, progress: bool):
    """A run, for commands that run as one process."""
    from kc import distributed
    from kc.run import prepare_run

    if distributed.launched():
        raise KCError(
            "this command runs as one process; start it without torchrun (the training stages, cache-targets, "
            "evaluate, report and pipeline run under torchrun)"
        )
    return prepare_run(_run_config(target, overrides), progress=progress)


def _open_distributed_run(target: Path, overrides: list[str] | None, progress: bool):
    """A run, for commands that run under torchrun too: join the process group (a no-op as one process); rank 0
    prepares the run directory first, then the others read it."""
    from kc import distributed
    from kc.run import prepare_run

    cfg = _run_config(target, overrides)
    distributed.init_from_env(cfg.device)
    return distributed.main_first(lambda: prepare_run(cfg, progress=progress and distributed.is_main()))


def _refuse_under_torchrun(option: str) -> None:
    from kc import distributed

    if distributed.active():
        raise KCError(f"{option} starts its own processes; under torchrun, leave it out (the ranks share the work)")


def echo(text: str) -> None:
    """Print the command's result once (on rank 0 under torchrun)."""
    from kc import distributed

    if distributed.is_main():
        typer.echo(text)


@app.command("generate-benchmark")
@user_errors
def generate_benchmark_cmd(
    out: Annotated[Path, typer.Argument(help="output directory")],
    preset: Annotated[
        str,
        typer.Option(
            help="tiny | default | large (images); features-1k | features-100k | paper-1k | paper-10k | paper-100k "
            "(precomputed features; paper-*: 20 verticals of unequal sizes, clean labels)"
        ),
    ] = "default",
    verticals: Annotated[int | None, typer.Option()] = None,
    classes_per_vertical: Annotated[int | None, typer.Option()] = None,
    train_per_class: Annotated[int | None, typer.Option()] = None,
    val_per_class: Annotated[int | None, typer.Option()] = None,
    test_per_class: Annotated[int | None, typer.Option()] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    fine_bits: Annotated[int | None, typer.Option(help="texture bits that tell classes of a vertical apart")] = None,
    multilabel_fraction: Annotated[float | None, typer.Option(help="share of images with two objects")] = None,
    label_noise: Annotated[
        float | None, typer.Option(help="share of training labels naming another class of the same vertical")
    ] = None,
    unlabeled_per_class: Annotated[
        int | None,
        typer.Option(help="feature presets: also write this many unlabeled images a class (unlabeled.jsonl)"),
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    no_progress: NoProgress = False,
) -> None:
    """Write the built-in benchmark (PNG images, manifest.csv, taxonomy.json) to OUT."""
    from dataclasses import replace

    from kc.data.benchmark import PRESETS, generate_benchmark
    from kc.data.feature_benchmark import FEATURE_PRESETS, generate_feature_benchmark

    if preset not in PRESETS and preset not in FEATURE_PRESETS:
        raise KCError(f"--preset: '{preset}' is not one of {', '.join([*PRESETS, *FEATURE_PRESETS])}")
    given = {
        k: v
        for k, v in dict(
            verticals=verticals,
            classes_per_vertical=classes_per_vertical,
            train_per_class=train_per_class,
            val_per_class=val_per_class,
            test_per_class=test_per_class,
            image_size=image_size,
            fine_bits=fine_bits,
            multilabel_fraction=multilabel_fraction,
            label_noise=label_noise,
            unlabeled_per_class=unlabeled_per_class,
            seed=seed,
        ).items()
        if v is not None
    }
    if unlabeled_per_class is not None and preset not in FEATURE_PRESETS:
        raise KCError("--unlabeled-per-class applies to the feature presets (features-*, paper-*)")
    if preset in FEATURE_PRESETS:  # precomputed features: only these options apply
        keys = {"verticals", "classes_per_vertical", "train_per_class", "label_noise", "unlabeled_per_class", "seed"}
        if set(given) - keys:
            raise KCError(f"--preset {preset}: takes only {', '.join(sorted(keys))} of the options")
        if (unlabeled_per_class or 0) < 0:
            raise KCError(f"--unlabeled-per-class: {unlabeled_per_class} must be 0 or more")
        manifest = generate_feature_benchmark(out, replace(FEATURE_PRESETS[preset], **given))
        typer.echo(f"wrote {manifest}, {out / 'features.npy'} and {out / 'taxonomy.json'}")
        if unlabeled_per_class:
            typer.echo(f"wrote {out / 'unlabeled.jsonl'}: give it as data.unlabeled")
        typer.echo("train heads on them with model: {backbone: kc_features, backbone_args: {dim: 128}}")
        return
    spec = replace(PRESETS[preset], **given)
    manifest = generate_benchmark(out, spec, progress=bars(no_progress))
    typer.echo(f"wrote {manifest} and {out / 'taxonomy.json'}")


@app.command("import-fashion-mnist")
@user_errors
def import_fashion_mnist_cmd(
    out: Annotated[Path, typer.Argument(help="output directory")],
    source: Annotated[
        Path | None,
        typer.Option(help="folder of the IDX files [default: where `apt-get install dataset-fashion-mnist` puts them]"),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="the draw that halves the official test set into val and test (and --train-per-class)")
    ] = 0,
    train_per_class: Annotated[
        int | None, typer.Option(help="keep only this many training images of each class (a seeded draw)")
    ] = None,
    no_progress: NoProgress = False,
) -> None:
    """Fashion-MNIST (real photographs, 10 classes in 3 verticals) -> PNGs, manifest.csv, taxonomy.json in OUT."""
    from kc.data.fashion_mnist import DEBIAN_DIR, describe, import_fashion_mnist

    manifest = import_fashion_mnist(
        out, source or DEBIAN_DIR, seed, progress=bars(no_progress), train_per_class=train_per_class
    )
    typer.echo(f"wrote {manifest} and {out / 'taxonomy.json'} ({describe(out)} images)")


Triple = tuple[float, float, float]


@app.command("convert-weights")
@user_errors
def convert_weights_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="a checkpoint (.pth/.pt read with weights_only=True, or .safetensors)")
    ],
    out: Annotated[Path, typer.Argument(help="the model folder to write (config.json + model.safetensors)")],
    architecture: Annotated[str, typer.Option(help="the timm architecture the checkpoint is a port of")],
    num_classes: Annotated[
        int | None, typer.Option(help="its classifier's outputs [default: the architecture's]")
    ] = None,
    mean: Annotated[
        tuple[float, float, float] | None, typer.Option(help="input mean it was trained with (0-1 scale)")
    ] = None,
    std: Annotated[
        tuple[float, float, float] | None, typer.Option(help="input std it was trained with (0-1 scale)")
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="input side it was trained at")] = None,
    interpolation: Annotated[str | None, typer.Option(help="bilinear or bicubic")] = None,
    license: Annotated[str | None, typer.Option(help="the weights' licence, recorded in config.json")] = None,
) -> None:
    """A foreign checkpoint -> a model folder in timm's layout, for model.backbone: local-dir:OUT. Every tensor's
    name is mapped and its shape checked; the preprocessing defaults to the architecture's."""
    from kc.models.convert import convert_checkpoint

    if interpolation not in (None, "bilinear", "bicubic"):
        raise KCError(f"--interpolation: '{interpolation}' is not bilinear or bicubic")
    config = convert_checkpoint(
        checkpoint,
        out,
        architecture,
        num_classes=num_classes,
        mean=mean,
        std=std,
        input_size=input_size,
        interpolation=interpolation,
        license=license,
    )
    cfg = config["pretrained_cfg"]
    typer.echo(
        f"wrote {out}: {config['architecture']}, {config['num_classes']} classes, tensors paired by "
        f"{config['converted_from']['paired_by']}; input {cfg.get('input_size')}, mean {cfg.get('mean')}, "
        f"std {cfg.get('std')}\nuse it with model: {{backbone: 'local-dir:{out}'}}"
    )


@app.command("import-openimages")
@user_errors
def import_openimages_cmd(
    labels: Annotated[list[str], typer.Option(help="image-level labels CSV, optionally PATH:SPLIT (repeatable)")],
    descriptions: Annotated[Path, typer.Option(help="class descriptions CSV (LabelName,DisplayName)")],
    hierarchy: Annotated[Path, typer.Option(help="label hierarchy JSON")],
    images: Annotated[Path, typer.Option(help="folder holding <ImageID><ext>")],
    out: Annotated[Path, typer.Option(help="where taxonomy.json and manifest.jsonl go")],
    vertical_depth: Annotated[int, typer.Option(min=1, help="verticals = hierarchy nodes at this depth")] = 1,
    vertical: Annotated[list[str] | None, typer.Option(help="or these nodes as verticals (repeatable)")] = None,
    image_ext: Annotated[str, typer.Option(help="image file suffix")] = ".jpg",
) -> None:
    """Open Images format (labels, descriptions, hierarchy) -> kc's taxonomy.json + manifest.jsonl."""
    from kc.data.openimages import import_openimages

    files = []
    for item in labels:
        path, sep, split = item.rpartition(":")
        if not sep or split not in ("train", "val", "test"):
            path, split = item, ""
        files.append((Path(path), split or None))
    r = import_openimages(files, descriptions, hierarchy, images, out, vertical_depth, vertical, image_ext)
    dropped = sum(r.dropped_labels.values())
    typer.echo(
        f"{r.images:,} images, {r.positives:,} present and {r.negatives:,} verified-absent labels -> {out}; "
        f"dropped {dropped:,} annotations of {len(r.dropped_labels):,} labels outside the verticals, "
        f"{r.missing_images:,} images not found in {images}"
    )
    typer.echo(f"use it with data: {{manifest: {out / 'manifest.jsonl'}, taxonomy: {out / 'taxonomy.json'}}}")


@app.command("make-shards")
@user_errors
def make_shards_cmd(
    config: Annotated[Path, typer.Argument(help="config whose data section names the images (manifest or folder)")],
    out: Annotated[Path, typer.Option(help="folder to write the shards, taxonomy.json and shards.json to")],
    shard_size: Annotated[int, typer.Option(min=1, help="images per shard")] = 1000,
    prefix: Annotated[str, typer.Option(help="shard file names: PREFIX-000000.tar, ...")] = "shard",
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Write the config's images into WebDataset tar shards, with labels and seeded splits; train from them with
    data: {shards: OUT}. Re-run to finish an interrupted conversion."""
    from tqdm import tqdm

    from kc.data.shards import write_shards
    from kc.data.sources import load_source
    from kc.data.splits import assign_splits

    cfg = _load(config, set_)
    taxonomy, samples, image_root = load_source(cfg.data)
    # The split is decided here, by the config's fractions and seed, and stored: a run from the shards keeps it.
    samples = assign_splits(samples, cfg.data.split.val, cfg.data.split.test, cfg.seed)
    total = -(-len(samples) // shard_size)
    with tqdm(total=total, desc="writing shards", unit="shard", disable=not bars(no_progress)) as bar:
        index = write_shards(samples, taxonomy, image_root, out, shard_size, prefix, on_shard=lambda _: bar.update())
    typer.echo(f"wrote {len(index['shards'])} shards ({index['images']:,} images) and shards.json to {out}")
    typer.echo(f"use them with data: {{shards: {out.resolve()}}}")


@app.command("check-data")
@user_errors
def check_data_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML)")],
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Report every problem of the config's dataset at once (taxonomy, manifest rows, images, coverage)."""
    from kc.data.check import check_data, report_text

    report = check_data(_load(config, set_), progress=bars(no_progress))
    typer.echo(report_text(report))
    if not report.ok:
        raise typer.Exit(2)


@app.command("generalist")
@user_errors
def generalist_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory")],
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Train the generalist (all classes, ground-truth loss). Resumes an interrupted run; skips a finished one."""
    from kc.train.generalist import train_generalist

    run = _open_distributed_run(config, set_, bars(no_progress))
    result = train_generalist(run, progress=bars(no_progress))
    echo(f"generalist: best epoch {result.best_epoch}, val mAP {result.best_metric}; weights {result.best_weights}")


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory")],
    stage: Annotated[str, typer.Option(help="which stage's best checkpoint")] = "generalist",
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Score a trained stage: mAP, per-vertical AP, mean per-vertical AP; writes metrics_<split>.json."""
    from kc.evaluate.report import metrics_table
    from kc.evaluate.stage import evaluate_stage

    if split not in ("train", "val", "test"):
        raise KCError(f"--split: '{split}' is not one of train, val, test")
    run = _open_distributed_run(config, set_, bars(no_progress))
    metrics = evaluate_stage(run, stage, split, progress=bars(no_progress))
    echo(f"\n{stage} on {split} ({metrics['images']} images):\n")
    echo(metrics_table(metrics, run.taxonomy))


@app.command("specialists")
@user_errors
def specialists_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory")],
    only: Annotated[str | None, typer.Option(help="train only this vertical's specialist")] = None,
    shard: Annotated[
        str | None, typer.Option(help="I/N: train the specialists of verticals v with v % N == I (split the work)")
    ] = None,
    jobs: Annotated[int, typer.Option(min=1, help="train in N local processes at once (one shard each)")] = 1,
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Train one specialist per vertical from the generalist. Skips finished ones, resumes an interrupted one."""
    from kc.jobs import run_shard_jobs
    from kc.train.specialists import train_specialists

    run = _open_distributed_run(config, set_, bars(no_progress))
    if jobs > 1:
        _refuse_under_torchrun("--jobs")
        run_shard_jobs(run, "specialists", jobs, set_)
        return
    for vertical, result in train_specialists(run, only, shard, progress=bars(no_progress)).items():
        echo(f"specialist {vertical}: best epoch {result.best_epoch}, val mAP {result.best_metric}")


@app.command("distill")
@user_errors
def distill_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory")],
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Train the student from the generalist, taught by the specialists each image's labels select."""
    from kc.train.student import train_student

    run = _open_distributed_run(config, set_, bars(no_progress))
    result = train_student(run, progress=bars(no_progress))
    echo(f"student: best epoch {result.best_epoch}, val mAP {result.best_metric}; weights {result.best_weights}")


@app.command("cache-targets")
@user_errors
def cache_targets_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory")],
    top_k: Annotated[
        int | None, typer.Option(min=1, help="logits kept per image and teacher (default: student.top_k)")
    ] = None,
    shard: Annotated[str | None, typer.Option(help="I/N: only the teachers of verticals v with v % N == I")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="build in N local processes at once (one shard each)")] = 1,
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Run each specialist once over its vertical's training images and store its top-K logits (RUN/cache)."""
    from kc.distill.cache_format import cache_bytes, cache_dir, write_index
    from kc.jobs import run_shard_jobs
    from kc.train.specialists import shard_verticals
    from kc.train.student import cache_targets

    run = _open_distributed_run(config, set_, bars(no_progress))
    if jobs > 1:
        _refuse_under_torchrun("--jobs")
        run_shard_jobs(run, "cache-targets", jobs, set_, ("--top-k", str(top_k)) if top_k else ())
        index = write_index(run)
    else:
        verticals = shard_verticals(run, shard) if shard else None
        index = cache_targets(run, top_k, progress=bars(no_progress), verticals=verticals)
    pairs = sum(s["images"] for s in index["shards"].values())
    size = cache_bytes(run)
    echo(
        f"cache: {len(index['shards'])} teachers, {pairs:,} (image, teacher) pairs, top {index['top_k']}, "
        f"{size / 2**20:.1f} MiB ({size / max(1, len(run.splits['train'])):,.0f} bytes per training image) "
        f"in {cache_dir(run)}"
    )


@app.command("control")
@user_errors
def control_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory")],
    kind: Annotated[
        str | None,
        typer.Option(
            help="only this control: same_compute | self_distillation | ground_truth | total_compute | "
            "ground_truth_labelled | self_training"
        ),
    ] = None,
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Train the controls: same compute, self-distillation, ground truth with the student's head, total compute,
    and with unlabeled images the ground truth on the labelled images only and self-training from it (config
    `controls.kinds`, or --kind)."""
    from kc.config import CONTROL_KINDS
    from kc.stages import STAGES, controls_to_train
    from kc.train.controls import TRAIN

    if kind is not None and kind not in CONTROL_KINDS:
        raise KCError(f"--kind: '{kind}' is not one of {', '.join(CONTROL_KINDS)}")
    run = _open_distributed_run(config, set_, bars(no_progress))
    stages = controls_to_train(run) if kind is None else [s.name for s in STAGES if s.control == kind]
    if not stages:
        echo("no control to train (control: false, or controls.kinds is empty)")
    for stage in stages:
        result = TRAIN[stage](run, progress=bars(no_progress))
        echo(f"{stage}: best epoch {result.best_epoch}, val mAP {result.best_metric}; weights {result.best_weights}")


@app.command("report")
@user_errors
def report_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory")],
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Score every trained model side by side; write RUN/report.md, report.html (with plots) and metrics.json."""
    from kc import distributed
    from kc.evaluate.report import comparison_table
    from kc.pipeline import compare_run, write_report

    run = _open_distributed_run(config, set_, bars(no_progress))
    result = compare_run(run, progress=bars(no_progress))
    distributed.on_main(lambda: write_report(run, result))
    echo(comparison_table(result))
    echo(f"\nreport: {run.dir / 'report.md'}")


@app.command("describe")
@user_errors
def describe_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory")],
    set_: SetOption = None,
) -> None:
    """Parameters of backbone and head of every model of the run, and of each head structure at its sizes."""
    from kc.data.samples import load_image_folder
    from kc.models.accounting import accounting_tables, parameter_accounting
    from kc.taxonomy import Taxonomy

    prepared = config / "taxonomy.json" if config.is_dir() else None
    cfg = _load(config / "config.yaml" if config.is_dir() else config, set_)
    if prepared is not None and prepared.is_file():
        taxonomy = Taxonomy.load(prepared)
    elif cfg.data.taxonomy is not None:
        taxonomy = Taxonomy.load(cfg.data.taxonomy)
    else:
        assert cfg.data.image_folder is not None
        taxonomy, _ = load_image_folder(cfg.data.image_folder)
    typer.echo(accounting_tables(parameter_accounting(cfg, taxonomy)))


@app.command("bench")
@user_errors
def bench_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished run (generalist and specialists trained)")],
    repeats: Annotated[int, typer.Option(min=1, help="inference repeats (medians)")] = 5,
    rounds: Annotated[int, typer.Option(min=1, help="training epochs per setup (medians)")] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the figures as JSON")] = None,
) -> None:
    """Student vs generalist vs ensemble speed, cached vs online training, head cost, step memory: ratios."""
    from kc.bench import bench, bench_table
    from kc.io import atomic_write_json

    run = _open_run(run_dir, None, progress=False)
    result = bench(run, repeats, rounds)
    typer.echo(bench_table(result))
    if json_out is not None:
        atomic_write_json(json_out, result)


@app.command("ablate")
@user_errors
def ablate_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory with generalist and specialists")],
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="student seeds (repeatable; default 0)")] = None,
    variants: Annotated[
        list[str] | None,
        typer.Option("--variant", help="train only this variant, by slug, e.g. fc-sc_vertical_centred (repeatable)"),
    ] = None,
    set_: SetOption = None,
) -> None:
    """The paper's ablation on this run's teachers: distillation, + self-paced, + FC-SC, + both, each beside its
    same-compute and ground-truth controls; one table."""
    from kc.ablate import ablate, ablation_table

    run = _open_run(config, set_, progress=False)
    result = ablate(run, seeds or [0], variants=variants)
    typer.echo("\n" + ablation_table(result))
    typer.echo(f"\ntable: {run.dir / 'ablation' / 'ablation.md'}")


@app.command("discover-verticals")
@user_errors
def discover_verticals_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory with a trained generalist")],
    verticals: Annotated[int, typer.Option("--verticals", "-k", min=1, help="how many verticals to form")],
    out: Annotated[Path, typer.Option(help="taxonomy file to write (.json)")] = Path("discovered_taxonomy.json"),
    balanced: Annotated[bool, typer.Option(help="cap every vertical at ceil(classes / k) classes")] = False,
    split: Annotated[str, typer.Option(help="held-out images to predict on: val or test")] = "val",
    seed: Annotated[int, typer.Option()] = 0,
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Group classes into verticals by how the generalist's predictions co-vary; write a taxonomy file."""
    import numpy as np

    from kc.discover import agreement, class_embeddings, grouped_taxonomy, spherical_kmeans
    from kc.distributed import resolve_device
    from kc.evaluate.predict import predict_batches
    from kc.stages import GENERALIST, load_stage, new_model

    run = _open_run(config, set_, bars(no_progress))
    samples = run.splits.get(split) or []
    if not samples:
        raise KCError(f"--split: the run's '{split}' split is empty; use val or test")
    if out.suffix != ".json":
        raise KCError(f"--out {out}: write a .json taxonomy file")
    model = load_stage(run.stage_dir(GENERALIST), new_model(run, GENERALIST))
    C = run.taxonomy.num_classes
    probs = (
        scores
        for scores, _, _ in predict_batches(
            model,
            samples,
            run.image_root,
            run.cfg.data,
            C,
            batch_size=run.cfg.generalist.eval_batch_size,
            device=resolve_device(run.cfg.device),
            progress=bars(no_progress),
        )
    )
    labels = spherical_kmeans(class_embeddings(probs, C, seed=seed), verticals, balanced=balanced, seed=seed)
    taxonomy = grouped_taxonomy(run.taxonomy, labels)
    taxonomy.save(out)
    sizes = np.bincount(labels, minlength=verticals)
    typer.echo(
        f"{C} classes in {len(set(labels.tolist()))} verticals (sizes: min {sizes.min()}, median "
        f"{int(np.median(sizes))}, max {sizes.max()}); agreement with the run's verticals "
        f"{100 * agreement(labels, run.taxonomy.vertical_of_class):.1f}% -> {out}"
    )


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="run directory (or its config)")],
    format_: Annotated[
        str, typer.Option("--format", help="onnx | torchscript | hub (timm's layout: config.json, model.safetensors)")
    ] = "onnx",
    stage: Annotated[str, typer.Option(help="student | generalist | control")] = "student",
    out: Annotated[Path | None, typer.Option(help="artifact directory (default: RUN/export/<stage>-<format>)")] = None,
    parity_images: Annotated[int, typer.Option(help="test images the export is checked on")] = 1024,
    tolerance: Annotated[float, typer.Option(help="largest allowed abs logit difference from PyTorch")] = 1e-4,
    license: Annotated[
        str, typer.Option(help="the model card's licence (hub format; the Hub's identifiers)")
    ] = "other",
) -> None:
    """Export a trained model with its label table, preprocessing and model card, checked against PyTorch."""
    from kc.serve.export import export_stage

    run = _open_run(run_dir, None, progress=False)
    target = out or run.dir / "export" / f"{stage}-{format_}"
    manifest = export_stage(run, target, format_, stage, parity_images, tolerance, license)
    parity = manifest["parity"]
    typer.echo(
        f"exported {stage} as {format_} to {target} (max abs logit difference from PyTorch "
        f"{parity['max_abs_logit_difference']:.2g} on {parity['images']} images)"
    )


@app.command("predict")
@user_errors
def predict_cmd(
    model: Annotated[Path, typer.Argument(help="export directory (kc export) or run directory")],
    images: Annotated[list[Path], typer.Argument(help="image files, folders, or manifests (.csv/.jsonl, 'path')")],
    top_k: Annotated[int, typer.Option(min=1, help="labels per image")] = 5,
    threshold: Annotated[float, typer.Option(min=0, max=1, help="only labels scoring at least this")] = 0.0,
    thresholds: Annotated[Path | None, typer.Option(help="JSON {class_id: threshold}, per class")] = None,
    vertical: Annotated[list[str] | None, typer.Option(help="only labels of this vertical (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option(help="write .jsonl or .csv instead of printing")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    stage: Annotated[str, typer.Option(help="for a run directory: which model")] = "student",
    no_progress: NoProgress = False,
) -> None:
    """Top-k labels per image, with scores, verticals and hierarchy paths. Exit 1 if any image was unreadable."""
    from kc.io import read_json
    from kc.serve.labels import LabelPicker
    from kc.serve.predict_files import collect_images, format_line, predict_images, write_records
    from kc.serve.runtime import open_model

    loaded = open_model(model, stage)
    picker = LabelPicker(loaded.taxonomy, read_json(thresholds) if thresholds else None)
    paths = collect_images(images)
    records = []
    for record in predict_images(
        loaded,
        paths,
        picker,
        top_k=top_k,
        threshold=threshold,
        verticals=vertical,
        batch_size=batch_size,
        progress=bars(no_progress) and out is not None,
    ):
        records.append(record)
        if out is None:
            typer.echo(format_line(record))
    failed = sum("error" in r for r in records)
    if out is not None:
        write_records(records, out)
        typer.echo(f"{len(records) - failed} images labelled -> {out}", err=True)
    if failed:
        typer.echo(f"kc: {failed} of {len(records)} images could not be read (see their 'error')", err=True)
        raise typer.Exit(1)


@app.command("serve")
@user_errors
def serve_cmd(
    model: Annotated[Path, typer.Argument(help="export directory (kc export) or run directory")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    stage: Annotated[str, typer.Option(help="for a run directory: which model")] = "student",
    max_batch: Annotated[int, typer.Option(min=1, help="images per model batch")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="wait for more images after the first")] = 5.0,
    max_pending: Annotated[int, typer.Option(min=1, help="requests admitted at once; more get 503")] = 64,
    max_upload_mb: Annotated[float, typer.Option(help="largest request body")] = 10.0,
    max_pixels: Annotated[int, typer.Option(help="largest image (width x height)")] = 40_000_000,
    max_decode_mb: Annotated[
        float, typer.Option(help="memory for images being decoded, all requests together; more wait, then 503")
    ] = 512.0,
    decode_threads: Annotated[int, typer.Option(min=1, help="threads decoding images")] = 2,
    thresholds: Annotated[Path | None, typer.Option(help="JSON {class_id: threshold}, per class")] = None,
    threads: Annotated[int | None, typer.Option(help="model threads (default: torch's)")] = None,
) -> None:
    """Serve the model over HTTP: POST /v1/classify, GET /v1/labels, /healthz, /metrics, /docs."""
    from kc.io import read_json
    from kc.serve.app import ServerLimits, serve
    from kc.serve.runtime import open_model

    loaded = open_model(model, stage, threads)
    limits = ServerLimits(
        max_batch,
        max_wait_ms,
        max_pending,
        int(max_upload_mb * 2**20),
        max_pixels,
        max_decode_bytes=int(max_decode_mb * 2**20),
        decode_threads=decode_threads,
    )
    typer.echo(f"kc serve: {loaded.description} on http://{host}:{port} (docs at /docs)", err=True)
    typer.echo(f"kc serve: memory bound by the limits: {limits.memory_bound()}", err=True)
    serve(loaded, host, port, limits, read_json(thresholds) if thresholds else None)


@app.command("pipeline")
@user_errors
def pipeline_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML) or run directory")],
    specialist_jobs: Annotated[
        int, typer.Option(min=1, help="train the specialists in N local processes at once (one per GPU if several)")
    ] = 1,
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """generalist -> specialists -> student -> controls -> report. Re-run the same command to resume."""
    from kc.evaluate.report import comparison_table
    from kc.pipeline import run_pipeline

    run = _open_distributed_run(config, set_, bars(no_progress))
    if specialist_jobs > 1:
        _refuse_under_torchrun("--specialist-jobs")
    result = run_pipeline(run, progress=bars(no_progress), specialist_jobs=specialist_jobs, overrides=set_)
    echo(comparison_table(result))
    echo(f"\nreport: {run.dir / 'report.md'}")


@app.command("seeds")
@user_errors
def seeds_cmd(
    config: Annotated[Path, typer.Argument(help="run config (YAML); each seed runs in RUN/seed_<n>")],
    seed: Annotated[list[int], typer.Option(help="a whole-pipeline seed (repeat: --seed 0 --seed 1 --seed 2)")],
    generate: Annotated[
        str | None,
        typer.Option(
            help="a benchmark preset, or fashion-mnist: each seed makes its own draw (else the config's data)"
        ),
    ] = None,
    label_noise: Annotated[
        float | None,
        typer.Option(help="with --generate: share of training labels naming another class of the vertical"),
    ] = None,
    train_per_class: Annotated[
        int | None,
        typer.Option(help="with --generate: training images per class of each seed's draw (else the preset's)"),
    ] = None,
    unlabeled_per_class: Annotated[
        int | None,
        typer.Option(help="with --generate of a feature preset: unlabeled images a class, set as data.unlabeled"),
    ] = None,
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """The whole pipeline once per seed (benchmark draw, split, generalist, specialists, student, controls);
    mean ± std over seeds, the student's paired differences and wins; RUN/seeds.md and seeds.json."""
    from kc.seeds import run_seeds, seeds_table

    summary = run_seeds(
        config,
        seed,
        generate,
        set_,
        label_noise=label_noise,
        train_per_class=train_per_class,
        unlabeled_per_class=unlabeled_per_class,
        progress=bars(no_progress),
        echo=typer.echo,
    )
    echo(seeds_table(summary))


@app.command("seeds-summary")
@user_errors
def seeds_summary_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories, one per seed, each scored by `kc report`")],
    out: Annotated[Path, typer.Option(help="where seeds.md and seeds.json are written")],
) -> None:
    """`kc seeds`' summary of runs made one by one: mean ± std over seeds, the student's paired differences and
    wins, from each RUN/metrics.json (its seed read from its config)."""
    from kc.seeds import seeds_table, summarise_runs

    echo(seeds_table(summarise_runs(run_dirs, out)))


@app.command("demo")
@user_errors
def demo_cmd(
    run_dir: Annotated[Path, typer.Option(help="where the demo writes its data and run")] = Path("runs/demo"),
    preset: Annotated[str, typer.Option(help="benchmark size: tiny | default | large")] = "default",
    set_: SetOption = None,
    no_progress: NoProgress = False,
) -> None:
    """Generate the built-in benchmark and run the whole pipeline on it; print the comparison table."""
    from kc.demo import run_demo

    run_demo(run_dir, preset, set_ or [], progress=bars(no_progress), echo=typer.echo)


def main() -> None:
    flush_subnormals_in_this_process()  # first: torch's worker threads, started later, flush too (kc.numerics)
    app()


if __name__ == "__main__":
    main()
