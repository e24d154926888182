"""Running per-vertical work (specialists, the soft-target cache) as shards in separate local processes.

`--shard I/N` takes the verticals v with v % N == I (`kc.train.specialists.shard_verticals`), so N jobs (local
processes, GPUs, or machines sharing the run directory) cover every vertical once; the work of each vertical is
seeded on its own, so the result does not depend on how it was split. `--jobs N` starts N local shard processes
(`kc COMMAND RUN --shard I/N`) and waits for them: orchestration, above the training layer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from kc.errors import KCError
from kc.run import Run


def run_shard_jobs(
    run: Run, command: str, jobs: int, overrides: list[str] | None = None, extra: tuple[str, ...] = ()
) -> None:
    """`kc COMMAND RUN --shard I/N [--set OVERRIDE]... EXTRA...` for I in 0..N-1 as local processes at once, each
    with an equal share of the CPU threads and, on a machine with GPUs, device I mod (GPU count)."""
    extra = (*(arg for o in overrides or [] for arg in ("--set", o)), *extra)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    gpus = torch.cuda.device_count()
    processes = []
    for index in range(jobs):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        argv = [sys.executable, "-m", "kc.cli", command, str(run.dir), "--shard", f"{index}/{jobs}", "--no-progress"]
        processes.append(subprocess.Popen([*argv, *extra], env=env))
    failed = [i for i, p in enumerate(processes) if p.wait() != 0]
    if failed:
        raise KCError(
            f"{command}: shard(s) {', '.join(f'{i}/{jobs}' for i in failed)} failed (see their messages above); "
            "run the same command again to resume them"
        )
