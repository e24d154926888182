"""A run's configuration: YAML in, validated by pydantic, resolved config (absolute paths) out.

Unknown keys and wrong types are errors that name the key. Relative paths in a config file are relative to
the file's own directory, so a config and its data can move together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kc.errors import ConfigError, utf8_required
from kc.hub_layout import LOCAL_DIR, local_dir_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Strict):
    """Fractions for a seeded split, used when the manifest has no `split` column."""

    val: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _leave_some_training_data(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must be below 1 so that some images are left for training")
        return self


class AugmentConfig(_Strict):
    hflip: bool = False
    crop_padding: int = Field(0, ge=0, description="random crop after zero-padding by this many pixels")
    feature_noise: float = Field(
        0.0,
        ge=0.0,
        description="precomputed features only: add Gaussian noise of this standard deviation to each training "
        "row, a fresh draw per epoch (online teachers score the same noisy row as the student; a soft-target "
        "cache holds the rows' targets as they are)",
    )


class DataConfig(_Strict):
    manifest: Path | None = Field(None, description="CSV or JSONL manifest: path, labels[, split]")
    image_folder: Path | None = Field(None, description="root/<vertical>/<class>/<image> layout")
    shards: Path | None = Field(
        None, description="a folder of WebDataset tar shards (kc make-shards): <key>.<image ext> + <key>.json labels"
    )
    image_root: Path | None = Field(None, description="root of manifest image paths (default: its folder)")
    unlabeled: Path | None = Field(
        None,
        description="a manifest of images without labels (CSV with a 'path' column, or JSONL objects with 'path'; "
        "paths relative to the image root, or absolute): each is labelled by the trained generalist's top class, "
        "which selects its teacher for the student and is its label for the controls (self-training); the "
        "generalist and specialists never see them",
    )
    taxonomy: Path | None = Field(
        None, description="taxonomy JSON/YAML (needed with a manifest; with shards, default: <shards>/taxonomy.json)"
    )
    split: SplitConfig = SplitConfig()
    image_size: int = Field(32, ge=8)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    interpolation: Literal["bilinear", "bicubic"] = Field(
        "bilinear", description="how images are resized to image_size (a local-dir backbone's pretrained_cfg sets it)"
    )
    augment: AugmentConfig = AugmentConfig()
    bad_images: Literal["fail", "skip"] = Field(
        "fail", description="unreadable images: fail before training, or skip them and count them"
    )
    expand_ancestors: bool = Field(False, description="also label every ancestor class of each label")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (results do not depend on it)")
    max_image_pixels: int | None = Field(
        None,
        gt=0,
        description="images of more pixels are refused (null: Pillow's decompression-bomb limit, about 89 million); "
        "raise it to admit legitimately large photos deliberately",
    )
    decoded_cache: bool = Field(
        False,
        description="decode and resize every image once per run (RUN/data/decoded_*.npy, uint8, memory-mapped) "
        "instead of every epoch: for photos much larger than image_size; same tensors either way",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if sum(x is not None for x in (self.manifest, self.image_folder, self.shards)) != 1:
            raise ValueError("give exactly one of 'manifest', 'image_folder' or 'shards'")
        if self.manifest is not None and self.taxonomy is None:
            raise ValueError("a 'manifest' needs a 'taxonomy' file naming its classes and verticals")
        return self


class HeadConfig(_Strict):
    hidden: list[int] = Field(
        default_factory=lambda: [256, 64],
        description="widths of the dense layers before the output layer: FC(s1)-FC(s2) in the paper",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "leaky_relu"] = Field(
        "relu",
        description="the hidden layers' nonlinearity (every stage's: the student starts as the generalist). "
        "leaky_relu (negative slope 0.01) keeps a gradient through a unit that is negative for every input, where a "
        "ReLU unit stays dead; in the student's structured blocks, trained by every image, most ReLU units die "
        "(docs/BENCHMARKS.md)",
    )
    output_bias: Literal["prior"] | None = Field(
        None,
        description="prior: output biases start at -log(classes) (every class starts improbable, as it is), so a "
        "huge vocabulary's sigmoid loss does not start at log(2) per class; null: PyTorch's default init",
    )


class ModelConfig(_Strict):
    backbone: str = Field(
        "kc_convnet",
        description="any timm model name (kc_convnet is a small CPU-friendly CNN), or local-dir:PATH, a folder with "
        "config.json and model.safetensors in timm's layout (kc convert-weights writes one): its pretrained weights, "
        "and its preprocessing for every data.mean, std, image_size and interpolation not set",
    )
    backbone_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the backbone")
    pretrained: Path | None = Field(None, description="local backbone weights (.safetensors, or .pt/.pth)")
    head: HeadConfig = HeadConfig()


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)


class ScheduleConfig(_Strict):
    name: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_epochs: int = Field(30, ge=1, description="for 'step': decay every this many epochs")
    step_gamma: float = Field(0.1, gt=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="for 'cosine': final lr as a share of lr")


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1, description="inference batch; on 2-core CPUs >=512 ran 3x slower")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: Literal["bce", "softmax"] = Field(
        "bce", description="bce: sigmoid cross-entropy (multi-label); softmax: single-label data only"
    )
    amp: bool = Field(False, description="bfloat16 autocast (GPUs)")
    compile: bool = Field(False, description="torch.compile the model (GPUs)")
    checkpoint_every_steps: int = Field(200, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    patience: int | None = Field(
        None,
        ge=1,
        description="stop when the val metric has not improved for this many epochs (the plateau criterion of "
        "convergence); the best epoch is kept either way; unset = train every epoch",
    )
    seed: int | None = Field(
        None,
        description="seed of this stage's data order and dropout (default: the run's seed); set it to repeat "
        "a stage with another seed on the same data and split",
    )

    def stage_seed(self, run_seed: int) -> int:
        return run_seed if self.seed is None else self.seed


class GeneralistConfig(TrainConfig):
    """The generalist: every class, ground truth only (its loss is also the control's)."""

    sampled_negatives: int | None = Field(
        None,
        ge=1,
        description="bce only: per batch, the loss covers the batch's positive classes plus this many others drawn "
        "at random (scaled to estimate the full loss), and only their logits are computed: bounds a 100K-class "
        "step's memory (partial FC); unset = every class",
    )

    @model_validator(mode="after")
    def _sampling_needs_bce(self) -> GeneralistConfig:
        if self.sampled_negatives is not None and self.loss != "bce":
            raise ValueError("sampled_negatives applies to loss: bce only")
        return self


class SelfPacedConfig(_Strict):
    """Per-vertical L2-normalised logits times a scale (the paper's self-paced learning)."""

    variant: Literal["none", "fixed", "class", "vertical"] = Field(
        "vertical",
        description="vertical: one learned scale per vertical (the paper's best, and the best measured on the demo "
        "and at 1,000 classes); class: one per class; fixed: not trained; none: plain logits (measured best at 100K "
        "classes with output_bias: prior, where normalising a confident generalist's blocks breaks its ranking)",
    )
    init: Literal["sqrt", "generalist"] | float = Field(
        "sqrt",
        description="initial scale: sqrt(classes in the vertical) (the paper); generalist: the median norm of the "
        "vertical's block of generalist logits on training images, so that the student starts as the generalist "
        "(use it with model.head.output_bias: prior, whose logits have norms far above sqrt(N_v)); or a number",
    )
    centred: bool = Field(
        False,
        description="keep each image's block mean outside the normalisation: y = m + gamma (x - m) / ||x - m|| "
        "(false: the paper's y = gamma x / ||x||, which divides out the level through which a prior-biased model "
        "ranks images across verticals); with init 'generalist' the scales start at the centred block norms",
    )
    running: bool = Field(
        False,
        description="divide each vertical's block by a running average of its norm over training batches (no "
        "gradient through it) instead of each image's own norm: y = gamma x / r, one divisor for every image, so "
        "no ranking changes and gamma is the vertical's gain; with init 'generalist' the student starts exactly "
        "as the generalist",
    )
    init_noise: float = Field(0.0, ge=0, description="std of Gaussian noise added to the initial scales")
    lr_multiplier: float = Field(
        100.0,
        gt=0,
        description="the scales' learning rate relative to the student's: they must grow from "
        "sqrt(N_v) to ~15 within the student's epochs (at 1x they barely moved and self-pacing hurt)",
    )

    @model_validator(mode="after")
    def _one_normalisation(self) -> SelfPacedConfig:
        if self.centred and self.running:
            raise ValueError("centred and running are two normalisations of the blocks; set one of them")
        return self


class SpecialistConfig(TrainConfig):
    """One specialist per vertical, initialised from the generalist, trained on that vertical's images."""

    negatives_per_image: float = Field(
        1.0,
        ge=0,
        description="images of other verticals per image of the vertical, as all-negative examples "
        "(Hinton et al. 2015: 1.0, half and half)",
    )
    other_output: bool = Field(False, description="add an 'other' output, 1 on images of no class of the vertical")
    folds: int = Field(
        1,
        ge=1,
        description="cross-fitted teachers: with K > 1 the training images are split into K seeded folds and each "
        "vertical gets K specialists, the f-th trained without fold f; every image is then taught by the one that "
        "never saw it (out-of-fold targets, not a memorised copy of its label). Needs the soft-target cache",
    )
    self_paced: SelfPacedConfig = Field(
        SelfPacedConfig(variant="none"),
        description="the student's output normalisation (student.self_paced) on each specialist's one block of "
        "logits, e.g. {variant: vertical, centred: true, init: generalist}: a learned scale of the block's centred, "
        "normalised logits (a cosine classifier with a learned temperature); none: plain logits",
    )

    @model_validator(mode="after")
    def _other_output_keeps_its_sign(self) -> SpecialistConfig:
        sp = self.self_paced
        if self.other_output and sp.variant != "none" and not (sp.centred or sp.running):
            raise ValueError(
                "self_paced without centred or running would divide the one 'other' logit by its own size, leaving "
                "only its sign; set self_paced.centred: true, or other_output: false"
            )
        return self


class StudentHeadConfig(_Strict):
    """The student's head structure (the paper's structurally connected layers) and widths."""

    structure: Literal["fc-fc", "fc-sc", "sc-sc"] = Field(
        "fc-fc",
        description="fc-fc: the generalist's dense head; fc-sc: shared FC then one block per vertical feeding only "
        "that vertical's outputs (the paper's best); sc-sc: both layers per vertical",
    )
    hidden: list[int] | None = Field(
        None,
        description="the student's hidden widths (null: the generalist's, model.head.hidden): as many layers, each "
        "at least as wide. Each layer's first units start as the generalist's and the added ones are read out with "
        "zero weights, so the student (and each control with its head) still starts as the generalist; with fc-sc, "
        "wider shared layers give the one network capacity between the generalist's and the specialists' together",
    )
    shared_units: int = Field(
        0, ge=0, description="fc-sc only: units of each vertical's block shared by all verticals (x; x = s2 is fc-fc)"
    )
    max_padding: float = Field(
        0.25, ge=0, lt=1, description="share of padded outputs allowed when verticals of unequal size share a bmm"
    )
    init: Literal["generalist", "specialists"] = Field(
        "generalist",
        description="generalist: every block copies the generalist's layer (the student starts as the generalist); "
        "specialists: each vertical's private blocks and output rows copy its specialist's (beyond the paper)",
    )


def student_hidden(head: StudentHeadConfig, model: ModelConfig) -> list[int]:
    """The student's hidden widths: its own (`student.head.hidden`) or the generalist's (`model.head.hidden`)."""
    return model.head.hidden if head.hidden is None else head.hidden


class StudentConfig(TrainConfig):
    """The student: initialised from the generalist, distilled from the specialists selected by each image's labels."""

    top_k: int = Field(100, ge=1, description="teacher probabilities kept per selected vertical (paper: 100)")
    temperature: float = Field(1.0, gt=0, description="teacher and student logits divided by T, loss times T^2")
    ground_truth: Literal["none", "max", "weighted"] = Field(
        "none",
        description="none: soft targets only (the paper; best measured on noisy labels); max: target "
        "max(y, z*); weighted: (1-w) * distillation loss + w * ground-truth loss (truth: the labelled images' "
        "labels; an unlabeled image learns its soft targets alone)",
    )
    ground_truth_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="w for ground_truth: weighted; 1: the truth alone on the labelled images and the teachers on "
        "the unlabeled ones (data.unlabeled; without them it is refused: no teacher would teach)",
    )
    self_paced: SelfPacedConfig = SelfPacedConfig()
    head: StudentHeadConfig = StudentHeadConfig()
    teachers: Literal["auto", "online", "cache"] = Field(
        "auto",
        description="where soft targets come from: online (run the specialists every batch), cache (RUN/cache, "
        "built by kc cache-targets; the pipeline builds it), auto (the cache if one exists, else online)",
    )
    teacher_choice: Literal["specialists", "better_on_val"] = Field(
        "specialists",
        description="specialists: every vertical taught by its specialist (the paper); better_on_val: by its "
        "specialist only where that beats, in val AP on the vertical's classes, the student's head trained on the "
        "labelled images alone (the labelled-only control, then trained before the student), else by that head's "
        "block of the vertical (needs data.unlabeled and the bce loss)",
    )
    teacher_choice_margin: float = Field(
        0.0,
        ge=0.0,
        description="under teacher_choice better_on_val: the val AP points by which a specialist must beat the "
        "labelled-only control to teach its vertical (0: any lead). A vertical's val AP rests on few images, so "
        "the larger of two close figures is mostly noise (10K classes: docs/BENCHMARKS.md)",
    )
    reference_run: Path | None = Field(
        None,
        description="under teacher_choice better_on_val: another run directory over the same data and taxonomy "
        "whose labelled-only control is the reference (compared with each specialist, and teaching where it is "
        "better) instead of this run's own (kc ablate sets it, so that every variant learns from its run's "
        "teachers; this run's own labelled-only control is then a control only)",
    )
    unselected: Literal["zero", "ignore"] = Field(
        "zero",
        description="classes of verticals no teacher was selected for: target 0 (paper), or no distillation loss there",
    )
    sampled_verticals: int | None = Field(
        None,
        ge=1,
        description="per step, the loss covers each image's own verticals plus this many other verticals drawn for "
        "the batch (scaled to estimate the full loss without bias), and only their logits are computed: a "
        "100K-class student step costs about what the generalist's sampled step does; unset = every class",
    )


