"""CrowdHuman metrics: AP50, mMR (log-average miss rate) and recall, as reported by DeFCN and One-to-Few.

Reimplemented from the official CrowdHuman evaluation used by both papers: Megvii-BaseDetection/cvpods
``cvpods/evaluation/crowdhumantools.py`` (``Image.compare_caltech``, ``Database.eval_AP``,
``Database.eval_MR``), copied unchanged into strongwolf/o2f ``crowdhuman/crowdhuman_metric.py``. Definitions:

* **Clipping.** Detection and ground-truth boxes (xyxy pixels) are clipped to the image as the official code
  does: ``x1`` to ``[0, W - 1]``, ``y1`` to ``[0, H - 1]``, ``x2`` to ``[0, W]``, ``y2`` to ``[0, H]``.
* **Overlaps.** ``IoU = inter / (area_det + area_gt - inter + 1e-6)`` and
  ``IoA = inter / (area_det + 1e-6)`` (intersection over the *detection* area), ``eps = 1e-6`` as official.
* **Matching** (per image and category, :func:`match_image`). Detections in descending score order; each
  takes the still-unmatched normal ground truth (``iscrowd = 0``) of largest ``IoU > iou_thresh`` (strictly
  greater, first one on ties) → true positive (TP). If there is none and some ignore region
  (``iscrowd = 1``) has ``IoA > iou_thresh`` (strict) the detection is ignored (neither TP nor FP; ignore
  regions are never used up); otherwise it is a false positive (FP).
* **Curve.** The TPs and FPs of all images are pooled and sorted by descending score (stable: ties keep
  image order, then score order). After the ``k``-th entry: ``recall_k = TP_k / G``,
  ``precision_k = TP_k / (TP_k + FP_k)``, ``FPPI_k = FP_k / N``, ``miss_rate_k = 1 - recall_k``, with ``G``
  the number of normal ground-truth boxes and ``N`` the number of ground-truth images (images without
  detections count).
* **AP50** (:func:`average_precision`): trapezoid rule between consecutive curve points,
  ``sum_k (recall_k - recall_{k-1}) * (precision_k + precision_{k-1}) / 2`` for ``k >= 2``; no
  precision envelope, and (as in the official code) no segment from recall 0 to the first point, so a
  perfect detector scores ``100 * (1 - 1 / G)``.
* **mMR** (:func:`log_average_miss_rate`): at each of the 9 reference FPPIs
  :data:`CALTECH_FPPI_REFS` (``10^-2 .. 10^0`` evenly in log space, rounded to 4 decimals as in the official
  code) take the miss rate of the *first* curve point with ``FPPI >= ref`` (the last point when the curve
  never reaches ``ref``); ``mMR = exp(mean(log(mr)))``. The official code uses no floor inside the log, so
  a zero miss rate at any reference point gives ``mMR = 0`` (the Caltech MATLAB toolbox floors at 1e-10
  and takes the last point with ``FPPI <= ref`` instead).
* **Recall**: ``TP / G`` over all detections (no score threshold, no per-image cap).

All three are returned in percent. Deviations from the official script, which only handles one class and
fails on empty results: several categories are evaluated class-aware (a detection only matches ground truth
and ignore regions of its own category) and pooled into one curve, so AP50/mMR/recall are over all
categories together (identical to the official numbers for CrowdHuman's single class); with no TP or FP at
all AP50 and recall are 0 and mMR is 100 (the official code returns NaN / raises).
"""

from __future__ import annotations

from collections import defaultdict
from numbers import Real
from typing import Any, Sequence

import numpy as np

from e2edet.engine.coco_utils import as_coco

__all__ = [
    "CALTECH_FPPI_REFS", "OVERLAP_EPS", "box_overlaps", "clip_boxes", "match_image", "crowd_curves",
    "average_precision", "log_average_miss_rate", "crowd_metrics",
]

CALTECH_FPPI_REFS = (0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.0000)
"""Reference FPPIs of mMR: ``10 ** linspace(-2, 0, 9)`` rounded to 4 decimals, as in the official code."""

