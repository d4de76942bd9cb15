"""COCO instance masks: checking and decoding an annotation's ``segmentation`` (polygons, RLE) to a binary mask.

The decoding is faster-coco-eval's mask API (``faster_coco_eval.core.mask.segmToRle`` and ``decode``, the C++ port of
pycocotools' ``COCO.annToRLE`` / ``maskUtils.decode``), so a mask here is pixel for pixel the mask COCO's ``segm``
evaluation rasterises.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from faster_coco_eval.core import mask as mask_utils

__all__ = ["decode_segmentation", "segmentation_problem"]


def segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """Why ``segm`` is not a COCO instance segmentation of an ``height`` x ``width`` image, or None when it is.

    Accepted forms (COCO's): a non-empty list of polygons, each a flat list ``[x1, y1, x2, y2, ...]`` of at least 3
    points (6 finite numbers, an even count); or an RLE dict ``{"size": [height, width], "counts": ...}`` with
    ``counts`` a string (compressed RLE) or a list of non-negative integers (uncompressed RLE) summing to
    ``height·width``.
    """
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2) or [int(s) for s in size] != [height, width]:
            return f"RLE size {size!r} differs from the image's [height, width] = [{height}, {width}]"
        if isinstance(counts, (str, bytes)):
            return None if counts else "RLE counts is empty"
        if isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
            total = sum(counts)
            return None if total == height * width else f"RLE counts sum to {total}, not {height}x{width}"
        return "RLE counts must be a string (compressed) or a list of non-negative integers (uncompressed)"
    if isinstance(segm, list) and segm:
        for polygon in segm:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return "a polygon must be a flat list [x1, y1, x2, y2, ...] of at least 3 points"
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in polygon):
                return "a polygon holds a value that is not a finite number"
        return None
    return "expected a list of polygons or an RLE dict {size, counts}"


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Rasterise one annotation's ``segmentation`` (see :func:`segmentation_problem`) to ``uint8 [height, width]``
    (1 inside). Several polygons of one object are merged (union), as COCO does.

    Raises:
        ValueError: ``segm`` is not a valid segmentation of this image size (the message says why).
    """
    problem = segmentation_problem(segm, height, width)
    if problem is not None:
        raise ValueError(problem)
    if isinstance(segm, dict) and isinstance(segm["counts"], str):
        segm = {"size": list(segm["size"]), "counts": segm["counts"].encode("ascii")}
    rle = mask_utils.segmToRle(segm, width, height)  # note the (w, h) order of this function
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
