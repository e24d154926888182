"""Locks on the parts of a run directory that one process writes at a time (a stage, a cache shard).

A lock is an exclusive `flock` on a file (`<directory>/.lock`, or `.<name>.lock` for one of several) that holds
who took it (PID, host, start time, command), so that a second process is refused at once with a message naming
the holder. The operating system
drops the lock when its process ends, however it ends: a lock left by a dead process is simply taken over, with
no PID guessing. Locks are per stage directory (each specialist has its own), so `--jobs`, `--shard` and the ranks
of one torchrun (only rank 0 takes a stage's lock) keep working side by side.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import IO

from kc.errors import KCError


class RunLockedError(KCError):
    pass


class DirectoryLock:
    """`with DirectoryLock(directory, what):` holds `directory`'s lock (or its lock `name`) for the block, or raises
    RunLockedError; `what` names what is being written, for the message."""

    def __init__(self, directory: Path, what: str, name: str = ""):
        self.path = Path(directory) / (f".{name}.lock" if name else ".lock")
        self.what = what
        self._file: IO[str] | None = None

    def __enter__(self) -> DirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for as long as the lock)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = _describe(file.read())
            file.close()
            raise RunLockedError(
                f"{self.path.parent}: {self.what} is being written by another process ({holder}); wait for it to "
                "finish or stop it, or give this command another run_dir"
            ) from None
        file.seek(0)
        file.truncate()
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        file.write(json.dumps(holder) + "\n")
        file.flush()
        self._file = file
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"PID {holder['pid']} on {holder['host']}, since {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"
