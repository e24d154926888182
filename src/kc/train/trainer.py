"""The one training loop, used by every stage.

A stage gives the trainer a model, a dataset, a loss function `loss_fn(model, batch) -> loss` and, optionally, a
validation function `validate(model) -> metrics`. The trainer owns everything else: seeded data order,
optimizer and LR schedule, AMP and torch.compile flags, progress bars, TensorBoard scalars, checkpoints and
resume, best-checkpoint selection.

Determinism: the data order of an epoch is a permutation seeded by (seed, epoch) and augmentation is seeded per
image, so resuming mid-epoch replays exactly the batches an uninterrupted run would have seen; the torch RNG (for
dropout) is saved and restored. On CPU a resumed run ends with the same weights as an uninterrupted one.

Under torchrun (kc.distributed) the model is wrapped in DistributedDataParallel and each rank trains on its part of
every global batch; the data order and the global batch do not depend on the number of ranks, so a run may resume
with a different number of processes. Rank 0 alone writes checkpoints, best weights and TensorBoard; the loss and
the stop request are summed over the ranks every step, so every rank logs the same loss and stops at the same step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import kc
from kc import distributed
from kc.checkpoint import CheckpointDir
from kc.config import TrainConfig
from kc.data.dataset import collate
from kc.distill.loss import sum_terms
from kc.errors import CheckpointError, KCError
from kc.io import atomic_write_json, sha256_file
from kc.locks import DirectoryLock
from kc.models.weights import save_weights
from kc.numerics import subnormals_flushed

# A loss function returns the loss, or its named terms (the loss is their sum): the trainer logs each term apart
# (history `train_loss_<term>`, TensorBoard `<stage>/loss_<term>`).
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor | dict[str, torch.Tensor]]
ValidateFn = Callable[[nn.Module], dict[str, Any]]
StepCallback = Callable[[int], None]


class TrainingDiverged(KCError):
    """The loss became NaN or infinite."""


class TrainingStopped(KCError):
    """SIGINT or SIGTERM arrived: the stage wrote a checkpoint after the current step and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active (main thread only), the first SIGINT or SIGTERM asks the training loop to stop after the current
    step, so that it can write a checkpoint first; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class EpochBatches(Sampler[list[int]]):
    """The batches of one epoch: a permutation seeded by (seed, epoch), from batch `start` on; with several ranks,
    rank r gets the r-th of `world` equal parts of each batch.

    A last partial batch is dropped (tiny batches upset BatchNorm), except that a dataset smaller than one batch
    is one batch of all its images, so a small vertical still trains.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.batch_size = min(batch_size, n)
        self.rank, self.world = rank, world

    @staticmethod
    def per_epoch(n: int, batch_size: int) -> int:
        return n // min(batch_size, n) if n else 0

    def __len__(self) -> int:
        return max(0, self.per_epoch(self.n, self.batch_size) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        part = self.batch_size // self.world
        for b in range(self.start, self.per_epoch(self.n, self.batch_size)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.rank * part : (self.rank + 1) * part] if self.world > 1 else batch


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The LR at a global step: linear warmup, then cosine, step or constant decay."""
    base = cfg.optimizer.lr
    s = cfg.schedule
    warmup = s.warmup_epochs * steps_per_epoch
    if step < warmup:
        return base * min(1.0, (step + 1) / warmup)
    total = cfg.epochs * steps_per_epoch
    if s.name == "constant":
        return base
    if s.name == "step":
        return base * s.step_gamma ** (step // (s.step_epochs * steps_per_epoch))
    progress = (step - warmup) / max(1.0, total - warmup)
    return base * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, lr_multipliers: dict[str, float] | None = None
) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not biases, norms or scales); parameters whose name starts with a prefix in
    `lr_multipliers` get their own group whose LR is the schedule's times that multiplier."""
    lr_multipliers = lr_multipliers or {}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((m for prefix, m in lr_multipliers.items() if name.startswith(prefix)), 1.0)
        decay = cfg.optimizer.weight_decay if p.ndim > 1 else 0.0
        groups.setdefault((decay, scale), []).append(p)
    param_groups = [{"params": ps, "weight_decay": decay, "lr_scale": scale} for (decay, scale), ps in groups.items()]
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)
    return torch.optim.AdamW(param_groups, lr=o.lr)


