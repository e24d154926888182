"""The stages of a run, defined once: each full-vocabulary stage's name, directory, architecture, activation and
training targets (`STAGES`), where every stage keeps its weights, and how a stage's model is built and loaded.

The pipeline, `kc report`, `kc evaluate`, export and the serving runtime read this table; a new control is one
more entry. How each stage trains is `kc.train`'s (`kc.train.controls.TRAIN`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kc.checkpoint import CheckpointDir
from kc.config import ModelConfig, SelfPacedConfig, StudentConfig, StudentHeadConfig, student_hidden
from kc.data.splits import training_folds
from kc.errors import CheckpointError
from kc.io import read_json, sha256_file
from kc.models.classifier import Classifier, LogitMean, build_classifier
from kc.models.heads import widened
from kc.models.self_paced import SelfPacedScales
from kc.models.structured import StructuredHead
from kc.models.weights import load_weights
from kc.run import Run

GENERALIST, STUDENT, CONTROL = "generalist", "student", "control"
SELF_DISTILLATION, GROUND_TRUTH, TOTAL_COMPUTE, GROUND_TRUTH_LABELLED, SELF_TRAINING = (
    "control_self_distillation",
    "control_ground_truth",
    "control_total_compute",
    "control_ground_truth_labelled",
    "control_self_training",
)


@dataclass(frozen=True)
class FullModelStage:
    """A stage whose model covers every class: its directory (RUN/<name>), its row in the comparison, its model
    (the generalist's architecture, or with the student's head, or with the student's head and self-paced scales)
    and its training targets (the ground truth, with the generalist's loss, or a teacher's soft targets); whether it
    trains on the run's unlabeled images too (data.unlabeled: the student and every control but one do)."""

    name: str
    title: str
    student_head: bool
    scales: bool
    ground_truth: bool
    control: str | None = None  # its name in config `controls.kinds`, for a control
    unlabeled: bool = True  # trains on the routed unlabeled images as well as the training split


# Every full-vocabulary stage, in the order the pipeline trains them and the comparison lists them. The controls
# are what a student's gain must beat: (a) extra training, (b) distillation from the generalist itself, (c) the
# student's head and scales trained on labels, (d) the compute of generalist + specialists + student together;
# with unlabeled images, on which the others self-train, (c) again on the labelled images only, and (e) the
# student's recipe taught by that labelled-only control alone: what the specialists add to self-training.
STAGES = (
    FullModelStage(GENERALIST, "generalist", student_head=False, scales=False, ground_truth=True, unlabeled=False),
    FullModelStage(STUDENT, "student", student_head=True, scales=True, ground_truth=False),
    FullModelStage(
        CONTROL, "control: same compute", student_head=True, scales=False, ground_truth=True, control="same_compute"
    ),
    FullModelStage(
        SELF_DISTILLATION,
        "control: self-distillation",
        student_head=True,
        scales=True,
        ground_truth=False,
        control="self_distillation",
    ),
    FullModelStage(
        GROUND_TRUTH,
        "control: ground truth, student's head",
        student_head=True,
        scales=True,
        ground_truth=True,
        control="ground_truth",
    ),
    FullModelStage(
        TOTAL_COMPUTE,
        "control: total compute",
        student_head=True,
        scales=False,
        ground_truth=True,
        control="total_compute",
    ),
    FullModelStage(
        GROUND_TRUTH_LABELLED,
        "control: ground truth, student's head, labelled images only",
        student_head=True,
        scales=True,
        ground_truth=True,
        control="ground_truth_labelled",
        unlabeled=False,
    ),
    FullModelStage(
        SELF_TRAINING,
        "control: self-training (the labelled-only control as the only teacher)",
        student_head=True,
        scales=True,
        ground_truth=False,
        control="self_training",
    ),
)
STAGE = {s.name: s for s in STAGES}
FULL_MODEL_STAGES = tuple(STAGE)


def activation(stage: str, generalist_loss: str) -> str:
    """How a full-vocabulary stage's logits become scores: softmax for a model trained on the generalist's softmax
    loss, sigmoid otherwise (soft targets are per-class probabilities)."""
    return "softmax" if STAGE[stage].ground_truth and generalist_loss == "softmax" else "sigmoid"


def controls_to_train(run: Run) -> list[str]:
    """The controls this run trains, in the table's order. The ground-truth control equals the same-compute control
    when the student has no self-paced scales (same head, init, loss and epochs), so it is then left out."""
    if not run.cfg.control:
        return []
    kinds = set(run.cfg.controls.kinds)
    if run.cfg.student.self_paced.variant == "none":
        kinds.discard("ground_truth")
    if not run.unlabeled:  # without unlabeled images it is the ground_truth control (or same_compute)
        kinds -= {"ground_truth_labelled", "self_training"}  # the latter's teacher is the former
    if "self_training" in kinds:  # its teacher, trained before it (the table's order)
        kinds.add("ground_truth_labelled")
    return [s.name for s in STAGES if s.control in kinds]


def specialist_dir(run: Run, vertical: int, fold: int | None = None) -> Path:
    """RUN/specialists/<index>_<vertical id>, the id made safe for a file name (Open Images ids hold '/'); a
    cross-fitted specialist (specialists.folds > 1) in its fold_<f> below it."""
    vid = run.taxonomy.verticals[vertical].id
    base = run.dir / "specialists" / f"{vertical:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', vid)}"
    return base if fold is None else base / f"fold_{fold}"


def specialist_dirs(run: Run, vertical: int) -> list[Path]:
    """The directories of a vertical's specialists: one, or one per fold."""
    folds = run.cfg.specialists.folds
    return [specialist_dir(run, vertical)] if folds == 1 else [specialist_dir(run, vertical, f) for f in range(folds)]


def training_fold_of(run: Run) -> list[int]:
    """The fold of each training image (`kc.data.splits.training_folds`): cross-fitted specialist f trains without
    fold f, and teaches the images of fold f. All 0 without folds."""
    train, scfg = run.splits["train"], run.cfg.specialists
    return training_folds(train, scfg.folds, scfg.stage_seed(run.cfg.seed)) if scfg.folds > 1 else [0] * len(train)


def specialist_digest(run: Run, vertical: int) -> str:
    """What the student and the cache record of a vertical's specialists' weights (every fold's)."""
    return "".join(file_digest(best_weights(d)) for d in specialist_dirs(run, vertical))


def best_weights(stage_dir: Path) -> Path:
    return stage_dir / "checkpoints" / "best.safetensors"


def stage_complete(stage_dir: Path) -> bool:
    """Whether a stage has finished training (its last checkpoint says so); a stage still training has a best
    checkpoint too, which is not a result."""
    last = CheckpointDir(Path(stage_dir) / "checkpoints")
    return last.exists() and bool(last.read_state().get("complete"))


def file_digest(path: Path) -> str:
    """What a later stage records of the weights it started from, to notice when they were retrained."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights not found; train that stage first (kc pipeline runs every stage)")
    return sha256_file(path)[:16]


def new_generalist_model(run: Run) -> Classifier:
    """The generalist architecture (also the student's and the control's), seeded."""
    torch.manual_seed(run.cfg.seed)
    return build_classifier(run.cfg.model, run.taxonomy.num_classes)


def new_specialist_model(run: Run, vertical: int) -> Classifier:
    """The specialist architecture for a vertical, to load trained weights into: the generalist's with an output
    layer of the vertical's classes (and 'other', `specialists.other_output`) only. Built at that size, not cut down
    from a full-vocabulary model: at 100K classes that made and dropped two 12.8 MB output layers per specialist,
    and glibc's allocator kept the freed memory (loading 1,000 specialists took RSS from 1.1 to 5.1 GB; this way
    1.2 GB, and 20x faster: docs/BENCHMARKS.md). A specialist's training starts from `restrict_outputs`."""
    start, end = run.taxonomy.vertical_ranges[vertical]
    outputs = end - start + (1 if run.cfg.specialists.other_output else 0)
    torch.manual_seed(run.cfg.seed)  # seeded, as every model build is: the same whatever ran before
    model = build_classifier(run.cfg.model, outputs, with_weights=False)  # a local-dir backbone's weights: replaced
    sp = run.cfg.specialists.self_paced
    return model if sp.variant == "none" else with_self_paced_scales(sp, specialist_blocks(run, vertical), model)


