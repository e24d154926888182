"""Peak resident memory of this process over a stretch of work (a pipeline stage), sampled by a thread.

The kernel's own peak (`ru_maxrss`) only grows over a process's life, so it cannot tell which of a pipeline's
stages reached it; a thread reading the current resident size a few times a second can. Where /proc is absent
(not Linux) the process's peak so far stands in.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from types import TracebackType

_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


def resident_mib() -> float:
    """The process's resident set size now (Linux), or its peak so far elsewhere, in MiB."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE_MIB
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


class PeakMemory:
    """`with PeakMemory() as peak: ...`, then `peak.mib`: the highest resident size seen inside, sampled every
    `interval` seconds and at entry and exit (a spike shorter than the interval can be missed)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="kc-peak-memory", daemon=True)

    def _sample(self) -> None:
        while True:
            self.mib = max(self.mib, resident_mib())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self.mib = resident_mib()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.mib = max(self.mib, resident_mib())
