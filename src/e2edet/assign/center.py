"""DeFCN's one-to-one **Center** baseline: per FPN level the anchor point nearest to the GT centre, kept where the
FCOS scale range holds.

Source: ``specs/dense.md`` §2.3 "One-to-one baselines"; DeFCN
``playground/detection/coco/center.res50.fpn.coco.800size.3x_ms/fcos.py`` ``FCOS.get_ground_truth`` (config
``POTO.DISTANCE_TOPK=1``, ``POTO.OBJECT_SIZES_OF_INTEREST`` = the FCOS ranges).
"""

from __future__ import annotations

import torch
from torch import Tensor

from e2edet.assign.base import DenseAssignment, assignment_from_gt_index
from e2edet.assign.fcos import DEFAULT_SCALE_RANGES
from e2edet.assign.prior import nearest_points_per_level, pairwise_ltrb, smallest_area_gt


class CenterAssigner:
    """Nearest point per level, filtered by the scale range, smallest GT wins; ``@torch.no_grad()``.

    Per image and GT ``i``:

    1. candidates: on every FPN level the ``topk`` anchor points nearest to the GT centre (Euclidean; first index
       on ties, :func:`~e2edet.assign.prior.nearest_points_per_level`), one per level with ``topk = 1``;
    2. a candidate ``j`` is kept when ``m = max(l, t, r, b)`` of ``j`` w.r.t. GT ``i`` lies in ``j``'s level range
       ``lo <= m <= hi`` (both inclusive, as FCOS). The official code applies no inside-box test: the nearest point
       of a box smaller than a stride may lie outside it (one distance negative) and still be kept;
    3. a point kept by several GTs takes the GT of **smallest area** (first GT index on equal areas).

    Since the ranges of neighbouring levels meet only at their bounds, a GT usually keeps one point in total.

    Args:
        scale_ranges: ``(lo, hi)`` pixels per FPN level, P3 first (the FCOS ranges).
        topk: nearest points per level per GT (``POTO.DISTANCE_TOPK`` = 1).
    Raises:
        ValueError: ``topk < 1``.
    """

    def __init__(self, scale_ranges: tuple[tuple[float, float], ...] = DEFAULT_SCALE_RANGES, topk: int = 1) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.scale_ranges = tuple((float(lo), float(hi)) for lo, hi in scale_ranges)
        self.topk = int(topk)

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        levels: Tensor,
        num_points_per_level: list[int],
        targets: list[dict],
        num_classes: int,
    ) -> DenseAssignment:
        """Assign every anchor point of every image.

        Args:
            points: ``float [R, 2]`` anchor points ``(x, y)`` pixels, levels contiguous P3..P7.
            levels: ``int64 [R]`` FPN level of each point (0 = P3), ``< len(scale_ranges)``.
            num_points_per_level: points per level, summing to ``R``.
            targets: B dicts with ``boxes float32 [G, 4]`` xyxy pixels and ``labels int64 [G]``.
            num_classes: ``K``.
        Returns:
            :class:`~e2edet.assign.base.DenseAssignment` ``[B, R]`` on ``points``' device.
        Raises:
            ValueError: ``num_points_per_level`` does not sum to ``R``, or a level has no scale range.
        """
        points = points.detach().float()
        device = points.device
        if sum(num_points_per_level) != points.shape[0]:
            raise ValueError(f"num_points_per_level sums to {sum(num_points_per_level)}, R = {points.shape[0]}")
        if len(num_points_per_level) > len(self.scale_ranges):
            raise ValueError(f"{len(num_points_per_level)} levels but {len(self.scale_ranges)} scale ranges")
        ranges = torch.tensor(self.scale_ranges, dtype=torch.float32, device=device)
        lo, hi = ranges[levels, 0], ranges[levels, 1]  # [R]
        gt_index = torch.full((len(targets), points.shape[0]), -1, dtype=torch.int64, device=device)
        for b, tgt in enumerate(targets):
            boxes = tgt["boxes"].to(device=device, dtype=torch.float32)
            if boxes.shape[0] == 0:
                continue
            max_dist = pairwise_ltrb(points, boxes).amax(dim=-1)  # [G, R]
            in_range = (max_dist >= lo[None]) & (max_dist <= hi[None])
            centers = (boxes[:, :2] + boxes[:, 2:]) / 2
            cand = nearest_points_per_level(centers, points, num_points_per_level, self.topk)
            is_cand = torch.zeros_like(in_range).scatter_(1, cand, True)
            gt_index[b] = smallest_area_gt(is_cand & in_range, boxes)  # first GT index among equal areas
        return assignment_from_gt_index(gt_index, targets, num_classes)