OVERLAP_EPS = 1e-6
"""Added to the IoU / IoA denominators, as in the official code."""


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip ``[K, 4]`` xyxy pixel boxes to the image the way the official CrowdHuman evaluation does.

    ``x1 -> clip(x1, 0, W - 1)``, ``y1 -> clip(y1, 0, H - 1)``, ``x2 -> clip(x2, 0, W)``, ``y2 -> clip(y2, 0, H)``.

    Returns:
        A new float64 ``[K, 4]`` array.
    """
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, 0] = np.clip(out[:, 0], 0, width - 1)
    out[:, 1] = np.clip(out[:, 1], 0, height - 1)
    out[:, 2] = np.clip(out[:, 2], 0, width)
    out[:, 3] = np.clip(out[:, 3], 0, height)
    return out


def box_overlaps(det: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and IoA (intersection over detection area) of every detection with every ground-truth box.

    Args:
        det: ``[D, 4]`` detection boxes, xyxy pixels.
        gt: ``[G, 4]`` ground-truth boxes, xyxy pixels.

    Returns:
        ``(iou, ioa)``, float64 ``[D, G]`` each; denominators carry ``+ OVERLAP_EPS`` as in the official code.
    """
    det = np.asarray(det, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(det[:, None, 2], gt[None, :, 2]) - np.maximum(det[:, None, 0], gt[None, :, 0])
    ih = np.minimum(det[:, None, 3], gt[None, :, 3]) - np.maximum(det[:, None, 1], gt[None, :, 1])
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    det_area = ((det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1]))[:, None]
    gt_area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None, :]
    iou = inter / (det_area + gt_area - inter + OVERLAP_EPS)
    ioa = inter / (det_area + OVERLAP_EPS)
    return iou, ioa


def match_image(
    det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray, gt_ignore: np.ndarray,
    iou_thresh: float = 0.5,
) -> np.ndarray:
    """Match the detections of one image (and one category) to its ground truth, CrowdHuman/Caltech style.

    See the module doc (official ``Image.compare_caltech``): greedy in descending score, a detection takes the
    unmatched normal box of largest ``IoU > iou_thresh``; failing that, it is ignored if an ignore region has
    ``IoA > iou_thresh``, else it is a false positive. Boxes are used as given (clip them first with
    :func:`clip_boxes` to follow the official protocol).

    Args:
        det_boxes: ``[D, 4]`` xyxy pixels.
        det_scores: ``[D]`` scores (ties keep input order).
        gt_boxes: ``[G, 4]`` xyxy pixels.
        gt_ignore: ``[G]`` bool, True for ignore regions (COCO ``iscrowd = 1``).
        iou_thresh: overlap threshold (strict ``>``), 0.5 in the papers.

    Returns:
        int8 ``[D]`` in input order: 1 true positive, 0 false positive, -1 ignored.

    Raises:
        ValueError: inconsistent shapes.
    """
    det_boxes = np.asarray(det_boxes, dtype=np.float64)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64)
    det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    gt_ignore = np.asarray(gt_ignore, dtype=bool).reshape(-1)
    if det_boxes.size and det_boxes.shape != (len(det_scores), 4):
        raise ValueError(f"det_boxes must be [D, 4] with D = len(det_scores) = {len(det_scores)}, "
                         f"got {det_boxes.shape}")
    if gt_boxes.size and gt_boxes.shape != (len(gt_ignore), 4):
        raise ValueError(f"gt_boxes must be [G, 4] with G = len(gt_ignore) = {len(gt_ignore)}, got {gt_boxes.shape}")
    status = np.zeros(len(det_scores), dtype=np.int8)
    if len(det_scores) == 0 or len(gt_ignore) == 0:
        return status
    iou, ioa = box_overlaps(det_boxes, gt_boxes)
    normal = np.flatnonzero(~gt_ignore)
    ignore = np.flatnonzero(gt_ignore)
    taken = np.zeros(len(normal), dtype=bool)
    for i in np.argsort(-det_scores, kind="stable"):
        candidates = np.where(taken, -np.inf, iou[i, normal])
        if len(normal) and candidates.max() > iou_thresh:
            j = int(np.argmax(candidates))  # first of equal maxima, like the official strict '>' scan
            taken[j] = True
            status[i] = 1
        elif len(ignore) and ioa[i, ignore].max() > iou_thresh:
            status[i] = -1
    return status


