"""Paired bootstrap over images of a COCO AP difference (e.g. AP without NMS minus AP with NMS).

On a small validation set a difference of a few tenths of AP between two columns can be chance: which images happen
to be in the set. Resampling the images with replacement and recomputing both APs on each resample gives the spread
of the difference (the percentile bootstrap of Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13;
paired: both columns are evaluated on the same resampled images). Every AP is computed by faster-coco-eval's
``COCOeval_faster`` (the pycocotools algorithm, :func:`~e2edet.engine.coco_utils.run_cocoeval`), on a COCO dataset
built from the resampled images, each copy of an image renamed so that COCO counts it as many times as it was drawn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from faster_coco_eval import COCO

from e2edet.engine.coco_utils import as_coco, quiet_print, run_cocoeval

__all__ = ["paired_bootstrap_ap"]


def _ap(images: list[dict], annotations: list[dict], detections: list[dict], categories: list[dict],
        iou_type: str) -> float:
    """COCO AP (IoU 0.50:0.95, percent) of ``detections`` on the dataset ``images``/``annotations``; NaN when the
    images hold no non-crowd ground truth (COCO leaves AP undefined), 0 without detections."""
    gt = COCO({"images": images, "annotations": annotations, "categories": categories}, print_function=quiet_print)
    if not detections:
        return 0.0 if any(not a.get("iscrowd", 0) for a in annotations) else float("nan")
    value = float(run_cocoeval(gt, detections, iou_type).stats[0])
    return value * 100.0 if value >= 0 else float("nan")


def paired_bootstrap_ap(
    coco_gt: Any,
    detections_a: Sequence[dict],
    detections_b: Sequence[dict],
    num_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    image_ids: Sequence[int] | None = None,
    iou_type: str = "bbox",
) -> dict[str, Any]:
    """Percentile-bootstrap confidence interval of ``AP(a) - AP(b)`` over resampled images.

    Each of ``num_samples`` resamples draws ``n`` of the ``n`` images with replacement (NumPy ``default_rng(seed)``),
    and both APs are computed on those images (the same draw for ``a`` and ``b``).

    Args:
        coco_gt: ground truth (a ``faster_coco_eval.COCO``, a COCO dataset dict or a JSON path).
        detections_a, detections_b: COCO results (``image_id``, ``category_id``, ``bbox`` xywh pixels or
            ``segmentation`` RLE, ``score``), e.g. :meth:`e2edet.engine.evaluator.CocoEvaluator.detections` of
            the no-NMS and NMS columns.
        num_samples: bootstrap resamples (>= 1).
        seed: seed of the resampling.
        confidence: level of the two-sided percentile interval, in (0, 1).
        image_ids: the evaluated images (default: every ground-truth image).
        iou_type: ``"bbox"`` or ``"segm"``.

    Returns:
        ``{"metric": "AP", "a": AP(a), "b": AP(b), "difference": a - b`` (all on the full image set, percent),
        ``"mean"``: mean difference over the resamples, ``"ci": [low, high]``, ``"confidence"``, ``"share_a_ge_b"``:
        fraction of resamples where ``AP(a) >= AP(b)``, ``"num_samples"``: resamples with a defined AP (a resample
        that draws only images without ground truth is left out), ``"num_images"``, ``"seed"}``.

    Raises:
        ValueError: ``num_samples < 1``, ``confidence`` outside (0, 1), no image, an image id absent from the ground
            truth, or a detection of an image that is not among the evaluated ones.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    gt = as_coco(coco_gt)
    ids = [int(i) for i in (image_ids if image_ids is not None else gt.getImgIds())]
    if not ids:
        raise ValueError("paired_bootstrap_ap: no image to resample")
    images = {int(img["id"]): img for img in gt.dataset["images"]}
    missing = sorted(set(ids) - set(images))
    if missing:
        raise ValueError(f"image ids {missing[:5]} are not in the ground truth")
    annotations: dict[int, list[dict]] = defaultdict(list)
    for ann in gt.dataset.get("annotations", []):
        annotations[int(ann["image_id"])].append(ann)
    per_image: list[dict[int, list[dict]]] = []
    for name, dets in (("detections_a", detections_a), ("detections_b", detections_b)):
        grouped: dict[int, list[dict]] = defaultdict(list)
        for det in dets:
            grouped[int(det["image_id"])].append(det)
        unknown = sorted(set(grouped) - set(ids))
        if unknown:
            raise ValueError(f"{name}: detections of image ids {unknown[:5]} that are not evaluated")
        per_image.append(grouped)
    categories = gt.dataset.get("categories", [])

    def both_aps(sample: Sequence[int]) -> tuple[float, float]:
        imgs, anns, dets = [], [], ([], [])
        for new_id, image_id in enumerate(sample, start=1):  # each drawn copy is its own image
            imgs.append({**images[image_id], "id": new_id})
            anns += [{**a, "id": len(anns) + k + 1, "image_id": new_id} for k, a in enumerate(annotations[image_id])]
            for column, grouped in zip(dets, per_image):
                column += [{**d, "image_id": new_id} for d in grouped[image_id]]
        return tuple(_ap(imgs, anns, column, categories, iou_type) for column in dets)

    full_a, full_b = both_aps(ids)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(num_samples):
        a, b = both_aps([ids[i] for i in rng.integers(0, len(ids), len(ids))])
        if not (np.isnan(a) or np.isnan(b)):
            diffs.append(a - b)
    values = np.asarray(diffs, dtype=np.float64)
    tail = (1.0 - confidence) / 2.0 * 100.0
    defined = values.size > 0
    return {
        "metric": "AP", "a": full_a, "b": full_b, "difference": full_a - full_b,
        "mean": float(values.mean()) if defined else float("nan"),
        "ci": [float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))] if defined
        else [float("nan"), float("nan")],
        "confidence": confidence,
        "share_a_ge_b": float(np.mean(values >= 0)) if defined else float("nan"),
        "num_samples": int(values.size), "num_images": len(ids), "seed": seed,
    }
