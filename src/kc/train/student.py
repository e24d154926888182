"""The student: the generalist's architecture and weights, distilled from the specialists each image selects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kc import distributed
from kc.config import SelfPacedConfig, StudentConfig
from kc.data.dataset import dense_targets
from kc.distill.cache import build_cache
from kc.distill.cache_format import INDEX, cache_dir, write_index
from kc.distill.cached_teachers import CachedTeachers
from kc.distill.loss import distillation_terms
from kc.distill.sampled import SampledVerticalsLoss
from kc.distill.targets import GeneralistTeacher, OnlineTeachers, Teachers
from kc.distributed import resolve_device
from kc.run import Run
from kc.stages import (
    GENERALIST,
    SELF_DISTILLATION,
    SELF_TRAINING,
    STUDENT,
    best_weights,
    file_digest,
    load_stage,
    new_generalist_model,
    training_fold_of,
)
from kc.taxonomy import Taxonomy
from kc.train.common import fit_stage, start_from_generalist, validation_fn
from kc.train.teacher_choice import (
    fold_teachers,
    load_reference,
    online_teachers,
    require_reference,
    teacher_digests,
)
from kc.train.trainer import LossFn, TrainResult
from kc.train.unlabeled import fold_of_student_samples, student_training_samples, unlabeled_fingerprint


def student_loss(
    s: StudentConfig,
    num_classes: int,
    teachers: Teachers,
    vertical_weights: torch.Tensor,
    device: torch.device,
    labelled_images: int | None = None,
) -> LossFn:
    """The distillation loss over every class, or over sampled verticals (student.sampled_verticals). Training
    indices from `labelled_images` on are unlabeled images: their label (the generalist's top class) only chose their
    teacher, so it never enters the loss as truth (student.ground_truth max or weighted)."""
    vertical_weights = vertical_weights.to(device)  # constant per run: placed on the device once, not per batch

    if s.sampled_verticals is not None:
        return SampledVerticalsLoss(
            teachers,
            vertical_weights,
            s.sampled_verticals,
            mode=s.ground_truth,
            truth_weight=s.ground_truth_weight,
            temperature=s.temperature,
            unselected=s.unselected,
            labelled_images=labelled_images,
        ).terms

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["images"], batch["labels"]
        soft = teachers(images, labels, batch["index"])
        truth = dense_targets(labels, num_classes)
        has_truth = None if labelled_images is None else batch["index"].to(images.device) < labelled_images
        return distillation_terms(
            model(images),
            soft,
            truth,
            teachers.vertical_of_class,  # the teachers' copy, already on their device
            vertical_weights,
            mode=s.ground_truth,
            truth_weight=s.ground_truth_weight,
            temperature=s.temperature,
            has_truth=has_truth,
        )

    return loss


def scale_scalars(self_paced: SelfPacedConfig, taxonomy: Taxonomy) -> Callable[[nn.Module], dict[str, float]] | None:
    """The self-paced scale of each vertical, for TensorBoard and the training history."""
    if self_paced.variant == "none":
        return None
    ids = [v.id for v in taxonomy.verticals]

    def scalars(model: nn.Module) -> dict[str, float]:
        values = model.output_scales.per_vertical_scale().tolist()
        return {f"gamma/{vid}": value for vid, value in zip(ids, values, strict=True)}

    return scalars


def scale_training(self_paced: SelfPacedConfig, taxonomy: Taxonomy) -> dict[str, Any]:
    """What the trainer of a stage with the student's self-paced scales is given: their learning-rate multiplier
    (the scales are the model's `output_scales`) and their per-vertical values for the logs."""
    return {
        "scalars": scale_scalars(self_paced, taxonomy),
        "lr_multipliers": {"output_scales.": self_paced.lr_multiplier},
    }


def cache_targets(
    run: Run, top_k: int | None = None, progress: bool = True, verticals: list[int] | None = None
) -> dict:
    """`kc cache-targets`: run every vertical's teacher (or those of `verticals`) once over the vertical's images
    among the student's training images; keep its top-K logits. The teacher is the vertical's specialist, or under
    `student.teacher_choice: better_on_val` possibly the labelled-only control's block (`kc.train.teacher_choice`).
    Under torchrun each rank builds every world_size-th of them."""
    device = resolve_device(run.cfg.device)
    digests = teacher_digests(run)
    chosen = list(range(run.taxonomy.num_verticals) if verticals is None else verticals)
    chosen = chosen[distributed.rank() :: distributed.world_size()]
    build_cache(
        run,
        student_training_samples(run),
        fold_teachers(run, chosen),
        digests,
        top_k=top_k or run.cfg.student.top_k,
        device=device,
        fold_of=fold_of_student_samples(run, training_fold_of(run)),
        batch_size=run.cfg.student.eval_batch_size,
        progress=progress and distributed.is_main(),
        verticals=chosen,
    )
    distributed.barrier()  # every rank's shards are written
    return distributed.on_main(lambda: write_index(run))


def teacher_mode(run: Run) -> str:
    """online or cache: student.teachers, with auto resolved by whether RUN/cache holds a cache."""
    mode = run.cfg.student.teachers
    if mode == "auto":  # cross-fitted teachers (specialists.folds > 1) are read from the cache only
        has_cache = (cache_dir(run) / INDEX).is_file() or run.cfg.specialists.folds > 1
        return "cache" if has_cache else "online"
    return mode


def train_student(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Callable[[int], None] | None = None
) -> TrainResult:
    """The student, taught by the specialists its images select (online, or from the soft-target cache)."""
    scfg = run.cfg.student
    device = resolve_device(run.cfg.device)
    mode = teacher_mode(run)
    digests = teacher_digests(run)
    if mode == "cache":
        samples = student_training_samples(run)
        teachers: Teachers = CachedTeachers(run, samples, digests, scfg.top_k, scfg.temperature, scfg.unselected).to(
            device
        )
    else:
        teachers = OnlineTeachers(online_teachers(run), run.taxonomy, scfg.top_k, scfg.temperature, scfg.unselected).to(
            device
        )
    inputs = file_digest(best_weights(run.stage_dir(GENERALIST))) + "".join(digests) + mode
    return train_distilled(run, STUDENT, teachers, inputs, progress=progress, verbose=verbose, on_step=on_step)


def train_self_distillation(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Callable[[int], None] | None = None
) -> TrainResult:
    """The self-distillation control: the student's exact recipe (head, scales, loss, epochs, top-K) with the
    generalist as the only teacher, each image's verticals selecting blocks of the generalist's own outputs. What
    the student gains over it is what the specialists teach."""
    scfg = run.cfg.student
    device = resolve_device(run.cfg.device)
    generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run))
    teachers = GeneralistTeacher(generalist, run.taxonomy, scfg.top_k, scfg.temperature, scfg.unselected).to(device)
    inputs = file_digest(best_weights(run.stage_dir(GENERALIST))) + "generalist-teacher"
    return train_distilled(
        run, SELF_DISTILLATION, teachers, inputs, progress=progress, verbose=verbose, on_step=on_step
    )