def crowd_curves(
    scores: np.ndarray, is_tp: np.ndarray, num_gt: int, num_images: int
) -> dict[str, np.ndarray]:
    """Recall, precision, FPPI and miss-rate curves of pooled TP/FP detections (ignored ones left out).

    Args:
        scores: ``[K]`` scores of the TP and FP detections of the whole data set.
        is_tp: ``[K]`` bool, True for a true positive.
        num_gt: ``G``, the number of normal ground-truth boxes (> 0).
        num_images: ``N``, the number of ground-truth images (> 0).

    Returns:
        ``{"recall", "precision", "fppi", "miss_rate"}``, float64 ``[K]`` each, entry ``k`` after the ``k+1``
        highest-scoring detections (stable sort: ties keep input order).

    Raises:
        ValueError: ``num_gt`` or ``num_images`` not positive, or length mismatch.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_tp = np.asarray(is_tp, dtype=bool).reshape(-1)
    if len(scores) != len(is_tp):
        raise ValueError(f"scores ({len(scores)}) and is_tp ({len(is_tp)}) differ in length")
    if num_gt <= 0 or num_images <= 0:
        raise ValueError(f"num_gt and num_images must be positive, got {num_gt} and {num_images}")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(is_tp[order], dtype=np.float64)
    fp = np.cumsum(~is_tp[order], dtype=np.float64)
    recall = tp / num_gt
    return {"recall": recall, "precision": tp / np.maximum(tp + fp, 1), "fppi": fp / num_images,
            "miss_rate": 1.0 - recall}


def average_precision(recall: Sequence[float], precision: Sequence[float]) -> float:
    """Area under a precision-recall curve by the official CrowdHuman rule (fraction, 0-1).

    Trapezoid rule between consecutive points: ``sum_{k>=1} (r_k - r_{k-1}) * (p_k + p_{k-1}) / 2``, with no
    precision envelope and no segment before the first point (official ``Database.eval_AP``).

    Args:
        recall, precision: ``[K]`` curves in detection order (see :func:`crowd_curves`).

    Returns:
        The area; 0.0 for fewer than two points.
    """
    r = np.asarray(recall, dtype=np.float64).reshape(-1)
    p = np.asarray(precision, dtype=np.float64).reshape(-1)
    if len(r) != len(p):
        raise ValueError(f"recall ({len(r)}) and precision ({len(p)}) differ in length")
    if len(r) < 2:
        return 0.0
    return float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2))


def log_average_miss_rate(
    fppi: Sequence[float], miss_rate: Sequence[float], refs: Sequence[float] = CALTECH_FPPI_REFS
) -> float:
    """Log-average miss rate over reference FPPIs (fraction, 0-1), official CrowdHuman rule.

    For each ``ref`` take ``miss_rate`` at the first point with ``fppi >= ref`` (the last point when none
    reaches it); return ``exp(mean(log(mr)))``. No floor inside the log: any zero sampled miss rate gives 0.0
    (numpy's ``exp(-inf)`` in the official code).

    Args:
        fppi: ``[K]`` false positives per image, non-decreasing (detection order, see :func:`crowd_curves`).
        miss_rate: ``[K]`` miss rates ``1 - recall`` at the same points.
        refs: reference FPPIs, default :data:`CALTECH_FPPI_REFS` (9 points in ``[1e-2, 1]``).

    Returns:
        The log-average miss rate; 1.0 for an empty curve (no detections: everything missed).

    Raises:
        ValueError: length mismatch or decreasing ``fppi``.
    """
    x = np.asarray(fppi, dtype=np.float64).reshape(-1)
    y = np.asarray(miss_rate, dtype=np.float64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"fppi ({len(x)}) and miss_rate ({len(y)}) differ in length")
    if len(x) == 0:
        return 1.0
    if np.any(np.diff(x) < 0):
        raise ValueError("fppi must be non-decreasing (points in descending-score order)")
    idx = np.minimum(np.searchsorted(x, np.asarray(refs, dtype=np.float64), side="left"), len(x) - 1)
    sampled = y[idx]
    if np.any(sampled <= 0):
        return 0.0
    return float(np.exp(np.mean(np.log(sampled))))


def _xyxy(bbox: Any, where: str) -> list[float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, Real) for v in bbox):
        raise ValueError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def crowd_metrics(
    coco_gt: Any, detections: Sequence[dict], iou_thresh: float = 0.5, cat_ids: Sequence[int] | None = None
) -> dict[str, float]:
    """CrowdHuman AP50, mMR and recall (percent, 0-100) of COCO-format detections.

    Follows the official CrowdHuman evaluation (definitions in the module doc): boxes clipped to the image,
    greedy matching at ``IoU > iou_thresh`` per image and category, detections with ``IoA > iou_thresh`` on
    an ignore region (``iscrowd = 1``) ignored, one pooled score-sorted curve over all images.

    Args:
        coco_gt: ground truth as a ``faster_coco_eval.COCO``, a COCO dict or a JSON path; ``iscrowd = 1``
            annotations are ignore regions. Every image counts for FPPI, with or without detections.
        detections: COCO results list, dicts with ``image_id``, ``category_id``, ``bbox`` (COCO
            ``[x, y, w, h]`` pixels) and ``score``. All are used (no per-image cap).
        iou_thresh: matching threshold (0.5 gives the papers' AP50, mMR and recall).
        cat_ids: categories to evaluate (default all ground-truth categories); detections of other
            categories are skipped. Matching is class-aware and the categories are pooled into one curve.

    Returns:
        ``{"AP50": float, "mMR": float, "recall": float}`` in percent; AP50 and recall are 0 and mMR 100
        when there is no TP or FP detection.

    Raises:
        ValueError: a detection with a missing key, a bad bbox, an image id absent from the ground truth or a
            category id absent from its categories; ``cat_ids`` unknown; no normal ground-truth box in the
            evaluated categories; no images.
        FileNotFoundError / TypeError: ``coco_gt`` is a missing path or of another type.
    """
    dataset = as_coco(coco_gt).dataset
    images = {int(img["id"]): (float(img["width"]), float(img["height"])) for img in dataset.get("images", [])}
    all_cats = [int(c["id"]) for c in dataset.get("categories", [])]
    cats = set(all_cats if cat_ids is None else (int(c) for c in cat_ids))
    if not images:
        raise ValueError("crowd_metrics: the ground truth has no images")
    if not cats <= set(all_cats):
        raise ValueError(f"crowd_metrics: cat_ids {sorted(cats - set(all_cats))} not among the ground-truth "
                         f"categories {all_cats}")
    gts: dict[tuple[int, int], list[tuple[list[float], bool]]] = defaultdict(list)
    for ann in dataset.get("annotations", []):
        if int(ann["category_id"]) in cats:
            key = (int(ann["image_id"]), int(ann["category_id"]))
            gts[key].append((_xyxy(ann["bbox"], f"annotation id {ann.get('id')}"), bool(ann.get("iscrowd", 0))))
    num_gt = sum(not ign for boxes in gts.values() for _, ign in boxes)
    if num_gt == 0:
        raise ValueError(f"crowd_metrics: no normal (iscrowd = 0) ground-truth box in categories {sorted(cats)}")
    dets: dict[tuple[int, int], list[tuple[list[float], float]]] = defaultdict(list)
    for k, det in enumerate(detections):
        where = f"detection {k}"
        missing = [key for key in ("image_id", "category_id", "bbox", "score") if key not in det]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        image_id, cat_id = int(det["image_id"]), int(det["category_id"])
        if image_id not in images:
            raise ValueError(f"{where}: image_id {image_id} is not in the ground truth")
        if cat_id not in all_cats:
            raise ValueError(f"{where}: category_id {cat_id} is not among the ground-truth categories {all_cats}")
        if cat_id in cats:
            dets[(image_id, cat_id)].append((_xyxy(det["bbox"], where), float(det["score"])))
    scores: list[np.ndarray] = []
    is_tp: list[np.ndarray] = []
    for image_id, (width, height) in images.items():
        for cat_id in sorted(cats):
            image_dets = dets.get((image_id, cat_id))
            if not image_dets:
                continue
            image_gts = gts.get((image_id, cat_id), [])
            det_scores = np.array([s for _, s in image_dets])
            status = match_image(
                clip_boxes(np.array([b for b, _ in image_dets]), width, height), det_scores,
                clip_boxes(np.array([b for b, _ in image_gts]).reshape(-1, 4), width, height),
                np.array([ign for _, ign in image_gts], dtype=bool), iou_thresh,
            )
            order = np.argsort(-det_scores, kind="stable")  # image order, then score: official tie order
            keep = order[status[order] >= 0]
            scores.append(det_scores[keep])
            is_tp.append(status[keep] == 1)
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    all_tp = np.concatenate(is_tp) if is_tp else np.zeros(0, dtype=bool)
    curves = crowd_curves(all_scores, all_tp, num_gt, len(images))
    recall = float(curves["recall"][-1]) if len(all_scores) else 0.0
    return {
        "AP50": 100.0 * average_precision(curves["recall"], curves["precision"]),
        "mMR": 100.0 * log_average_miss_rate(curves["fppi"], curves["miss_rate"]),
        "recall": 100.0 * recall,
    }
