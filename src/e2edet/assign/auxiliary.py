"""DeFCN auxiliary one-to-many assignment: ATSS-style selection with the POTO quality.

Source: ``specs/dense.md`` §2.3 "Aux one-to-many" and §2.9; DeFCN
``playground/detection/coco/poto.res50.fpn.coco.800size.3x_ms.3dmf.aux/fcos.py`` ``FCOS.get_aux_ground_truth``.
(The module is ``auxiliary.py`` because ``aux.*`` is a reserved file name on Windows.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from e2edet.assign.base import DenseAssignment, assignment_from_gt_index
from e2edet.assign.prior import inside_box, mean_std_positives, quality_matrix


class AuxAssigner:
    """One-to-many labels for DeFCN's auxiliary classification loss, ``@torch.no_grad()``, no parameters.

    Per GT ``i`` (quality ``Q_aux = sigmoid(cls)^(1-alpha) · IoU^alpha``, cls branch only, **no** filter):

    1. candidates: the top-``topk`` anchor points by ``Q_aux`` on each FPN level (``min(topk, points in level)``),
       no spatial restriction;
    2. ``thr_i = mean + std`` of the candidates' ``Q_aux`` (unbiased std; a GT with a single candidate in total
       has std 0 here instead of NaN);
    3. point ``j`` is positive for ``i`` if it is a candidate, ``Q_aux >= thr_i`` and ``j`` is **strictly** inside
       the GT box (whole box, not the center region).

    A point positive for several GTs takes the one with the highest ``Q_aux``. A GT can end with no positive.
    Images without GT are all background.

    Args:
        alpha: IoU weight of the quality (0.8).
        topk: candidates per GT per FPN level (``POTO.AUX_TOPK`` = 9).
    """

    def __init__(self, alpha: float = 0.8, topk: int = 9) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.alpha = float(alpha)
        self.topk = int(topk)

    @torch.no_grad()
    def positives(self, q: Tensor, points: Tensor, gt_boxes: Tensor, num_points_per_level: list[int]) -> Tensor:
        """Per-GT positive mask of one image before resolving conflicts between GTs.

        Args:
            q: ``float [G, R]`` aux quality; points: ``[R, 2]``; gt_boxes: ``[G, 4]`` xyxy pixels;
            num_points_per_level: points per FPN level, summing to ``R`` (levels contiguous, P3 first).
        Returns:
            ``bool [G, R]``: candidate, ``Q >= mean + std`` of the GT's candidates, strictly inside the GT box.
        """
        candidates = []
        start = 0
        for n in num_points_per_level:
            if n > 0:
                candidates.append(q[:, start : start + n].topk(min(self.topk, n), dim=1).indices + start)
            start += n
        cand = torch.cat(candidates, dim=1)  # [G, C]
        return mean_std_positives(q, cand) & inside_box(points, gt_boxes)

    @torch.no_grad()
    def __call__(
        self,
        cls_prob: Tensor,
        pred_boxes: Tensor,
        points: Tensor,
        num_points_per_level: list[int],
        targets: list[dict],
        num_classes: int,
    ) -> DenseAssignment:
        """Assign the one-to-many auxiliary labels.

        Args:
            cls_prob: ``[B, R, K]`` ``sigmoid(cls)`` only (never multiplied by the filter score).
            pred_boxes: ``[B, R, 4]`` current decoded predictions, xyxy pixels.
            points: ``float [R, 2]`` anchor points.
            num_points_per_level: points per level, P3 first; sums to ``R``.
            targets: B dicts with ``boxes float32 [G, 4]`` xyxy pixels and ``labels int64 [G]``.
            num_classes: ``K``.
        Returns:
            :class:`~e2edet.assign.base.DenseAssignment` on ``cls_prob``'s device; ``box_targets`` are filled for
            completeness though the aux loss has no regression term.
        Raises:
            ValueError: if ``num_points_per_level`` does not sum to ``R``.
        """
        device = cls_prob.device
        num_points = cls_prob.shape[1]
        if sum(num_points_per_level) != num_points:
            raise ValueError(
                f"num_points_per_level sums to {sum(num_points_per_level)}, predictions have R = {num_points}"
            )
        points = points.detach().float()
        gt_index = torch.full((len(targets), num_points), -1, dtype=torch.int64, device=device)
        for b, tgt in enumerate(targets):
            boxes = tgt["boxes"].to(device=device, dtype=torch.float32)
            if boxes.shape[0] == 0:
                continue
            labels = tgt["labels"].to(device)
            q = quality_matrix(cls_prob[b].detach(), pred_boxes[b].detach(), boxes, labels, self.alpha)
            pos = self.positives(q, points, boxes, num_points_per_level)
            winner = torch.where(pos, q, -1.0).argmax(dim=0)  # positives have q >= 0
            gt_index[b] = torch.where(pos.any(dim=0), winner, -1)
        return assignment_from_gt_index(gt_index, targets, num_classes)