class _NoWriter:
    """TensorBoard on ranks other than 0: nothing written."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def config_digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Config keys added after runs were first trained, with the value that means "as before": at that value they are
# left out of checkpoint fingerprints, so that a run trained before the key existed still resumes (and its
# finished stages are still skipped). A new key that changes nothing at its default belongs here.
LATER_KEYS: dict[str, Any] = {
    "sampled_negatives": None,
    "output_bias": None,
    "sampled_verticals": None,
    "patience": None,
    "centred": False,
    "running": False,
    "activation": "relu",
    "reference_run": None,
    "hidden": None,  # student.head.hidden (model.head.hidden is a list, never None)
}


def fingerprint_data(data: Any) -> Any:
    """Config data (model_dump) without the later keys at their 'as before' value."""
    if isinstance(data, dict):
        return {k: fingerprint_data(v) for k, v in data.items() if not (k in LATER_KEYS and v == LATER_KEYS[k])}
    return data


@dataclass
class TrainResult:
    best_weights: Path
    best_epoch: int
    best_metric: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int = 0


@dataclass
class LoopState:
    """Where a stage's training is: what each checkpoint saves (as JSON, these keys) and a resume restores."""

    step: int = 0
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> LoopState:
        """The loop state of a checkpoint's state JSON (which holds more: fingerprint, optimizer, RNG, ...)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        stage_dir: Path,
        train_set: Dataset,
        loss_fn: LossFn,
        validate: ValidateFn | None = None,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        select_metric: str = "mAP",
        fingerprint: str = "",
        num_workers: int = 0,
        progress: bool = True,
        verbose: bool = True,
        on_step: StepCallback | None = None,
        scalars: Callable[[nn.Module], dict[str, float]] | None = None,
        lr_multipliers: dict[str, float] | None = None,
        name: str = "train",
    ):
        self.model = model
        self.cfg = cfg
        self.stage_dir = Path(stage_dir)
        self.train_set = train_set
        self.loss_fn = loss_fn
        self.validate = validate
        self.seed = seed
        self.device = torch.device(device)
        self.select_metric = select_metric
        # What must not change between a run and its resumption: the training config and the stage's inputs.
        self.fingerprint = config_digest(fingerprint_data(cfg.model_dump(mode="json")), fingerprint, seed)
        self.num_workers = num_workers
        self.progress = progress
        self.verbose = verbose
        self.on_step = on_step
        self.scalars = scalars  # extra model quantities (e.g. self-paced scales): TensorBoard and history
        self.lr_multipliers = lr_multipliers
        self.name = name
        self.ckpt = CheckpointDir(self.stage_dir / "checkpoints")
        self.steps_per_epoch = EpochBatches.per_epoch(len(train_set), cfg.batch_size)  # type: ignore[arg-type]
        if self.steps_per_epoch == 0:
            raise KCError(f"{name}: no training images")
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        if cfg.batch_size % self.world:
            raise KCError(
                f"{name}: batch_size {cfg.batch_size} does not split evenly over {self.world} processes; "
                f"set it to a multiple of {self.world} (it is the global batch, shared by all processes)"
            )

    # ------------------------------------------------------------------------------------------------ api
    def fit(self) -> TrainResult:
        """Train to the end (or resume, or return a finished stage's result), holding the stage's lock: a second
        process on the same stage is refused at once (rank 0 holds it for every rank of a torchrun)."""
        lock = DirectoryLock(self.stage_dir, f"stage '{self.name}'") if self.main else contextlib.nullcontext()
        with lock, subnormals_flushed():  # as every kc command computes (kc.numerics)
            return self._fit()

    def _fit(self) -> TrainResult:
        torch.manual_seed(self.seed + 7919 * self.rank)  # dropout: its own stream per rank
        self.model.to(self.device)
        optimizer = make_optimizer(self.model, self.cfg, self.lr_multipliers)
        state = LoopState()
        resumed_from = 0
        if self.main:
            self.ckpt.remove_stale_temporaries()
        distributed.barrier()  # nobody reads the checkpoints while rank 0 tidies them
        if self.ckpt.exists():
            saved = self.ckpt.read_state()
            if saved.get("fingerprint") != self.fingerprint:
                raise CheckpointError(
                    f"{self.ckpt.last}: this stage was started with a different config or inputs; "
                    f"use a new run_dir, or delete {self.stage_dir} to train this stage again"
                )
            if saved.get("complete"):
                return self._result(LoopState.from_saved(saved), 0)
            state = LoopState.from_saved(self.ckpt.restore(self.model, optimizer, saved))
            if not self.main:  # the checkpoint holds rank 0's RNG
                torch.manual_seed(self.seed + 7919 * self.rank + 104_729 * state.step)
            resumed_from = state.step
            self._log(f"{self.name}: resuming at epoch {state.epoch + 1}, step {state.step}")
        forward_model: nn.Module = self.model
        if self.world > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if self.cfg.compile:
            forward_model = torch.compile(forward_model)

        from torch.utils.tensorboard import SummaryWriter

        writer: Any = (
            SummaryWriter(str(self.stage_dir / "tensorboard"), purge_step=state.step or None)
            if self.main
            else _NoWriter()
        )
        try:
            with StopSignals() as self._stop:
                while state.epoch < self.cfg.epochs and not self._plateaued(state):
                    stats = self._train_epoch(forward_model, optimizer, state, writer)
                    self._end_epoch(optimizer, state, stats, writer)
                if state.epoch < self.cfg.epochs:
                    self._log(
                        f"{self.name}: val {self.select_metric} has not improved for {self.cfg.patience} epochs "
                        f"(best at epoch {state.best_epoch}): stopped at epoch {state.epoch} of {self.cfg.epochs}"
                    )
        finally:
            writer.close()
        state.complete = True
        self._save(optimizer, state)
        distributed.barrier()  # the next stage, on every rank, reads what rank 0 wrote
        return self._result(state, resumed_from)

    # ------------------------------------------------------------------------------------------ internals
    def _plateaued(self, state: LoopState) -> bool:
        """The plateau criterion (`patience`): `patience` epochs in a row without a better val metric."""
        patience = self.cfg.patience
        if patience is None or self.validate is None or state.best_metric is None:
            return False
        return state.epoch - state.best_epoch >= patience

    def _save(self, optimizer: torch.optim.Optimizer, state: LoopState) -> None:
        if self.main:
            # The seed says which draw this stage is; the config, what it was trained with (a run's config.yaml
            # holds the latest config any command ran with, which may have changed a stage section since).
            extra = {
                "fingerprint": self.fingerprint,
                "seed": self.seed,
                "config": self.cfg.model_dump(mode="json"),
                "versions": kc.versions(),
            }
            self.ckpt.save(self.model, optimizer, {**asdict(state), **extra})

    def _train_epoch(
        self, forward_model: nn.Module, optimizer: torch.optim.Optimizer, state: LoopState, writer: Any
    ) -> dict[str, float]:
        """Train to the end of the current epoch (from mid-epoch after a resume); return its loss and speed
        (after a resume, over the part of the epoch run since)."""
        epoch = state.epoch
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        batches = EpochBatches(
            len(self.train_set),
            self.cfg.batch_size,
            self.seed,
            epoch,  # type: ignore[arg-type]
            start=state.step_in_epoch,
            rank=self.rank,
            world=self.world,
        )
        loader = DataLoader(
            self.train_set,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed),
            pin_memory=self.device.type == "cuda",
        )
        self.model.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=state.step_in_epoch,
            disable=not (self.progress and self.main),
            desc=f"{self.name} epoch {epoch + 1}/{self.cfg.epochs}",
            unit="step",
            leave=False,
            dynamic_ncols=True,
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        loss_sum, loss_count, images, start = 0.0, 0, 0, time.perf_counter()
        term_sums: dict[str, float] = {}
        for batch in loader:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            lr = learning_rate(self.cfg, state.step, self.steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
                out = self.loss_fn(forward_model, batch)
            terms = out if isinstance(out, dict) else {}
            loss = sum_terms(out)
            # Summed over the ranks (a no-op on one): every rank sees the same loss and stop request, so all of
            # them raise or stop at the same step and none waits forever on another.
            # The request is read once, before the sum: a signal landing after it must not make this rank stop
            # while the others, having summed no request, go on to the next step's collective (a deadlock).
            requested = self._stop.requested
            loss_total, stops, *term_totals = distributed.sum_values(
                loss.item(), float(requested is not None), *(t.item() for t in terms.values())
            )
            value = loss_total / self.world
            term_values = {name: total / self.world for name, total in zip(terms, term_totals, strict=True)}
            stop = (requested or signal.SIGTERM) if stops else None
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"{self.name}: the loss became {value} at epoch {epoch + 1}, step {state.step}; "
                    f"lower the learning rate (now {lr:.3g}) or set grad_clip. The last checkpoint is kept in "
                    f"{self.ckpt.root}."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            optimizer.step()
            state.step += 1
            state.step_in_epoch += 1
            loss_sum, loss_count = loss_sum + value, loss_count + 1
            for name, term in term_values.items():
                term_sums[name] = term_sums.get(name, 0.0) + term
            images += batch["images"].shape[0] * self.world  # every rank's share of the global batch
            if state.step % 10 == 0:
                writer.add_scalar(f"{self.name}/loss", value, state.step)
                for name, term in term_values.items():
                    writer.add_scalar(f"{self.name}/loss_{name}", term, state.step)
                writer.add_scalar(f"{self.name}/lr", lr, state.step)
                for key, extra in (self.scalars(self.model) if self.scalars else {}).items():
                    writer.add_scalar(f"{self.name}/{key}", extra, state.step)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.3g}", refresh=False)
            bar.update()
            if state.step % self.cfg.checkpoint_every_steps == 0 or stop:
                self._save(optimizer, state)
            if stop:
                distributed.barrier()  # the checkpoint is written before any rank exits
                raise TrainingStopped(
                    f"{self.name}: stopped by {signal.Signals(stop).name} at epoch {epoch + 1}, step "
                    f"{state.step}, after writing a checkpoint; run the same command again to resume",
                    stop,
                )
            if self.on_step is not None:
                self.on_step(state.step)
        bar.close()
        elapsed = time.perf_counter() - start
        return {
            "train_loss": loss_sum / max(1, loss_count),
            **{f"train_loss_{name}": total / max(1, loss_count) for name, total in term_sums.items()},
            "seconds": elapsed,
            "images_per_s": images / elapsed if elapsed > 0 else 0.0,
            # this process's peak GPU memory over the epoch (what sizes the batch on a GPU)
            **(
                {"peak_device_mib": torch.cuda.max_memory_allocated(self.device) / 2**20}
                if self.device.type == "cuda"
                else {}
            ),
        }

    def _end_epoch(
        self, optimizer: torch.optim.Optimizer, state: LoopState, stats: dict[str, float], writer: Any
    ) -> None:
        entry: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step, **stats}
        if self.scalars is not None:
            entry.update(self.scalars(self.model))
        if self.validate is not None:
            val = self.validate(self.model)
            entry.update({f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))})
        metric = entry.get(f"val_{self.select_metric}")
        # Nothing to select on (no validation, or no val image to score): the latest epoch is kept. A best metric
        # of 0.0 is a metric like any other.
        best = state.best_metric
        better = metric is None or best is None or metric > best
        if better and self.main:
            # Weights, then their record (with the digest readers check), then the checkpoint: a crash in between
            # resumes from the checkpoint before, and this epoch writes both again.
            save_weights(self.ckpt.best, self.model)
            info = {"epoch": entry["epoch"], "metric": self.select_metric, "value": metric}
            atomic_write_json(self.ckpt.best_info, {**info, "sha256": sha256_file(self.ckpt.best)})
        if better:
            state.best_metric, state.best_epoch = metric, entry["epoch"]
        for key, value in entry.items():
            if key not in ("epoch", "step"):
                writer.add_scalar(f"{self.name}/{key}", value, state.step)
        state.history.append(entry)
        state.epoch += 1
        state.step_in_epoch = 0
        self.model.train()
        self._save(optimizer, state)
        val_text = "".join(
            f" val {k[4:]} {v:.2f}"
            for k, v in entry.items()
            if k in (f"val_{self.select_metric}", "val_mean_per_vertical_AP")
        )
        self._log(
            f"{self.name} epoch {entry['epoch']}/{self.cfg.epochs}: loss {entry['train_loss']:.4f}{val_text} "
            f"({stats['seconds']:.1f}s, {stats['images_per_s']:.0f} img/s){' *' if better else ''}"
        )

    def _result(self, state: LoopState, resumed_from: int) -> TrainResult:
        return TrainResult(self.ckpt.best, state.best_epoch, state.best_metric, state.history, resumed_from)

    def _log(self, text: str) -> None:
        if self.verbose and self.main:
            tqdm.write(text, file=sys.stderr)
