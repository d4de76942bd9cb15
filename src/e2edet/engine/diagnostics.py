"""End-to-end diagnostics on COCO-format detections: greedy TP matching, duplicate rate, calibration (ECE).

All functions are pure (no collectives). Inputs:

* ground truth as accepted by :class:`e2edet.engine.evaluator.CocoEvaluator` (a ``faster_coco_eval.COCO``, a
  COCO dataset dict or a path to its JSON); boxes ``bbox`` are ``[x, y, w, h]`` in pixels, ``iscrowd=1`` marks
  an ignore region;
* detections in COCO results format: a list of ``{"image_id", "category_id", "bbox": [x, y, w, h] pixels,
  "score" in [0, 1]}`` (what :meth:`CocoEvaluator.detections` returns).

The calibration measure follows the suggested reproduction of the D-RMM README Figure 2 (reliability diagram) in
``specs/query.md`` §3.7: per image the detections are greedily matched, by descending score, to unmatched
same-class ground truth at IoU >= 0.5; precision(bin) = #TP / #detections in the bin over 20 equal-width
confidence bins; ECE = sum_b (n_b / n) |precision_b - confidence_b|. The D-RMM authors did not publish their
exact TP criterion or bin count, so these are our choices, not theirs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from e2edet.engine.coco_utils import as_coco
from e2edet.utils.io import atomic_open


def _pairwise_inter(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas ``[len(a), len(b)]`` of xyxy boxes ``a`` ``[N, 4]`` and ``b`` ``[M, 4]``."""
    wh = np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2])
    return np.clip(wh, 0.0, None).prod(axis=2)


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    """``[N, 4]`` xywh -> xyxy (float64)."""
    out = np.asarray(xywh, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 2:] += out[:, :2]
    return out


