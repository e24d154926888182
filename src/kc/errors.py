"""Every error a user can cause. The CLI prints these as one message (no traceback) and exits 2.

Messages name the file, line, key or class at fault and say how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class KCError(Exception):
    """Base of all user-facing errors."""


class ConfigError(KCError):
    """A run config (YAML) is missing, malformed, or has unknown keys or wrong types."""


class TaxonomyError(KCError):
    """A taxonomy file is malformed or inconsistent (duplicate ids, unknown parents, cycles, ...)."""


class DataError(KCError):
    """A manifest, image folder or image is malformed, missing or unreadable."""


class CheckpointError(KCError):
    """A checkpoint or run directory is missing, corrupt, or from an incompatible run."""


def format_problems(header: str, problems: list[str], limit: int = 20) -> str:
    """One message listing up to `limit` problems, so a user can fix them all in one go."""
    lines = [header] + [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


@contextmanager
def utf8_required(path: object, error: type[KCError]) -> Iterator[None]:
    """Reading `path` inside this block: a byte sequence that is not UTF-8 becomes `error`, naming the file."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a read); save it as UTF-8") from None