def specialist_blocks(run: Run, vertical: int) -> list[int]:
    """The block of each of a specialist's outputs, for its self-paced scales (`specialists.self_paced`): its
    vertical's classes are block 0, an 'other' output a block of its own (1)."""
    start, end = run.taxonomy.vertical_ranges[vertical]
    return [0] * (end - start) + ([1] if run.cfg.specialists.other_output else [])


def load_fold_specialists(run: Run, vertical: int) -> list[Classifier]:
    """A vertical's trained specialists, one per fold (one, without folds)."""
    return [load_stage(d, new_specialist_model(run, vertical)) for d in specialist_dirs(run, vertical)]


def load_specialists(run: Run) -> list[nn.Module]:
    """Each vertical's specialist; cross-fitted ones as the mean of their folds' logits (`LogitMean`)."""
    models = [load_fold_specialists(run, v) for v in range(run.taxonomy.num_verticals)]
    return [folds[0] if len(folds) == 1 else LogitMean(folds) for folds in models]


def with_student_head(
    head: StudentHeadConfig, model_cfg: ModelConfig, sizes: list[int], model: Classifier
) -> Classifier:
    """`model` (the generalist's architecture) with the student's head structure and widths (`head`, over verticals
    of `sizes` classes). A structured or widened head starts as a copy of the generalist's dense head: loaded with
    the generalist's weights first, the model keeps computing the generalist's function. The control gets the same
    head, so that it differs from the student in its training targets only."""
    mh, widths = model_cfg.head, student_hidden(head, model_cfg)
    if widths != mh.hidden:
        model.head = widened(model.head, widths)
    if head.structure == "fc-fc":
        return model
    structured = StructuredHead(
        model.backbone.num_features,
        widths,
        sizes,
        head.structure,
        head.shared_units,
        mh.dropout,
        head.max_padding,
        mh.activation,
    )
    model.head = structured.copy_from_dense(model.head)
    return model