def train_self_training(
    run: Run, *, progress: bool = True, verbose: bool = True, on_step: Callable[[int], None] | None = None
) -> TrainResult:
    """The self-training control: the student's exact recipe with the labelled-only control (the student's head
    and scales trained on the labelled images alone, `control_ground_truth_labelled`) as the only teacher, on the
    labelled and unlabeled images. Under `teacher_choice: better_on_val` it is the student with every vertical
    taught by the labels, so what the student gains over it is what the chosen specialists teach; without it, what
    the specialists teach beyond the labels' own model."""
    scfg = run.cfg.student
    device = resolve_device(run.cfg.device)
    weights = require_reference(run, "it is the self-training control's teacher")
    teachers = GeneralistTeacher(load_reference(run), run.taxonomy, scfg.top_k, scfg.temperature, scfg.unselected)
    inputs = file_digest(best_weights(run.stage_dir(GENERALIST))) + file_digest(weights) + "labelled-control-teacher"
    return train_distilled(
        run, SELF_TRAINING, teachers.to(device), inputs, progress=progress, verbose=verbose, on_step=on_step
    )


def train_distilled(
    run: Run,
    stage: str,
    teachers: Teachers,
    inputs: str,
    *,
    progress: bool,
    verbose: bool,
    on_step: Callable[[int], None] | None,
) -> TrainResult:
    """The student's recipe (student.*) taught by `teachers` on the student's training images (labelled, then any
    routed unlabeled ones); `inputs` says what the teachers were made from."""
    cfg, scfg = run.cfg, run.cfg.student
    device = resolve_device(cfg.device)
    # Starts as the generalist (backbone, head in the student's structure), the output scales on top.
    model = start_from_generalist(run, stage)
    # Equal, fixed weights per vertical: the interface through which pacing strategies plug in.
    vertical_weights = torch.ones(run.taxonomy.num_verticals)
    loss = student_loss(
        scfg,
        run.taxonomy.num_classes,
        teachers,
        vertical_weights,
        device,
        labelled_images=len(run.splits["train"]) if run.unlabeled else None,
    )
    return fit_stage(
        run,
        name=stage,
        stage_dir=run.stage_dir(stage),
        model=model,
        tcfg=scfg,
        samples=student_training_samples(run),
        loss=loss,
        validate=validation_fn(run, device, scfg.eval_batch_size),
        seed=scfg.stage_seed(cfg.seed),
        fingerprint=run.taxonomy.fingerprint() + inputs + unlabeled_fingerprint(run),
        progress=progress,
        verbose=verbose,
        on_step=on_step,
        **scale_training(scfg.self_paced, run.taxonomy),
    )
