"""Run folders: a fresh folder per training, a lock against two trainings in one folder, and resume paths.

A new training never writes into a folder that already holds files: it takes the first free numbered sibling
(``runs/defcn_mnv2_cpu-2``, ``-3``, ..., as Ultralytics does), unless the user asks to reuse the folder
(``--exist-ok``), in which case the previous run's outputs are removed (once the new training holds the folder's
lock and has built its data and model) so that nothing of two runs is mixed.
A resumed training writes into the folder it resumes. While a training runs, it holds ``<run>/.lock``
(:mod:`filelock`), so a second process that wants the same folder stops at once with a clear error.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from e2edet.config_checks import ConfigError

LOCK_NAME = ".lock"

#: What a training writes into its run folder (removed by :func:`clear_run`); anything else is left alone.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "loss.png", "*reliability.png", "summary.json", "eval*.json",
               "checkpoints", "predictions", ".metrics.jsonl*.tmp")


def _holds_files(path: Path) -> bool:
    return path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir())


def new_run_dir(path: str | Path, exist_ok: bool = False) -> Path:
    """Create and return the folder of a new training (nothing in it is removed here).

    Args:
        path: the wanted folder (``output_dir/name``).
        exist_ok: take ``path`` even when it holds files (the caller clears the previous run's outputs with
            :func:`clear_run` once it holds the folder's lock).
    Returns:
        ``path`` when it is absent, empty or ``exist_ok``; else the first of ``path-2``, ``path-3``, ... that did
        not exist (created here with ``mkdir``, which is atomic, so two trainings started at once never share a
        numbered folder; two that both find ``path`` empty are kept apart by the lock, :func:`acquire_run_lock`).
    Raises:
        ConfigError: ``path`` exists and is a file, or cannot be created (names the path).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run folder {path} is a file; choose another output= or name=")
    try:
        if exist_ok or not _holds_files(path):
            path.mkdir(parents=True, exist_ok=True)
            return path
        for n in range(2, 10_000):
            candidate = path.with_name(f"{path.name}-{n}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as err:
        raise ConfigError(f"cannot create run folder {path}: {err.strerror or err}") from err
    raise ConfigError(f"{path.parent}: no free run folder name {path.name}-N left")


def clear_run(path: str | Path) -> None:
    """Remove the outputs of a previous training (:data:`RUN_OUTPUTS`) from run folder ``path``."""
    for pattern in RUN_OUTPUTS:
        for item in Path(path).glob(pattern):
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def run_dir_of_checkpoint(path: str | Path) -> Path:
    """The run folder a ``--resume`` path belongs to.

    Args:
        path: a run folder, its ``checkpoints`` folder, a checkpoint folder (``checkpoints/last``) or a file in it.
    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--resume {p}: no such run folder or checkpoint")
    if p.is_file():
        p = p.parent
    if p.name == "checkpoints":
        return p.parent
    if p.parent.name == "checkpoints":
        return p.parent.parent
    return p


def remove_if_unused(path: str | Path) -> None:
    """Remove run folder ``path`` if it holds nothing but its lock file (a training that failed before writing
    anything), so that failed attempts do not leave ``NAME-2``, ``NAME-3``, ... behind. Call without the lock."""
    path = Path(path)
    if path.is_dir() and not _holds_files(path):
        (path / LOCK_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()


def acquire_run_lock(path: str | Path) -> FileLock:
    """Take ``<path>/.lock`` (the folder is created if needed); the caller releases it.

    Raises:
        ConfigError: another process holds the lock (names the folder and the lock file), or the folder cannot be
            created.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run folder {path}: {err.strerror or err}") from err
    lock = FileLock(str(path / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"run folder {path} is in use by another training (lock {path / LOCK_NAME}); wait for "
                          f"it to end, or train into another folder (output=DIR or name=NAME)") from None
    return lock


@contextlib.contextmanager
def lock_run_dir(path: str | Path) -> Iterator[Path]:
    """Hold ``<path>/.lock`` for the duration of the block (see :func:`acquire_run_lock`)."""
    lock = acquire_run_lock(path)
    try:
        yield Path(path)
    finally:
        lock.release()
