"""Small COCO helpers shared by the evaluator, the diagnostics, the crowd metrics and the predictor's COCO results
(no e2edet imports)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_utils

__all__ = ["as_coco", "encode_masks", "quiet_print", "run_cocoeval"]


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


def run_cocoeval(coco_gt: COCO, detections: list[dict[str, Any]], iou_type: str = "bbox",
                 image_ids: list[int] | None = None) -> COCOeval_faster:
    """Evaluated, accumulated and summarised ``COCOeval_faster`` of COCO results ``detections`` (not empty) on
    ``coco_gt``, over ``image_ids`` (default: every ground-truth image); its ``stats`` hold AP, AP50, ... as
    fractions (-1 where undefined)."""
    coco_eval = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), iouType=iou_type, print_function=quiet_print)
    if image_ids is not None:
        coco_eval.params.imgIds = image_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Binary masks as COCO RLE, the ``segmentation`` of ``segm`` results (faster-coco-eval's ``mask.encode``, the
    pycocotools algorithm).

    Args:
        masks: ``[k, H, W]`` bool or 0/1 integers (any nonzero value is inside), on any device.
    Returns:
        ``k`` dicts ``{"size": [H, W], "counts": str}`` (compressed RLE, counts decoded to ASCII so they go into
        JSON), in order.
    """
    if masks.dim() != 3:
        raise ValueError(f"encode_masks: expected [k, H, W] masks, got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    masks = masks.detach().to("cpu")
    binary = masks.to(torch.uint8) if masks.dtype == torch.bool else masks.ne(0).to(torch.uint8)
    # [k, W, H] C-contiguous is [H, W, k] Fortran-ordered, the layout the RLE encoder reads: one copy, no other
    array = binary.transpose(1, 2).contiguous().numpy().transpose(2, 1, 0)
    rles = mask_utils.encode(array)
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]
