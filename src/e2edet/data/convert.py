"""Importers from other annotation formats to COCO detection JSON, and writing COCO JSON.

The importers live in :mod:`e2edet.data.voc` (Pascal VOC XML), :mod:`e2edet.data.yolo` (YOLO txt) and
:mod:`e2edet.data.crowdhuman` (CrowdHuman ``.odgt``); this module gathers them with :func:`save_coco_json`
so that callers have one place to import from.
"""

from __future__ import annotations

from pathlib import Path

from e2edet.data.crowdhuman import odgt_to_coco
from e2edet.data.voc import voc_to_coco
from e2edet.data.yolo import read_class_names, yolo_to_coco
from e2edet.utils.io import atomic_write_json

__all__ = ["voc_to_coco", "yolo_to_coco", "odgt_to_coco", "read_class_names", "save_coco_json"]


def save_coco_json(coco: dict, path: str | Path) -> Path:
    """Write a COCO dict as JSON atomically (:func:`e2edet.utils.io.atomic_write_json`).

    A crash or a full disk never leaves a half-written file at ``path``; parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: the dict holds values JSON cannot encode (e.g. tensors); ``path`` is left untouched.
        OSError: the folder is not writable.
    """
    return atomic_write_json(path, coco)