ControlKind = Literal[
    "same_compute", "self_distillation", "ground_truth", "total_compute", "ground_truth_labelled", "self_training"
]
CONTROL_KINDS: tuple[str, ...] = get_args(ControlKind)


class ControlsConfig(_Strict):
    """What the student is measured against. Each control starts from the generalist, like the student."""

    kinds: list[ControlKind] = Field(
        default_factory=lambda: list(CONTROL_KINDS),
        description="same_compute: the generalist trained on with the ground truth for the student's epochs "
        "(student's head); self_distillation: the student's exact recipe taught by the generalist itself instead of "
        "the specialists; ground_truth: the student's head and self-paced scales trained on the ground truth "
        "(left out when the student has no scales: it is then same_compute); total_compute: the generalist trained "
        "on for the image-steps of all specialists and the student together; ground_truth_labelled: the "
        "ground_truth control on the labelled images only, for ground_truth_labelled_steps times the student's "
        "optimizer steps (trained only when data.unlabeled gives images, on which every other control self-trains); "
        "self_training: the student's exact recipe taught by the ground_truth_labelled control alone, on the "
        "labelled and unlabeled images (what the specialists add to self-training; with data.unlabeled only, and "
        "it brings ground_truth_labelled, its teacher)",
    )
    total_compute_patience: int | None = Field(
        5,
        ge=1,
        description="the total-compute control stops when its val mAP has not improved for this many epochs (its "
        "budget can be many times the student's); unset = its whole budget",
    )
    ground_truth_labelled_steps: float = Field(
        1.0,
        gt=0,
        description="the labelled-only control's optimizer steps, as a multiple of the student's: it sees fewer "
        "images than the student, so it may need more steps than the student to reach its val plateau (at 10K, "
        "equal steps left it 4 val mAP short); choose it on val: the smallest multiple that doubling no longer "
        "improves",
    )


