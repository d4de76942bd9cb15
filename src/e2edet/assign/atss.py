"""ATSS (adaptive training sample selection) on anchor points: the one-to-many + NMS baseline of DeFCN's CrowdHuman
table.

Source: Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive Training Sample
Selection", CVPR 2020; DeFCN ``playground/detection/crowdhuman/atss.res50.fpn.crowdhuman.800size.30k/atss.py``
``ATSS.get_ground_truth`` (config ``ATSS.ANCHOR_SCALE=8``, ``ATSS.TOPK=9``). That model is the FCOS head (ltrb
regression with ``NORM_REG_TARGETS``, centerness on the regression tower): the anchor boxes exist only to measure
IoU during assignment, so no anchor box coder is involved.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from e2edet.assign.base import DenseAssignment, assignment_from_gt_index
from e2edet.assign.prior import inside_box, mean_std_positives, nearest_points_per_level
from e2edet.ops.boxes import square_boxes


class ATSSAssigner:
    """ATSS one-to-many assignment, ``@torch.no_grad()``, no parameters.

    Per image and GT ``i`` (anchor box of point ``j``: a square of side ``anchor_scale · stride_j`` centred on it):

    1. candidates: on every FPN level the ``topk`` points nearest to the GT centre (Euclidean; first index on
       ties), ``topk · L`` per GT;
    2. ``thr_i = mean + std`` (unbiased) of the candidates' IoU between GT ``i`` and their anchor boxes;
    3. point ``j`` is positive for ``i`` if it is a candidate, its anchor IoU is ``>= thr_i`` and ``j`` is
       **strictly** inside the GT box;
    4. a point positive for several GTs takes the one of highest anchor IoU (first GT index on ties).

    Args:
        topk: candidates per level per GT (``ATSS.TOPK`` = 9).
        anchor_scale: anchor side in strides (``ATSS.ANCHOR_SCALE`` = 8).
    Raises:
        ValueError: ``topk < 1`` or ``anchor_scale <= 0``.
    """

    def __init__(self, topk: int = 9, anchor_scale: float = 8.0) -> None:
        if topk < 1 or anchor_scale <= 0:
            raise ValueError(f"need topk >= 1 and anchor_scale > 0, got {topk}, {anchor_scale}")
        self.topk = int(topk)
        self.anchor_scale = float(anchor_scale)

    @torch.no_grad()
    def match(self, points: Tensor, strides: Tensor, num_points_per_level: list[int], gt_boxes: Tensor) -> Tensor:
        """``int64 [R]`` GT index of every point of one image, ``-1`` for background (``G >= 1`` GT boxes
        ``float [G, 4]`` xyxy pixels; ``points [R, 2]``, ``strides [R]``)."""
        iou = box_iou(gt_boxes, square_boxes(points, strides * self.anchor_scale))  # [G, R]
        centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        cand = nearest_points_per_level(centers, points, num_points_per_level, self.topk)
        pos = mean_std_positives(iou, cand) & inside_box(points, gt_boxes)
        best_iou, best_gt = torch.where(pos, iou, -1.0).max(dim=0)
        return torch.where(best_iou > -1.0, best_gt, -1)

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        strides: Tensor,
        num_points_per_level: list[int],
        targets: list[dict],
        num_classes: int,
    ) -> DenseAssignment:
        """Assign every anchor point of every image.

        Args:
            points: ``float [R, 2]`` anchor points, levels contiguous P3..P7; strides: ``float [R]``.
            num_points_per_level: points per level, summing to ``R``.
            targets: B dicts with ``boxes float32 [G, 4]`` xyxy pixels and ``labels int64 [G]``.
            num_classes: ``K``.
        Returns:
            :class:`~e2edet.assign.base.DenseAssignment` ``[B, R]`` on ``points``' device.
        Raises:
            ValueError: ``num_points_per_level`` does not sum to ``R``.
        """
        points = points.detach().float()
        device = points.device
        if sum(num_points_per_level) != points.shape[0]:
            raise ValueError(f"num_points_per_level sums to {sum(num_points_per_level)}, R = {points.shape[0]}")
        gt_index = torch.full((len(targets), points.shape[0]), -1, dtype=torch.int64, device=device)
        for b, tgt in enumerate(targets):
            boxes = tgt["boxes"].to(device=device, dtype=torch.float32)
            if boxes.shape[0]:
                gt_index[b] = self.match(points, strides.to(device).float(), num_points_per_level, boxes)
        return assignment_from_gt_index(gt_index, targets, num_classes)
