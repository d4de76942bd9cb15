"""Small COCO helpers shared by the evaluator, the diagnostics and the crowd metrics (no e2edet imports)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from faster_coco_eval import COCO

__all__ = ["as_coco", "quiet_print"]


def quiet_print(*args: Any, **kwargs: Any) -> None:
    """Print function that discards faster-coco-eval's progress messages (its ``print_function`` argument)."""


def as_coco(coco_gt: Any) -> COCO:
    """A :class:`faster_coco_eval.COCO` from a COCO object, a dataset dict, or a JSON path.

    A COCO object is returned as is; a dict is deep-copied first (the caller's dict is never modified).

    Raises:
        FileNotFoundError: a path that is not a file.
        TypeError: anything else.
    """
    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, Mapping):
        return COCO(copy.deepcopy(dict(coco_gt)), print_function=quiet_print)
    if isinstance(coco_gt, (str, Path)):
        if not Path(coco_gt).is_file():
            raise FileNotFoundError(f"COCO annotation file {coco_gt} does not exist")
        return COCO(str(coco_gt), print_function=quiet_print)
    raise TypeError(f"coco_gt must be a COCO object, a dict or a path, got {type(coco_gt).__name__}")