class RunConfig(_Strict):
    run_dir: Path = Path("runs/default")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    generalist: GeneralistConfig = GeneralistConfig()
    specialists: SpecialistConfig = SpecialistConfig()
    student: StudentConfig = StudentConfig()
    control: bool = Field(
        True,
        description="also train the controls (`controls`): without them a student's gain may be nothing but extra "
        "training, self-distillation or the student's head",
    )
    controls: ControlsConfig = ControlsConfig()

    @model_validator(mode="after")
    def _student_head_fits(self) -> RunConfig:
        head, hidden = self.student.head, self.model.head.hidden
        needed = {"fc-fc": 0, "fc-sc": 1, "sc-sc": 2}[head.structure]
        if len(hidden) < needed:
            raise ValueError(
                f"student.head.structure {head.structure} needs at least {needed} widths in model.head.hidden, "
                f"which has {hidden}"
            )
        if head.hidden is not None:
            if len(head.hidden) != len(hidden) or any(s < g for s, g in zip(head.hidden, hidden, strict=True)):
                raise ValueError(
                    f"student.head.hidden {head.hidden} must have as many layers as model.head.hidden {hidden}, "
                    "each at least as wide (the student starts as the generalist)"
                )
            if head.init == "specialists" and head.hidden != hidden:
                raise ValueError(
                    "student.head.init 'specialists' copies the specialists' layers, which have model.head.hidden's "
                    "widths; remove student.head.hidden or set init: generalist"
                )
            hidden = head.hidden
        if self.specialists.folds > 1 and self.student.teachers == "online":
            raise ValueError(
                "specialists.folds > 1 teaches each image by the specialist that never saw it, which the soft-target "
                "cache does; set student.teachers to cache or auto"
            )
        if self.specialists.folds > 1 and head.init == "specialists":
            raise ValueError("student.head.init 'specialists' needs one specialist per vertical (specialists.folds: 1)")
        if head.init == "specialists" and head.structure == "fc-fc":
            raise ValueError("student.head.init 'specialists' needs a structured head (fc-sc or sc-sc)")
        student = self.student
        if student.ground_truth == "weighted" and student.ground_truth_weight == 1 and not self.data.unlabeled:
            raise ValueError(
                "student.ground_truth_weight 1 gives every labelled image the truth alone, and without "
                "data.unlabeled there is no other image: no teacher would teach the student anything (it would be "
                "the ground-truth control); set a weight below 1, or give data.unlabeled"
            )
        if student.teacher_choice == "better_on_val" and not self.data.unlabeled:
            raise ValueError(
                "student.teacher_choice better_on_val compares each specialist with the student's head trained on "
                "the labelled images only, a control trained with data.unlabeled; give data.unlabeled, or set "
                "teacher_choice: specialists"
            )
        if student.reference_run is not None and student.teacher_choice != "better_on_val":
            raise ValueError(
                "student.reference_run names the labelled-only control that teacher_choice better_on_val compares "
                "the specialists with; set teacher_choice: better_on_val, or remove reference_run"
            )
        if student.teacher_choice == "better_on_val" and self.generalist.loss != "bce":
            raise ValueError(
                "student.teacher_choice better_on_val teaches with the labelled-only control's logits as sigmoid "
                "targets, which needs generalist.loss: bce"
            )
        if head.shared_units and head.structure != "fc-sc":
            raise ValueError("student.head.shared_units applies to structure fc-sc only; set it to 0")
        if hidden and head.shared_units > hidden[-1]:
            raise ValueError(
                f"student.head.shared_units {head.shared_units} exceeds the block width {hidden[-1]} "
                "(the last of the student's hidden widths)"
            )
        return self

    def resolved(self) -> dict[str, Any]:
        """The config as plain data with absolute paths, for the run directory."""
        return self.model_dump(mode="json")


