"""Unlabeled images (`data.unlabeled`) in the stages after the generalist.

Each unlabeled image is labelled once by the trained generalist's top class. For the student that label only
selects the image's teacher (the specialist of that class's vertical, whose soft targets it then learns; it never
enters the student's loss as truth, whatever `student.ground_truth` says); for the controls it is the label they
train on (self-training on the same images, so that what the student gains over them is what the teachers add,
not the extra images), but for `control_ground_truth_labelled`, which trains without them. The generalist and the
specialists never see these images.

    RUN/data/unlabeled_routed.json   the generalist's top class of each unlabeled image, with the digests of the
                                     generalist and of the image list it was computed from (recomputed when
                                     either changes)
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from kc import distributed
from kc.data.samples import Sample
from kc.distributed import resolve_device
from kc.evaluate.predict import predict_batches
from kc.io import atomic_write_json, read_json
from kc.run import Run
from kc.stages import GENERALIST, best_weights, file_digest, load_stage, new_generalist_model

ROUTED = "unlabeled_routed.json"


def unlabeled_digest(run: Run) -> str:
    return hashlib.sha256(json.dumps([s.path for s in run.unlabeled]).encode()).hexdigest()[:16]


def routed_unlabeled(run: Run, progress: bool = False) -> list[Sample]:
    """The run's unlabeled images as training samples, each labelled with the generalist's top class (computed
    once per generalist, on rank 0 under torchrun). Empty without data.unlabeled."""
    if not run.unlabeled:
        return []
    path = run.dir / "data" / ROUTED
    wanted = {"generalist": file_digest(best_weights(run.stage_dir(GENERALIST))), "images": unlabeled_digest(run)}

    def route() -> list[int]:
        saved = read_json(path) if path.is_file() else {}
        if {k: saved.get(k) for k in wanted} == wanted:
            return saved["classes"]
        generalist = load_stage(run.stage_dir(GENERALIST), new_generalist_model(run))
        batches = predict_batches(
            generalist,
            run.unlabeled,
            run.image_root,
            run.cfg.data,
            run.taxonomy.num_classes,
            batch_size=run.cfg.student.eval_batch_size,
            device=resolve_device(run.cfg.device),
            with_targets=False,
            progress=progress,
            desc="labelling unlabeled images by the generalist",
        )
        classes = np.concatenate([scores.argmax(1) for scores, _, _ in batches]).tolist()
        atomic_write_json(path, {**wanted, "classes": classes})
        return classes

    classes = distributed.on_main(route)
    return [
        Sample(s.path, (c,), "train", f"{s.where} (unlabeled; the generalist's top class)")
        for s, c in zip(run.unlabeled, classes, strict=True)
    ]


def unlabeled_fingerprint(run: Run) -> str:
    """What a later stage's checkpoint records of the unlabeled images (nothing without them, so that runs made
    before data.unlabeled existed still resume); their labels follow from the generalist, recorded already."""
    return f"unlabeled:{unlabeled_digest(run)}" if run.unlabeled else ""


def student_training_samples(run: Run) -> list[Sample]:
    """What the student and the controls train on (all but the labelled-only one): the labelled training split,
    then the routed unlabeled images (in that order: a training index below len(train) is a labelled image)."""
    return run.splits["train"] + routed_unlabeled(run)


def fold_of_student_samples(run: Run, fold_of_train: list[int]) -> list[int]:
    """The cross-fitting fold of each of the student's training images: an unlabeled image was in no specialist's
    training, so fold 0's teacher is as honest for it as any."""
    return fold_of_train + [0] * len(run.unlabeled)
