"""Several processes, one job: kc under `torchrun` (PyTorch's DistributedDataParallel).

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; `init_from_env` joins them into a
process group (nccl on GPUs, gloo on CPU). With a world size of one (or without torchrun) every function here is the
single-process case, so the rest of kc calls them unconditionally.

How the work splits (docs/DISTRIBUTED.md):

- training: every rank holds the whole model; each global batch of `batch_size` images (the same seeded order on
  every rank) is cut into `world_size` equal parts, one per rank; DDP averages the gradients, so a step equals the
  single-process step on the whole batch (BatchNorm statistics aside: they are per rank). Rank 0 alone writes
  checkpoints, TensorBoard and reports, and the other ranks wait for it where they read what it wrote.
- evaluation: the images are cut into `world_size` contiguous parts, each rank scores its part, the scores are
  gathered in order; every rank then holds the same scores and computes the same metrics.
- the soft-target cache: rank r builds the teachers of the verticals v with v % world_size == r.

The run directory must be one shared directory for every rank (a local disk with one node, a shared filesystem
across nodes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from kc.errors import KCError

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> None:
    """Join the process group torchrun describes (once; a no-op outside torchrun). On GPUs each process takes the
    device LOCAL_RANK."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise KCError("WORLD_SIZE > 1, but this PyTorch build has no torch.distributed")
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    except (RuntimeError, ValueError) as exc:
        raise KCError(
            f"cannot join the torchrun process group ({exc}); check MASTER_ADDR/MASTER_PORT or --rdzv-endpoint"
        ) from None


def device_for(name: str) -> torch.device:
    """The device of this process: on GPUs under torchrun, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and active():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def resolve_device(name: str) -> torch.device:
    """The configured device; under torchrun on GPUs, this process's GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise KCError("device: 'cuda' was asked for but no GPU is visible; use device: auto or cpu")
    return device_for(name)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result (or its error, as a KCError) to every rank, so that no rank waits
    forever on one that failed."""
    if not active():
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn())
        except KCError as exc:
            outcome = ("error", str(exc))
            broadcast(outcome)
            raise
        except BaseException as exc:
            broadcast(("error", f"rank 0 failed: {type(exc).__name__}: {exc}"))
            raise
    outcome = broadcast(outcome)
    if outcome[0] == "error":
        raise KCError(outcome[1] if is_main() else f"(rank 0) {outcome[1]}")
    return outcome[1]


def main_first(fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn` first (e.g. writing files the others then read), then the other ranks run it."""
    result: list[T] = []
    on_main(lambda: result.append(fn()))  # only success or failure travels to the other ranks, not the result
    return result[0] if is_main() else fn()


def sum_values(*values: float) -> list[float]:
    """Each value summed over the ranks."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def part(n: int) -> tuple[int, int]:
    """This rank's contiguous part [start, end) of n items (parts differ in size by at most one)."""
    r, w = rank(), world_size()
    return r * n // w, (r + 1) * n // w


def gather_rows(array: np.ndarray) -> np.ndarray:
    """Every rank's rows, concatenated in rank order, on every rank (arrays may differ in row count)."""
    if not active():
        return array
    device = _comm_device()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([len(array)], device=device))
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *array.shape[1:]), dtype=torch.from_numpy(array).dtype, device=device)
    padded[: len(array)] = torch.from_numpy(array).to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, sizes, strict=True)])


def finish() -> None:
    """Leave the process group once every rank is done (no rank exits while another still talks to it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
