"""How kc computes on a CPU: subnormal floats are flushed to zero.

A confident sigmoid head gives most of its (image, class) entries logits far below zero, and their losses,
gradients and Adam moments fall below float32's smallest normal number (1.2e-38), into the subnormal range, where a
CPU computes several times slower: a 10K-class generalist's epoch slowed from 6 to 14 s over its first 10 epochs,
and the cross-entropy of 256 x 10,000 logits near -95 takes 32 ms on 2 threads instead of 8 (docs/BENCHMARKS.md).
Values that small change nothing a float32 weight can hold.

The flag is a thread's own, a thread starts with its creator's, and it governs all of the thread's floating-point
arithmetic, Python's and numpy's included. So `kc`'s command line, a process of its own, sets it first thing, before
torch starts its worker threads (which then flush too); the trainer, which may run inside someone else's process,
sets it for its stage only (in the calling thread) and then puts it back, because other code there may rely on
IEEE-exact floats (hypothesis, for one, refuses to run without subnormals).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_PROCESS_WIDE = False  # set by `flush_subnormals_in_this_process`: nothing to put back afterwards


def flush_subnormals_in_this_process() -> None:
    """From now on, in this thread and every thread it starts later. For a process that is kc's own."""
    global _PROCESS_WIDE
    torch.set_flush_denormal(True)
    _PROCESS_WIDE = True


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Within: flushed in the calling thread. After: the default again, unless the whole process flushes."""
    if _PROCESS_WIDE:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
