"""What every stage shares: the ground-truth loss, validation, stage directories and loading trained models."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kc.data.dataset import ImageDataset, collate, dense_targets
from kc.errors import CheckpointError, DataError
from kc.evaluate.metrics import average_precision, classification_metrics, verified_targets
from kc.evaluate.predict import predict
from kc.models.classifier import Classifier, build_classifier, restrict_outputs
from kc.models.self_paced import SelfPacedScales
from kc.models.structured import StructuredHead
from kc.run import Run
from kc.train.checkpoint import load_weights

GENERALIST, STUDENT, CONTROL = "generalist", "student", "control"
SELF_DISTILLATION, GROUND_TRUTH, TOTAL_COMPUTE = (
    "control_self_distillation",
    "control_ground_truth",
    "control_total_compute",
)


@dataclass(frozen=True)
class FullModelStage:
    """A stage whose model covers every class: its directory (RUN/<name>), its row in the comparison, its model
    (the generalist's architecture, or with the student's head, or with the student's head and self-paced scales)
    and its training targets (the ground truth, with the generalist's loss, or a teacher's soft targets)."""

    name: str
    title: str
    student_head: bool
    scales: bool
    ground_truth: bool
    control: str | None = None  # its name in config `controls.kinds`, for a control


# Every full-vocabulary stage, in the order the pipeline trains them and the comparison lists them. The controls
# are what a student's gain must beat: (a) extra training, (b) distillation from the generalist itself, (c) the
# student's head and scales trained on labels, (d) the compute of generalist + specialists + student together.
STAGES = (
    FullModelStage(GENERALIST, "generalist", student_head=False, scales=False, ground_truth=True),
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
    return [s.name for s in STAGES if s.control in kinds]


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def sampled_bce(num_classes: int, negatives: int) -> LossFn:
    """Sigmoid cross-entropy over the batch's positive classes plus `negatives` other classes drawn uniformly
    (torch's RNG: resumed runs draw the same), the drawn terms scaled by (all other classes / drawn) so that the loss
    estimates the full one without bias. Memory grows with the classes kept, not the vocabulary (partial FC)."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        device = labels.device
        positive = torch.zeros(num_classes, dtype=torch.bool, device=device)
        positive[labels[labels >= 0]] = True
        others = (~positive).nonzero().flatten()
        drawn = others[torch.randperm(len(others))[:negatives].to(device)]
        classes = torch.cat([positive.nonzero().flatten(), drawn])
        column = torch.full((num_classes + 1,), -1, dtype=torch.long, device=device)
        column[classes] = torch.arange(len(classes), device=device)
        targets = torch.zeros(labels.shape[0], len(classes) + 1, device=device)
        targets.scatter_(1, column[labels.clamp(min=-1)] % (len(classes) + 1), 1.0)  # padding lands in the extra
        weights = torch.ones(len(classes), device=device)
        weights[len(classes) - len(drawn) :] = len(others) / max(1, len(drawn))
        logits = model(batch["images"], classes=classes).float()
        terms = F.binary_cross_entropy_with_logits(logits, targets[:, : len(classes)], reduction="none")
        return (terms * weights).sum() / logits.shape[0]

    return loss


def ground_truth_loss(kind: str, num_classes: int, sampled_negatives: int | None = None) -> LossFn:
    """bce: sigmoid cross-entropy summed over classes, averaged over images (over sampled classes when
    `sampled_negatives` is set). softmax: cross-entropy."""
    if kind == "bce" and sampled_negatives is not None:
        return sampled_bce(num_classes, sampled_negatives)

    def bce(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["images"]).float()
        targets = dense_targets(batch["labels"], num_classes)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]

    def softmax(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["images"]).float(), batch["labels"][:, 0])

    return bce if kind == "bce" else softmax


def check_single_label(run: Run) -> None:
    for split, samples in run.splits.items():
        for s in samples:
            if len(s.labels) != 1:
                raise DataError(
                    f"{s.where}: has {len(s.labels)} labels, but loss 'softmax' needs exactly one per image "
                    f"({split} split); use loss: bce for multi-label data"
                )


def validation_fn(
    run: Run, device: torch.device, batch_size: int, activation: str = "sigmoid", classes: tuple[int, int] | None = None
) -> Callable[[nn.Module], dict[str, Any]] | None:
    """Metrics on the val split: over all classes, or (specialists) mAP over the classes [start, end) only."""
    if not run.splits["val"]:
        return None
    if classes is not None and not any(classes[0] <= c < classes[1] for s in run.splits["val"] for c in s.labels):
        return None  # no val image of the vertical: nothing to select on (the last epoch is kept), not a 0.0

    def validate(model: nn.Module) -> dict[str, Any]:
        # A specialist is scored on its vertical's classes alone (its 'other' output dropped): no (N, C) targets.
        first, count = (0, run.taxonomy.num_classes) if classes is None else (classes[0], classes[1] - classes[0])
        scores, targets, _ = predict(
            model,
            run.splits["val"],
            run.image_root,
            run.cfg.data,
            count,
            batch_size=batch_size,
            device=device,
            activation=activation,
            first_class=first,
        )
        targets = verified_targets(targets, run.splits["val"], first)
        if classes is not None:
            ap = average_precision(scores[:, :count], targets)
            scored = ap[~np.isnan(ap)]
            return {"mAP": 100 * float(scored.mean())} if scored.size else {}  # no metric, not a 0.0
        m = classification_metrics(scores, targets, run.taxonomy)
        return {k: v for k, v in m.items() if isinstance(v, (int, float))}

    return validate


