"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kc.errors import KCError


def _file_mode() -> int:
    """What open() would give a new file under the process's umask (mkstemp's temporary files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


class WriteError(KCError, OSError):
    """A file could not be written (a full disk, a read-only folder): the previous version is left intact. An
    OSError too, for callers that handle failed writes as such."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) or _is_io_failure(exc):
            raise WriteError(_write_failure(path, exc, written)) from None
        raise


def _is_io_failure(exc: BaseException) -> bool:
    """Writers outside Python's io (safetensors) report a full disk in their own exception types."""
    text = str(exc)
    return "No space left" in text or "os error 28" in text or "StorageFull" in text


def _write_failure(path: Path, exc: BaseException, written: int) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MB free there"
    except OSError:
        free = "free space unknown"
    size = f"{written / 2**20:,.1f} MB" if written >= 2**20 // 10 else f"{written:,} bytes"
    needed = f", {size} of it written when it failed" if written else ""
    return (
        f"{path}: could not be written ({reason}; {free}{needed}). The previous version of the file, if any, is "
        "intact; free some space (or fix the cause) and run the same command again: it resumes"
    )


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file (hex), read in blocks: what a writer records and a reader checks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
