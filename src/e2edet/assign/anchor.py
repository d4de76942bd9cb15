"""DeFCN's one-to-one **Anchor** baseline: each GT takes the anchor box of highest IoU.

Source: ``specs/dense.md`` §2.3 "One-to-one baselines"; DeFCN
``playground/detection/coco/anchor.res50.fpn.coco.800size.3x_ms/fcos.py`` ``FCOS.get_ground_truth`` (config
``POTO.IOU_TOPK=1``, one square anchor per location from ``DefaultAnchorGenerator``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from e2edet.assign.base import DenseAssignment, assignment_from_gt_index
from e2edet.assign.prior import topk_indices


class AnchorAssigner:
    """Top-``topk`` anchors by anchor-box IoU per GT (no threshold), ``@torch.no_grad()``, no parameters.

    Per image: ``IoU[i, j]`` between GT ``i`` and anchor box ``j`` (``torchvision.ops.box_iou``); GT ``i`` claims
    its ``topk`` anchors of highest IoU (first index on ties, :func:`~e2edet.assign.prior.topk_indices`), whatever
    the IoU, even 0; an anchor claimed by several GTs goes to the one with the **higher IoU** (first GT index on
    ties, ``max`` over GTs). With ``topk = 1`` every GT whose anchor is not taken by a better-overlapping GT has
    exactly one positive. Nothing depends on the predictions.

    Args:
        topk: anchors claimed per GT (``POTO.IOU_TOPK`` = 1).
    Raises:
        ValueError: ``topk < 1``.
    """

    def __init__(self, topk: int = 1) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = int(topk)

    @torch.no_grad()
    def match(self, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """``int64 [R]`` GT index of every anchor of one image, ``-1`` for background.

        Args:
            anchors: ``float [R, 4]`` xyxy pixels; gt_boxes: ``float [G, 4]`` xyxy pixels, ``G >= 1``.
        """
        iou = box_iou(gt_boxes.float(), anchors.float())  # [G, R]
        claimed = topk_indices(iou, min(self.topk, iou.shape[1]), largest=True)  # [G, k]
        is_fg = torch.zeros_like(iou, dtype=torch.bool).scatter_(1, claimed, True)
        best_iou, best_gt = torch.where(is_fg, iou, -1.0).max(dim=0)  # IoU >= 0, so -1 = unclaimed
        return torch.where(best_iou > -1.0, best_gt, -1)

    @torch.no_grad()
    def __call__(self, anchors: Tensor, targets: list[dict], num_classes: int) -> DenseAssignment:
        """Assign every anchor of every image.

        Args:
            anchors: ``float [R, 4]`` xyxy pixels, the model's ``anchors`` (same for every image of the batch).
            targets: B dicts with ``boxes float32 [G, 4]`` xyxy pixels and ``labels int64 [G]`` (``G = 0`` gives an
                all-background image).
            num_classes: ``K``.
        Returns:
            :class:`~e2edet.assign.base.DenseAssignment` ``[B, R]`` on ``anchors``' device; ``box_targets`` are the
            matched GT boxes (the loss is GIoU on decoded boxes, so no delta targets are needed).
        """
        device = anchors.device
        gt_index = torch.full((len(targets), anchors.shape[0]), -1, dtype=torch.int64, device=device)
        for b, tgt in enumerate(targets):
            if tgt["boxes"].shape[0] and anchors.shape[0]:
                gt_index[b] = self.match(anchors.detach(), tgt["boxes"].to(device))
        return assignment_from_gt_index(gt_index, targets, num_classes)