def _detection_arrays(detections: Sequence[Mapping[str, Any]], image_ids: np.ndarray, cat_ids: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(image_id [D] int64, category_id [D] int64, xyxy [D, 4] float64, score [D] float64)`` of COCO results.

    Raises ValueError naming the first malformed detection (missing key, bbox not 4 finite numbers, non-finite
    score, image or category id absent from the ground truth).
    """
    n = len(detections)
    try:
        img = np.array([d["image_id"] for d in detections], dtype=np.int64).reshape(n)
        cat = np.array([d["category_id"] for d in detections], dtype=np.int64).reshape(n)
        score = np.array([d["score"] for d in detections], dtype=np.float64).reshape(n)
        box = np.array([d["bbox"] for d in detections], dtype=np.float64).reshape(n, 4)
    except (KeyError, TypeError, ValueError):  # find the culprit for the message
        for i, det in enumerate(detections):
            missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
            if missing:
                raise ValueError(f"detection {i} lacks keys {missing} (COCO results format expected)") from None
            if np.asarray(det["bbox"]).shape != (4,):
                raise ValueError(f"detection {i}: bbox must be [x, y, w, h], got {det['bbox']!r}") from None
        raise
    bad = ~np.isfinite(score) | ~np.isfinite(box).all(axis=1)
    for mask, what in ((bad, "non-finite score or bbox"), (~np.isin(img, image_ids), "image id not in the ground "
                       "truth"), (~np.isin(cat, cat_ids), f"category id not in the ground truth {cat_ids.tolist()}")):
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            raise ValueError(f"detection {i} (image id {img[i]}, category id {cat[i]}, score {score[i]}, bbox "
                             f"{detections[i]['bbox']}): {what}")
    return img, cat, _xyxy(box), score


def _gt_by_image(coco: Any) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``{image_id: (xyxy [G, 4], category_id [G], iscrowd [G] bool, annotation id [G])}`` of the ground truth."""
    grouped: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for ann in coco.dataset.get("annotations", []):
        grouped[int(ann["image_id"])].append(ann)
    return {img: (_xyxy(np.array([a["bbox"] for a in anns], dtype=np.float64)),
                  np.array([int(a["category_id"]) for a in anns], dtype=np.int64),
                  np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
                  np.array([int(a["id"]) for a in anns], dtype=np.int64))
            for img, anns in grouped.items()}


def _area(b: np.ndarray) -> np.ndarray:
    """Areas ``[N]`` of xyxy boxes ``[N, 4]``."""
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def match_detections(coco_gt: Any, detections: Sequence[Mapping[str, Any]], iou_thresh: float = 0.5
                     ) -> dict[str, np.ndarray]:
    """Greedy, class-aware matching of detections to ground truth, COCO style.

    Per (image, category) the detections are visited by descending score (stable: ties keep input order). A
    detection is a true positive (TP) when some not-yet-matched non-crowd GT box of its class has IoU >=
    ``iou_thresh``; it takes the one with the highest IoU (first in annotation order on ties), which is then
    matched. Otherwise it is *ignored* when its crowd IoU (intersection / detection area, COCO's definition)
    with a crowd GT (``iscrowd=1``) of its class is >= ``iou_thresh``, and a false positive (FP) else. It is a
    *duplicate* when it is neither TP nor ignored and has IoU >= ``iou_thresh`` with a same-class non-crowd GT
    that a higher-scored detection (earlier in the visiting order) already matched. This is COCO's matching at
    one IoU threshold without the per-image ``maxDets`` cap.

    Args:
        coco_gt: ground truth (COCO object, dataset dict or JSON path), boxes xywh pixels.
        detections: COCO results-format list (``bbox`` xywh pixels).
        iou_thresh: IoU threshold of a match, in (0, 1].
    Returns:
        Arrays aligned with ``detections`` (length D): ``score`` float64; ``is_tp``, ``is_ignored``,
        ``is_duplicate`` bool; ``best_iou`` float64, the highest IoU with any same-class non-crowd GT (0 if
        none); ``best_gt_id`` int64, the annotation id of that GT (-1 when ``best_iou`` is 0);
        ``matched_gt_id`` int64, the annotation id a TP matched (-1 for non-TPs).
    Raises:
        ValueError: ``iou_thresh`` outside (0, 1]; a detection with missing keys, a bbox that is not 4 finite
            numbers, a non-finite score, or an image/category id absent from the ground truth.
    """
    if not 0.0 < iou_thresh <= 1.0:
        raise ValueError(f"iou_thresh must be in (0, 1], got {iou_thresh}")
    coco = as_coco(coco_gt)
    img, cat, boxes, score = _detection_arrays(detections, np.array(sorted(coco.getImgIds()), dtype=np.int64),
                                               np.array(sorted(coco.getCatIds()), dtype=np.int64))
    n = len(detections)
    out = {"score": score, "is_tp": np.zeros(n, bool), "is_ignored": np.zeros(n, bool),
           "is_duplicate": np.zeros(n, bool), "best_iou": np.zeros(n, np.float64),
           "best_gt_id": np.full(n, -1, np.int64), "matched_gt_id": np.full(n, -1, np.int64)}
    order = np.argsort(-score, kind="stable")
    order = order[np.argsort(img[order], kind="stable")]  # by image, then by descending score
    gts = _gt_by_image(coco)
    starts = np.flatnonzero(np.r_[True, img[order][1:] != img[order][:-1]]) if n else np.zeros(0, np.int64)
    for idx in np.split(order, starts[1:]) if n else []:
        if int(img[idx[0]]) not in gts:
            continue  # every detection of an image without ground truth is a FP
        gt_boxes, gt_cat, gt_crowd, gt_ids = gts[int(img[idx[0]])]
        same = cat[idx][:, None] == gt_cat[None, :]  # class-aware: [D, G]
        inter = _pairwise_inter(boxes[idx], gt_boxes)
        det_area = _area(boxes[idx])[:, None]
        union = det_area + _area(gt_boxes)[None, :] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        iou[~same | gt_crowd[None, :]] = 0.0  # IoU with same-class non-crowd GT only
        crowd_iou = np.divide(inter, det_area, out=np.zeros_like(inter), where=det_area > 0)
        in_crowd = ((crowd_iou >= iou_thresh) & same & gt_crowd[None, :]).any(axis=1)
        best = iou.argmax(axis=1)
        best_iou = iou[np.arange(len(idx)), best]
        out["best_iou"][idx] = best_iou
        out["best_gt_id"][idx] = np.where(best_iou > 0, gt_ids[best], -1)
        hits = iou >= iou_thresh
        any_hit = hits.any(axis=1)
        out["is_ignored"][idx] = in_crowd & ~any_hit  # the overlapping ones are decided below
        matched = np.zeros(len(gt_ids), bool)
        for row in np.flatnonzero(any_hit):  # visiting order = descending score
            free = hits[row] & ~matched
            if free.any():
                g = int(np.argmax(np.where(free, iou[row], -1.0)))
                matched[g] = True
                out["is_tp"][idx[row]] = True
                out["matched_gt_id"][idx[row]] = gt_ids[g]
            elif in_crowd[row]:
                out["is_ignored"][idx[row]] = True
            else:  # every GT it overlaps at >= iou_thresh was taken by a higher-scored detection
                out["is_duplicate"][idx[row]] = True
    return out


def duplicate_stats(matches: Mapping[str, np.ndarray], conf_thresh: float = 0.3) -> dict[str, Any]:
    """Duplicate rate of the confident detections.

    Confident detections are the non-ignored ones with ``score >= conf_thresh``. A duplicate is defined in
    :func:`match_detections` (not TP, not ignored, IoU >= the match threshold with a same-class GT already
    matched by a higher-scored detection). ``duplicate_rate = 100 * #confident duplicates / #confident``
    (percent, 0-100; 0 when there is no confident detection).

    Args:
        matches: output of :func:`match_detections`.
        conf_thresh: score threshold of a confident detection.
    Returns:
        ``{"duplicate_rate": float percent, "num_confident": int, "num_duplicates": int}``.
    """
    confident = (matches["score"] >= conf_thresh) & ~matches["is_ignored"]
    num_confident = int(confident.sum())
    num_dup = int((confident & matches["is_duplicate"]).sum())
    rate = 100.0 * num_dup / num_confident if num_confident else 0.0
    return {"duplicate_rate": rate, "num_confident": num_confident, "num_duplicates": num_dup}


def calibration(scores: Sequence[float] | np.ndarray, is_tp: Sequence[bool] | np.ndarray, num_bins: int = 20
                ) -> dict[str, Any]:
    """Reliability bins and expected calibration error (ECE) of detection scores.

    Bin ``b`` (0-based) of ``num_bins`` equal-width bins holds the scores in ``[b/B, (b+1)/B)``; the last bin
    also holds 1.0. A score equal to an edge value ``b/B`` (as the float ``b/B``) lands in bin ``b``. Per bin:
    count ``n_b``, mean confidence ``conf_b`` (mean score), precision ``prec_b`` = TP share (the "accuracy" of
    D-RMM Figure 2). ``ECE = 100 * sum_b (n_b / n) * |prec_b - conf_b|``, in percent (0-100, like AP); 0 for n = 0.
    Source: ``specs/query.md`` §3.7 (suggested reproduction of D-RMM README Figure 2).

    Args:
        scores: ``[n]`` confidences in [0, 1] (the non-ignored detections).
        is_tp: ``[n]`` bool, TP flags of the same detections.
        num_bins: number of bins B >= 1.
    Returns:
        ``{"ece": float percent, "edges": [B+1] floats, "counts": [B] ints, "confidences": [B], "precisions":
        [B]}`` as plain Python lists; the confidence and precision of an empty bin are ``None`` (JSON null).
    Raises:
        ValueError: lengths differ, ``num_bins < 1``, or a score outside [0, 1] or non-finite.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    tp = np.asarray(is_tp, dtype=bool).reshape(-1)
    if s.shape != tp.shape:
        raise ValueError(f"{s.size} scores but {tp.size} TP flags")
    if int(num_bins) < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if s.size and not (np.isfinite(s).all() and s.min() >= 0.0 and s.max() <= 1.0):
        raise ValueError(f"scores must lie in [0, 1], got range [{s.min()}, {s.max()}]")
    edges = np.arange(int(num_bins) + 1, dtype=np.float64) / int(num_bins)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, int(num_bins) - 1)
    counts = np.bincount(which, minlength=int(num_bins))
    conf_sum = np.bincount(which, weights=s, minlength=int(num_bins)).astype(np.float64)  # float if empty
    tp_sum = np.bincount(which, weights=tp.astype(np.float64), minlength=int(num_bins)).astype(np.float64)
    nz = counts > 0
    conf = np.divide(conf_sum, counts, out=np.zeros_like(conf_sum), where=nz)
    prec = np.divide(tp_sum, counts, out=np.zeros_like(tp_sum), where=nz)
    ece = 100.0 * float((counts * np.abs(prec - conf)).sum() / s.size) if s.size else 0.0
    return {"ece": ece, "edges": edges.tolist(), "counts": counts.astype(int).tolist(),
            "confidences": [float(c) if k else None for c, k in zip(conf, nz)],
            "precisions": [float(p) if k else None for p, k in zip(prec, nz)]}


def best_f1(scores: Sequence[float] | np.ndarray, is_tp: Sequence[bool] | np.ndarray, num_gt: int
            ) -> dict[str, float]:
    """The score threshold that maximises F1 = 2PR / (P + R) of the detections kept by ``score >= threshold``.

    Precision P = TP / kept, recall R = TP / ``num_gt``, counted over the detections sorted by descending score;
    only thresholds between distinct scores are candidates (detections with equal scores are kept or dropped
    together), and the threshold is the lowest score kept. This is the "confidence at max F1" that Ultralytics
    prints beside its F1 curve, for one IoU (the TP flags) and all classes together.

    Args:
        scores: ``[n]`` confidences (the non-ignored detections).
        is_tp: ``[n]`` bool TP flags of the same detections (:func:`match_detections`).
        num_gt: number of non-crowd GT boxes.
    Returns:
        ``{"f1", "threshold", "precision", "recall"}`` (F1, P, R in [0, 1]); all 0 when nothing is matched (no
        detection, no GT or no TP).
    Raises:
        ValueError: lengths differ or ``num_gt < 0``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    tp = np.asarray(is_tp, dtype=bool).reshape(-1)
    if s.shape != tp.shape or num_gt < 0:
        raise ValueError(f"{s.size} scores, {tp.size} TP flags, {num_gt} GT boxes")
    none = {"f1": 0.0, "threshold": 0.0, "precision": 0.0, "recall": 0.0}
    if not s.size or num_gt == 0 or not tp.any():
        return none
    order = np.argsort(-s, kind="stable")
    s, tp = s[order], tp[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last detection of every run of equal scores
    kept = np.arange(1, s.size + 1)[last]
    hits = np.cumsum(tp)[last]
    precision, recall = hits / kept, hits / num_gt
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=precision + recall > 0)
    best = int(np.argmax(f1))
    return {"f1": float(f1[best]), "threshold": float(s[last][best]), "precision": float(precision[best]),
            "recall": float(recall[best])}


def diagnostics(coco_gt: Any, detections: Sequence[Mapping[str, Any]], iou_thresh: float = 0.5,
                conf_thresh: float = 0.3, num_bins: int = 20) -> dict[str, Any]:
    """Duplicate rate and calibration of one set of detections (all values JSON-friendly).

    Args:
        coco_gt: ground truth (COCO object, dataset dict or JSON path).
        detections: COCO results-format list (``bbox`` xywh pixels, ``score`` in [0, 1]); the evaluator passes
            the post-processor's output (top-100 per image, no score threshold).
        iou_thresh: IoU of a TP match and of a duplicate (see :func:`match_detections`).
        conf_thresh: score threshold of the detections counted by the duplicate rate.
        num_bins: calibration bins (see :func:`calibration`).
    Returns:
        ``{"duplicate_rate": percent, "num_confident", "num_duplicates", "ece": percent, "f1", "f1_threshold",
        "f1_precision", "f1_recall" (:func:`best_f1`, fractions), "num_detections", "num_ignored", "reliability":
        {"edges", "counts", "confidences", "precisions"}}``; ignored detections
        (matched to a crowd region) are left out of every statistic but ``num_detections``/``num_ignored``.
    Raises:
        ValueError: as :func:`match_detections` and :func:`calibration`.
    """
    coco = as_coco(coco_gt)
    matches = match_detections(coco, detections, iou_thresh=iou_thresh)
    keep = ~matches["is_ignored"]
    cal = calibration(matches["score"][keep], matches["is_tp"][keep], num_bins=num_bins)
    num_gt = sum(1 for a in coco.dataset.get("annotations", []) if not a.get("iscrowd", 0))
    f1 = best_f1(matches["score"][keep], matches["is_tp"][keep], num_gt)
    return {**duplicate_stats(matches, conf_thresh=conf_thresh), "ece": cal.pop("ece"),
            **{f"f1_{k}" if k != "f1" else k: v for k, v in f1.items()},
            "num_detections": len(detections), "num_ignored": int(matches["is_ignored"].sum()),
            "reliability": cal}


def plot_reliability(bins_by_model: Mapping[str, Mapping[str, Any]], path: str | Path,
                     title: str = "Reliability diagram") -> Path:
    """Draw a reliability diagram (D-RMM README Figure 2 style, ``specs/query.md`` §3.7) as a PNG.

    Top panel: x = mean confidence of a bin, y = precision (TP share) of the bin, one line per model, the
    diagonal = perfect calibration, ECE in the legend. Bottom panel: detections per bin (log scale).

    Args:
        bins_by_model: ``{name: d}`` where ``d`` is a :func:`diagnostics` result (``"reliability"`` and
            ``"ece"``) or a :func:`calibration` result (``"edges"``, ``"counts"``, ``"confidences"``,
            ``"precisions"``, optional ``"ece"``).
        path: output PNG path; written to a temporary sibling and renamed (atomic).
        title: figure title.
    Returns:
        ``path`` as a Path.
    Raises:
        ValueError: no model, or a model's dict lacks the bin lists.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not bins_by_model:
        raise ValueError("plot_reliability needs at least one model")
    fig = Figure(figsize=(6, 7), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    for name, d in bins_by_model.items():
        rel = d.get("reliability", d)
        missing = [k for k in ("edges", "counts", "confidences", "precisions") if k not in rel]
        if missing:
            raise ValueError(f"model {name!r}: reliability bins lack {missing}")
        pts = [(c, p) for c, p in zip(rel["confidences"], rel["precisions"]) if c is not None and p is not None]
        ece = d.get("ece")
        label = f"{name} (ECE {ece:.1f})" if isinstance(ece, (int, float)) else str(name)
        line = top.plot([c for c, _ in pts], [p for _, p in pts], "o-", markersize=4, label=label)[0]
        edges = np.asarray(rel["edges"], dtype=np.float64)
        counts = np.asarray(rel["counts"], dtype=np.float64)
        bottom.stairs(counts, edges, color=line.get_color())
    top.set(xlim=(0, 1), ylim=(-0.01, 1.01), ylabel="precision (TP share)", title=title)
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="confidence", ylabel="detections")
    if any(np.asarray(d.get("reliability", d)["counts"]).sum() > 0 for d in bins_by_model.values()):
        bottom.set_yscale("log")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    return out


def plot_pr_curves(curves_by_model: Mapping[str, Mapping[str, Any]], path: str | Path,
                   title: str = "Precision-recall") -> Path:
    """Draw per-class precision-recall curves, one row per model, as a PNG (Ultralytics ``PR_curve.png`` style).

    Left column: precision against recall at IoU 0.5; right column: precision averaged over the IoU thresholds
    0.5:0.95. Each panel has one thin line per class with ground truth (labelled with its AP when there are at
    most 20 classes, plain grey otherwise) and a bold line for the mean over those classes; the area under a line
    is its AP (COCO's 101-point interpolated precision).

    Args:
        curves_by_model: ``{name: curves}``, ``curves`` as returned by
            :meth:`e2edet.engine.evaluator.CocoEvaluator.pr_curves` (``"iou_thresholds"`` [T], ``"recall"`` [R],
            ``"precision"`` [T, R, K] with -1 for a class without ground truth, ``"names"`` [K]).
        path: output PNG path; written to a temporary sibling and renamed (atomic).
        title: figure title.
    Returns:
        ``path`` as a Path.
    Raises:
        ValueError: no model, a model's dict lacks a key, or the array shapes disagree.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves_by_model:
        raise ValueError("plot_pr_curves needs at least one model")
    fig = Figure(figsize=(11, 4.5 * len(curves_by_model)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(curves_by_model), 2, squeeze=False)
    for (name, curves), (left, right) in zip(curves_by_model.items(), axes):
        missing = [k for k in ("iou_thresholds", "recall", "precision", "names") if k not in curves]
        if missing:
            raise ValueError(f"model {name!r}: precision-recall curves lack {missing}")
        ious = np.asarray(curves["iou_thresholds"], dtype=np.float64)
        recall = np.asarray(curves["recall"], dtype=np.float64)
        precision = np.asarray(curves["precision"], dtype=np.float64)
        names = list(curves["names"])
        if precision.shape != (len(ious), len(recall), len(names)):
            raise ValueError(f"model {name!r}: precision has shape {precision.shape}, expected "
                             f"{(len(ious), len(recall), len(names))} (IoU thresholds, recall points, classes)")
        valid = (precision > -1).all(axis=(0, 1))  # classes with ground truth
        at50 = int(np.argmin(np.abs(ious - 0.5)))
        for ax, per_class, what in ((left, precision[at50], f"IoU {ious[at50]:.2f}"),
                                    (right, precision.mean(axis=0), f"IoU {ious[0]:.2f}:{ious[-1]:.2f} mean")):
            labelled = valid.sum() <= 20
            for k in np.flatnonzero(valid):
                ap = 100.0 * per_class[:, k].mean()
                ax.plot(recall, per_class[:, k], linewidth=1.0, alpha=0.8 if labelled else 0.4,
                        color=None if labelled else "gray", label=f"{names[k]} {ap:.1f}" if labelled else None)
            if valid.any():
                mean = per_class[:, valid].mean(axis=1)
                ax.plot(recall, mean, linewidth=3.0, color="tab:blue" if not labelled else "black",
                        label=f"all classes {100.0 * mean.mean():.1f}")
                ax.legend(loc="lower left", fontsize="small", title="AP (%)", title_fontsize="small")
            ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=f"{name}, {what}")
            ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    return out
