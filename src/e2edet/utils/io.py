"""Atomic file writes: the one helper every writer of a whole file uses.

A file is written to a hidden temporary sibling in the same folder (``.<name>.<random>.tmp``), flushed and
fsynced, then moved over the target with :func:`os.replace` (atomic on POSIX and Windows within one file system).
A reader therefore sees either the old file or the complete new one, never a half-written file; a failure while
writing (an exception, a full disk) removes the temporary file and leaves the old file untouched. Parent folders
are created. The file gets the usual permissions of a new file (``0o666`` less the umask).

Checkpoint *folders* are swapped by :mod:`e2edet.engine.checkpoint` itself (a folder-level rename), not here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


def _create_temp_sibling(path: Path) -> tuple[int, Path]:
    """Create a new hidden file next to ``path`` (exclusively, so concurrent writers never share one)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Context manager: a file object whose content replaces ``path`` atomically when the block ends normally.

    Args:
        path: the file to (re)write; its parent folders are created.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: text encoding (ignored for ``"wb"``).
    Raises:
        ValueError: another ``mode``.
        OSError: the folder cannot be created or written; ``path`` is left untouched.

    If the block raises, the temporary file is removed, the exception propagates and ``path`` keeps its old content
    (or stays absent).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_sibling(path)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); returns ``path`` as a :class:`Path`."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`); returns ``path`` as a :class:`Path`."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, **json_kwargs: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_open`); returns ``path`` as a :class:`Path`.

    Args:
        path: the JSON file.
        obj: what to encode.
        **json_kwargs: passed to :func:`json.dump` (``indent``, ``default``, ...).
    Raises:
        TypeError / ValueError: ``obj`` holds something JSON cannot encode; ``path`` is left untouched.
    """
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **json_kwargs)
    return Path(path)