def with_self_paced_scales(
    sp: SelfPacedConfig,
    vertical_of_class: list[int],
    model: Classifier,
    init: torch.Tensor | None = None,
    running_start: torch.Tensor | None = None,
) -> Classifier:
    """The student's output scales (`sp`) on `model`; `init` (per vertical) where they start from measured values
    (self_paced.init 'generalist') and `running_start` the measured block norms a running normalisation starts
    from; otherwise a model about to load trained scales needs no measured start."""
    start = init if init is not None else ("sqrt" if sp.init == "generalist" else sp.init)
    model.output_scales = SelfPacedScales(
        vertical_of_class,
        sp.variant,
        start,
        sp.init_noise,
        centred=sp.centred,
        running=sp.running,
        running_start=running_start,
    )
    return model


def build_stage_model(
    stage: str, model_cfg: ModelConfig, student: StudentConfig, vertical_sizes: list[int], *, with_weights: bool = True
) -> Classifier:
    """The architecture of a full-vocabulary stage (`STAGES`) over verticals of `vertical_sizes` classes, in
    order: the generalist's, with the student's head, and with the student's self-paced output scales where the
    stage has them. `with_weights` False: a local-dir backbone's weights are not read (they are about to be
    replaced)."""
    model = build_classifier(model_cfg, sum(vertical_sizes), with_weights=with_weights)
    if STAGE[stage].student_head:
        model = with_student_head(student.head, model_cfg, vertical_sizes, model)
    if not STAGE[stage].scales:
        return model
    vertical_of_class = [v for v, size in enumerate(vertical_sizes) for _ in range(size)]
    return with_self_paced_scales(student.self_paced, vertical_of_class, model)


def new_model(run: Run, stage: str) -> Classifier:
    """`build_stage_model` for this run's config and taxonomy, seeded."""
    torch.manual_seed(run.cfg.seed)
    return build_stage_model(stage, run.cfg.model, run.cfg.student, run.taxonomy.vertical_sizes())


def load_stage(stage_dir: Path, model: nn.Module) -> nn.Module:
    """Load a finished stage's best weights into `model`, checked against the SHA-256 its best.json recorded."""
    path = best_weights(stage_dir)
    info = path.with_suffix(".json")
    recorded = read_json(info).get("sha256") if info.is_file() else None  # absent before digests were recorded
    if recorded is not None and path.is_file() and sha256_file(path) != recorded:
        raise CheckpointError(
            f"{path}: damaged (its SHA-256 is not the one {info.name} recorded); delete {stage_dir} and run the "
            "stage again"
        )
    load_weights(path, model)
    return model