def specialist_dir(run: Run, vertical: int) -> Path:
    """RUN/specialists/<index>_<vertical id>, the id made safe for a file name (Open Images ids hold '/')."""
    vid = run.taxonomy.verticals[vertical].id
    return run.dir / "specialists" / f"{vertical:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', vid)}"


def best_weights(stage_dir: Path) -> Path:
    return stage_dir / "checkpoints" / "best.safetensors"


def file_digest(path: Path) -> str:
    """What a later stage records of the weights it started from, to notice when they were retrained."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights not found; train that stage first (kc pipeline runs every stage)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def new_generalist_model(run: Run) -> Classifier:
    """The generalist architecture (also the student's and the control's), seeded."""
    torch.manual_seed(run.cfg.seed)
    return build_classifier(run.cfg.model, run.taxonomy.num_classes)


def new_specialist_model(run: Run, vertical: int) -> Classifier:
    """The specialist architecture for a vertical (weights are overwritten by init or by loading)."""
    start, end = run.taxonomy.vertical_ranges[vertical]
    return restrict_outputs(new_generalist_model(run), start, end, run.cfg.specialists.other_output)


def load_specialists(run: Run) -> list[Classifier]:
    return [
        load_stage(run, specialist_dir(run, v), new_specialist_model(run, v)) for v in range(run.taxonomy.num_verticals)
    ]


def with_student_head(run: Run, model: Classifier) -> Classifier:
    """`model` (the generalist's architecture) with the student's head structure (student.head). A structured head
    starts as a copy of the generalist's dense head: loaded with the generalist's weights first, the model keeps
    computing the generalist's function. The control gets the same head, so that it differs from the student in
    its training targets only."""
    h, mh = run.cfg.student.head, run.cfg.model.head
    if h.structure == "fc-fc":
        return model
    sizes = [run.taxonomy.vertical_size(v) for v in range(run.taxonomy.num_verticals)]
    head = StructuredHead(
        model.backbone.num_features, mh.hidden, sizes, h.structure, h.shared_units, mh.dropout, h.max_padding
    )
    model.head = head.copy_from_dense(model.head)
    return model


def with_self_paced_scales(run: Run, model: Classifier, init: torch.Tensor | None = None) -> Classifier:
    """The student's output scales on `model`; `init` (per vertical) where they start from measured values
    (self_paced.init 'generalist'); otherwise a model about to load trained scales needs no measured start."""
    sp = run.cfg.student.self_paced
    start = init if init is not None else ("sqrt" if sp.init == "generalist" else sp.init)
    model.output_scales = SelfPacedScales(
        run.taxonomy.vertical_of_class, sp.variant, start, sp.init_noise, centred=sp.centred
    )
    return model


@torch.no_grad()
def block_norms(
    run: Run, model: Classifier, images: int = 1024, batch_size: int = 256, centred: bool = False
) -> torch.Tensor:
    """Per vertical, the median over training images (up to `images`, evenly spread) of the L2 norm of the
    vertical's block of `model`'s logits: self-paced scales that start there keep the typical size of its logits
    (not their ranking across images, which normalising each image's block changes: docs/BENCHMARKS.md, 100K)."""
    samples = run.splits["train"]
    chosen = samples[:: max(1, len(samples) // images)][:images]
    dataset = ImageDataset(chosen, run.image_root, run.cfg.data, train=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    vertical_of_class = torch.tensor(run.taxonomy.vertical_of_class)
    was_training = model.training
    model.eval()
    norms = []
    for batch in loader:
        logits = model(batch["images"]).float()
        if centred:  # minus each image's block mean, as the centred scales normalise
            sums = torch.zeros(len(logits), run.taxonomy.num_verticals).index_add_(1, vertical_of_class, logits)
            sizes = torch.bincount(vertical_of_class, minlength=run.taxonomy.num_verticals)
            logits = logits - (sums / sizes)[:, vertical_of_class]
        squares = torch.zeros(len(logits), run.taxonomy.num_verticals).index_add_(1, vertical_of_class, logits**2)
        norms.append(squares.sqrt())
    model.train(was_training)
    return torch.cat(norms).median(dim=0).values.clamp_min(1e-3)


def new_model(run: Run, stage: str) -> Classifier:
    """The architecture of a full-vocabulary stage (`STAGES`): the generalist's, with the student's head, and with
    the student's self-paced output scales where the stage has them."""
    model = new_generalist_model(run)
    if STAGE[stage].student_head:
        model = with_student_head(run, model)
    return with_self_paced_scales(run, model) if STAGE[stage].scales else model


def start_from_generalist(run: Run, stage: str) -> Classifier:
    """The student or a control before training: the trained generalist, given the stage's architecture; with
    student.head.init 'specialists', each vertical's blocks then start from its specialist's top layers."""
    model = with_student_head(run, load_stage(run, run.stage_dir(GENERALIST), new_generalist_model(run)))
    if run.cfg.student.head.init == "specialists":
        model.head.copy_from_specialists([s.head for s in load_specialists(run)])
    if not STAGE[stage].scales:
        return model
    sp = run.cfg.student.self_paced
    init = block_norms(run, model, centred=sp.centred) if sp.init == "generalist" else None
    return with_self_paced_scales(run, model, init)


def start_digests(run: Run) -> str:
    """What the student or control starts from: the generalist's weights and, when blocks start from the
    specialists, theirs."""
    inputs = [best_weights(run.stage_dir(GENERALIST))]
    if run.cfg.student.head.init == "specialists":
        inputs += [best_weights(specialist_dir(run, v)) for v in range(run.taxonomy.num_verticals)]
    return "".join(file_digest(p) for p in inputs)


def load_stage(run: Run, stage_dir: Path, model: Classifier) -> Classifier:
    """Load a finished stage's best weights into `model`."""
    load_weights(best_weights(stage_dir), model)
    return model
