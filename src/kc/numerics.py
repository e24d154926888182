"""How kc computes on a CPU: subnormal floats are flushed to zero.

A confident sigmoid head gives most of its (image, class) entries logits far below zero, and their losses,
gradients and Adam moments fall below float32's smallest normal number (1.2e-38), into the subnormal range, where a
CPU computes several times slower: a 10K-class generalist's epoch slowed from 6 to 14 s over its first 10 epochs,
and the cross-entropy of 256 x 10,000 logits near -95 takes 32 ms on 2 threads instead of 8 (docs/BENCHMARKS.md).
Values that small change nothing a float32 weight can hold.

The flag is a thread's own, and a thread starts with its creator's: torch's worker threads follow it only if it is
set before they start, which is why `kc`'s command line sets it first thing. A trainer sets it too (for the
calling thread at least), so that training through the library computes as the command line does.
"""

from __future__ import annotations

import torch


def flush_subnormals() -> None:
    """Flush subnormal float results to zero from now on, in this thread and in the threads it starts later."""
    torch.set_flush_denormal(True)
