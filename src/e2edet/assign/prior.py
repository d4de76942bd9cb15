"""Shared assignment primitives for dense detectors: spatial priors and the POTO quality.

Used by the FCOS, POTO, Aux and O2F assigners (``specs/dense.md`` §1.3, §2.3, §3.3 and "Design notes for one
codebase": ``center_prior``, ``quality``). All boxes are xyxy in pixels of the network input; anchor points are
``(x, y)`` pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou

from e2edet.ops.boxes import encode_ltrb


def pairwise_ltrb(points: Tensor, boxes: Tensor) -> Tensor:
    """Distances from every anchor point to the four sides of every box.

    Args:
        points: ``float [R, 2]`` anchor points ``(x, y)`` in pixels.
        boxes: ``float [G, 4]`` xyxy boxes in pixels.
    Returns:
        ``[G, R, 4]`` = ``(x - x1, y - y1, x2 - x, y2 - y)``; all four are > 0 iff the point is strictly inside.
        Source: cvpods ``Shift2BoxTransform.get_deltas`` (``specs/dense.md`` §1.2 box coding).
    """
    return encode_ltrb(points[None, :, :], boxes[:, None, :])


def inside_box(points: Tensor, gt_boxes: Tensor) -> Tensor:
    """``bool [G, R]``: anchor point ``r`` lies **strictly** inside GT box ``g`` (a point on an edge is out).

    Args:
        points: ``float [R, 2]`` anchor points in pixels.
        gt_boxes: ``float [G, 4]`` xyxy pixels.
    Source: ``specs/dense.md`` §1.3 (radius 0) and §2.3 Aux ("strictly inside the GT box"); DeFCN
    ``playground/detection/coco/poto...3dmf.aux/fcos.py`` ``FCOS.get_aux_ground_truth`` (``deltas.min() > 0``).
    """
    return pairwise_ltrb(points, gt_boxes).amin(dim=-1) > 0


def center_prior(
    points: Tensor,
    strides: Tensor,
    gt_boxes: Tensor,
    radius: float,
    centers: Tensor | None = None,
) -> Tensor:
    """FCOS center-sampling region test, on every FPN level at once.

    For GT ``g`` with center ``(cx, cy)`` and an anchor point of stride ``s``, the region is
    ``[max(cx - radius·s, x1), max(cy - radius·s, y1), min(cx + radius·s, x2), min(cy + radius·s, y2)]`` (the
    ``radius``-stride square clipped to the GT box). The point is in the prior iff all four distances to this
    region are **strictly** positive, so a point exactly on the region boundary is out. ``radius <= 0`` means
    "strictly inside the GT box" (:func:`inside_box`). There is no scale-range restriction here.

    Args:
        points: ``float [R, 2]`` anchor points ``(x, y)`` in pixels.
        strides: ``float [R]`` stride (pixels) of each point's FPN level.
        gt_boxes: ``float [G, 4]`` xyxy pixels.
        radius: center-sampling radius in units of the stride (1.5 for FCOS-imprv, POTO, O2F; 0 on CrowdHuman).
        centers: optional ``float [G, 2]`` region centers (e.g. mask centroids, §3.10); default box centers.
    Returns:
        ``bool [G, R]``.
    Source: ``specs/dense.md`` §1.3 step 1 and §2.3 "Prior"; cvpods ``FCOS.get_ground_truth`` and DeFCN
    ``playground/detection/coco/poto.res50.fpn.coco.800size.3x_ms/fcos.py`` ``FCOS.get_ground_truth``.
    """
    if radius <= 0:
        return inside_box(points, gt_boxes)
    if centers is None:
        centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    half = (strides.to(gt_boxes.dtype) * radius)[None, :, None]  # [1, R, 1]
    lo = torch.maximum(centers[:, None, :] - half, gt_boxes[:, None, :2])  # [G, R, 2]
    hi = torch.minimum(centers[:, None, :] + half, gt_boxes[:, None, 2:])  # [G, R, 2]
    p = points[None, :, :]
    return torch.cat((p - lo, hi - p), dim=-1).amin(dim=-1) > 0


def mask_centroids(masks: Tensor, boxes: Tensor) -> Tensor:
    """Centroids of instance masks (first-order moments), the centers of the CondInst center prior.

    ``cx = Σ x·m(x, y) / Σ m``, ``cy = Σ y·m(x, y) / Σ m`` with ``x``, ``y`` the **column and row indices** of the
    pixels (official: ``arange(w)``, ``arange(h)``, no half-pixel offset, so the centroid of a one-pixel mask at
    column ``j`` is ``j``, not ``j + 0.5``). A mask without any pixel (an object whose mask the resize lost) takes its
    box center: the official code divides by ``clamp(m00, 1e-6)`` and gets the image corner ``(0, 0)``, which leaves
    such a GT without any point in its prior; this is the one deviation.

    Args:
        masks: ``[G, H, W]`` bool or 0/1 (any nonzero value is inside), in the frame of ``boxes`` (padding allowed).
        boxes: ``float [G, 4]`` xyxy pixels.
    Returns:
        ``float32 [G, 2]`` (x, y) pixels.
    Source: ``specs/dense.md`` §3.10; official ``strongwolf/o2f`` ``condinst_head.py``
    ``E2ECondInstHead._get_target_single`` (``m00``, ``m10``, ``m01``).
    """
    m = (masks != 0).float()
    m00 = m.sum(dim=(1, 2))
    xs = torch.arange(m.shape[2], device=m.device, dtype=torch.float32)
    ys = torch.arange(m.shape[1], device=m.device, dtype=torch.float32)
    m10 = (m.sum(dim=1) * xs).sum(dim=1)
    m01 = (m.sum(dim=2) * ys).sum(dim=1)
    centroids = torch.stack((m10, m01), dim=1) / m00.clamp(min=1e-6)[:, None]
    box_centers = (boxes[:, :2].float() + boxes[:, 2:].float()) / 2
    return torch.where((m00 > 0)[:, None], centroids, box_centers)


def poto_quality(prob: Tensor, iou: Tensor, alpha: float = 0.8) -> Tensor:
    """POTO quality ``Q = prob^(1 - alpha) · IoU^alpha``, elementwise.

    Inputs are clamped to ``[0, 1]`` and NaN is read as 0 first (a degenerate predicted box can give a 0/0 IoU),
    so ``Q`` is always in ``[0, 1]``. ``0^0 = 1``: with ``alpha = 1`` the probability is ignored (pure IoU), with
    ``alpha = 0`` the IoU is ignored (pure probability), even where the ignored factor is 0.

    Args:
        prob: ``float [G, R]`` predicted probability of each GT's class at each anchor point.
        iou: ``float [G, R]`` IoU between each GT box and each predicted box.
        alpha: weight of the IoU, 0.8 in DeFCN (``MODEL.POTO.ALPHA``) and O2F (``poto_alpha``).
    Returns:
        ``float [G, R]`` in ``[0, 1]``.
    Source: ``specs/dense.md`` §2.3 POTO and §3.3 step 1; DeFCN ``poto.../fcos.py`` ``FCOS.get_ground_truth``.
    """
    prob = torch.nan_to_num(prob, nan=0.0).clamp(0.0, 1.0)
    iou = torch.nan_to_num(iou, nan=0.0).clamp(0.0, 1.0)
    return prob.pow(1.0 - alpha) * iou.pow(alpha)


def quality_matrix(
    scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, alpha: float = 0.8
) -> Tensor:
    """POTO quality of every (GT, anchor point) pair of one image, in fp32.

    Args:
        scores: ``[R, K]`` class probabilities (already sigmoid-ed; cls, or cls·filter / cls·ctr), detached.
        pred_boxes: ``[R, 4]`` decoded predicted boxes, xyxy pixels, detached.
        gt_boxes: ``float [G, 4]`` xyxy pixels.
        gt_labels: ``int64 [G]`` classes in ``[0, K)``.
        alpha: see :func:`poto_quality`.
    Returns:
        ``float32 [G, R]``: ``scores[r, gt_labels[g]]^(1-alpha) · IoU(gt_boxes[g], pred_boxes[r])^alpha``
        with plain IoU (``torchvision.ops.box_iou``), not GIoU.
    Source: ``specs/dense.md`` §2.3 (POTO and Aux) and §3.3; DeFCN ``FCOS.get_ground_truth``.
    """
    prob = scores.float()[:, gt_labels].t()  # [G, R]
    iou = box_iou(gt_boxes.float(), pred_boxes.float())  # [G, R]
    return poto_quality(prob, iou, alpha)


def topk_indices(values: Tensor, k: int, largest: bool = True) -> Tensor:
    """``int64 [G, k]`` indices of the ``k`` largest (or smallest) entries of each row of ``values`` ``[G, N]``,
    best first, **first index on ties**.

    ``torch.topk`` leaves the order of tied entries unspecified (and it differs between devices); anchor points
    equidistant from a GT centre, or two anchors of equal IoU, are common on a regular grid. ``k = 1`` uses
    ``argmax``/``argmin`` (documented first index), larger ``k`` a stable sort. Requires ``1 <= k <= N``.
    """
    if k == 1:
        return (values.argmax(dim=1) if largest else values.argmin(dim=1)).unsqueeze(1)
    return values.sort(dim=1, descending=largest, stable=True).indices[:, :k]


def nearest_points_per_level(centers: Tensor, points: Tensor, num_points_per_level: list[int], k: int) -> Tensor:
    """The ``k`` anchor points nearest to each centre on every FPN level (ATSS candidates; DeFCN Center).

    Args:
        centers: ``float [G, 2]`` (x, y) pixels (GT box centres).
        points: ``float [R, 2]`` anchor points, levels contiguous (P3 first).
        num_points_per_level: points per level, summing to ``R``.
        k: points per level (``min(k, points in the level)`` are taken).
    Returns:
        ``int64 [G, C]`` indices into ``points``, ``C = Σ_l min(k, n_l)``, level by level, nearest first.
    Notes:
        Euclidean distance, compared as the exact squared distance (same order as ``torch.cdist`` in DeFCN
        ``center.../fcos.py`` and ``sqrt(Σ d²)`` in ``atss.../atss.py``, without ``cdist``'s matrix-product rounding);
        ties go to the lower point index (:func:`topk_indices`), where the official ``topk`` leaves them unspecified.
    """
    out, start = [], 0
    for n in num_points_per_level:
        if n > 0:
            d2 = (centers[:, None, :] - points[None, start : start + n, :]).pow(2).sum(dim=-1)  # [G, n]
            out.append(topk_indices(d2, min(k, n), largest=False) + start)
        start += n
    if not out:
        return torch.zeros(centers.shape[0], 0, dtype=torch.int64, device=centers.device)
    return torch.cat(out, dim=1)


def mean_std_positives(values: Tensor, candidates: Tensor) -> Tensor:
    """ATSS's adaptive threshold: ``bool [G, R]``, True where ``r`` is one of GT ``g``'s ``candidates`` and
    ``values[g, r] >= mean + std`` of ``values`` over those candidates (unbiased std, as ``Tensor.std``; a GT with a
    single candidate gets std 0 here instead of NaN).

    Args:
        values: ``float [G, R]`` (IoU with the anchor boxes in ATSS, the POTO quality in DeFCN's Aux).
        candidates: ``int64 [G, C]`` candidate indices into ``R`` (distinct per row).
    Source: ``specs/dense.md`` §2.3 "Aux one-to-many"; DeFCN ``atss.res50.fpn.crowdhuman.800size.30k/atss.py`` and
    ``poto...3dmf.aux/fcos.py`` ``FCOS.get_aux_ground_truth``.
    """
    cand_values = values.gather(1, candidates)
    std = cand_values.std(dim=1, keepdim=True) if candidates.shape[1] > 1 else torch.zeros_like(cand_values[:, :1])
    thr = cand_values.mean(dim=1, keepdim=True) + std
    is_cand = torch.zeros_like(values, dtype=torch.bool).scatter_(1, candidates, True)
    return is_cand & (values >= thr)


def smallest_area_gt(allowed: Tensor, boxes: Tensor) -> Tensor:
    """Per point, the GT of smallest area among those ``allowed`` there (the FCOS ambiguity rule, cvpods
    ``FCOS.get_ground_truth``; DeFCN's Center baseline reuses it): ``allowed`` bool ``[G, R]``, ``boxes`` xyxy
    ``[G, 4]`` -> ``int64 [R]`` GT index, ``-1`` where no GT is allowed; equal areas go to the first GT."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_mat = torch.where(allowed, area[:, None], torch.full(allowed.shape, math.inf, device=boxes.device))
    min_area, idx = area_mat.min(dim=0)
    return torch.where(torch.isfinite(min_area), idx, -1)