def _absolutise(cfg: RunConfig, base: Path) -> RunConfig:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p)).resolve()

    cfg.run_dir = fix(cfg.run_dir)
    d = cfg.data
    d.manifest, d.image_folder, d.taxonomy = fix(d.manifest), fix(d.image_folder), fix(d.taxonomy)
    d.shards, d.unlabeled = fix(d.shards), fix(d.unlabeled)
    if d.shards is not None:
        d.image_root, d.taxonomy = d.shards, d.taxonomy or d.shards / "taxonomy.json"
    d.image_root = fix(d.image_root) if d.image_root else (d.manifest.parent if d.manifest else None)
    cfg.model.pretrained = fix(cfg.model.pretrained)
    cfg.student.reference_run = fix(cfg.student.reference_run)
    if cfg.model.backbone.startswith(LOCAL_DIR):
        cfg.model.backbone = LOCAL_DIR + str(fix(Path(cfg.model.backbone[len(LOCAL_DIR) :])))
    return cfg


def _follow_pretrained_cfg(cfg: RunConfig) -> RunConfig:
    """A local-dir backbone's preprocessing (its config.json's pretrained_cfg) for each of data.mean, std,
    image_size and interpolation the config does not set, as timm's resolve_data_config does."""
    folder = local_dir_config(cfg.model.backbone)
    if folder is None:
        return cfg
    if cfg.model.pretrained is not None:
        raise ConfigError("model.pretrained: a local-dir backbone brings its own weights; remove model.pretrained")
    pretrained, d = folder.get("pretrained_cfg", {}), cfg.data
    given = d.model_fields_set
    try:
        if "mean" not in given and "mean" in pretrained:
            d.mean = _triple(pretrained["mean"])
        if "std" not in given and "std" in pretrained:
            d.std = _triple(pretrained["std"])
        if "image_size" not in given and "input_size" in pretrained:
            d.image_size = int(pretrained["input_size"][-1])
    except (TypeError, ValueError, IndexError, KeyError):
        where = cfg.model.backbone[len(LOCAL_DIR) :]
        raise ConfigError(
            f"{where}/config.json: pretrained_cfg mean and std must be 3 numbers, input_size [3, H, W]"
        ) from None
    if "interpolation" not in given and pretrained.get("interpolation") in ("bilinear", "bicubic"):
        d.interpolation = pretrained["interpolation"]
    return cfg


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in values)
    return (a, b, c)


def _describe(errors: list[dict[str, Any]], source: str) -> str:
    lines = [f"{source}: invalid config:"]
    for err in errors:
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key; remove it or check its spelling")
        elif err["type"] == "missing":
            lines.append(f"  - {key}: required key is missing")
        else:
            lines.append(f"  - {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(data: Any, source: str = "<config>", base: Path | None = None) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config is a YAML mapping of keys to values")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors(), source)) from None
    return _follow_pretrained_cfg(_absolutise(cfg, base or Path.cwd()))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    with utf8_required(path, ConfigError):
        text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        data = merge(data or {}, overrides)
    return config_from_dict(data, source=str(path), base=path.parent)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """'generalist.epochs=3' -> {'generalist': {'epochs': 3}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': write KEY=VALUE, e.g. generalist.epochs=3")
    key, value = text.split("=", 1)
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)
