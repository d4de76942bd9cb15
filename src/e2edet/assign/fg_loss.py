"""DeFCN's one-to-one **Foreground loss** baseline: Hungarian matching that minimises the training loss of the pair.

Source: ``specs/dense.md`` §2.3 "One-to-one baselines"; DeFCN
``playground/detection/coco/loss.res50.fpn.coco.800size.3x_ms/fcos.py`` ``FCOS.get_ground_truth``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from e2edet.assign.base import DenseAssignment, assignment_from_gt_index
from e2edet.assign.hungarian import linear_assignment
from e2edet.assign.prior import center_prior

#: Cost written outside the centre prior (the official ``INF = 1e8``): finite, so the solver can still use such a
#: pair when the problem is infeasible, and far above any real cost (a focal sum over K classes + 2·GIoU loss).
INFEASIBLE_COST = 1e8


def foreground_loss_cost(
    logits: Tensor,
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    reg_weight: float = 2.0,
) -> Tensor:
    """Loss of every (GT, anchor point) pair of one image, fp32: ``C[i, j] = Σ_k FL(x_jk, onehot(c_i)_k) +
    reg_weight · (1 - GIoU(B_j, b_i))``.

    ``FL`` is the sigmoid focal loss on logits (``torchvision.ops.sigmoid_focal_loss``, ``alpha < 0`` disables the
    alpha term) summed over all ``K`` classes; it is computed as ``Σ_k FL(x_jk, 0) - FL(x_jc, 0) + FL(x_jc, 1)`` with
    ``c = c_i``, so the matrix costs ``[G, R]`` memory instead of ``[G, R, K]``. The GIoU is
    ``torchvision.ops.generalized_box_iou`` of the decoded boxes, equal to cvpods' ltrb ``iou_loss`` (GIoU is
    translation-invariant).

    Args:
        logits: ``[R, K]`` class logits (detached by the caller); pred_boxes: ``[R, 4]`` xyxy pixels.
        gt_boxes: ``float [G, 4]`` xyxy pixels; gt_labels: ``int64 [G]`` in ``[0, K)``.
        focal_alpha, focal_gamma: focal-loss parameters (0.25, 2); reg_weight: GIoU weight (``REG_WEIGHT`` = 2).
    Returns:
        ``float32 [G, R]``.
    """
    logits = logits.float()
    negative = sigmoid_focal_loss(logits, torch.zeros_like(logits), focal_alpha, focal_gamma)  # [R, K]
    own = logits[:, gt_labels].t()  # [G, R] logit of each GT's class
    own_negative = negative[:, gt_labels].t()
    own_positive = sigmoid_focal_loss(own, torch.ones_like(own), focal_alpha, focal_gamma)
    cls_cost = negative.sum(dim=1)[None, :] - own_negative + own_positive
    giou_cost = 1.0 - generalized_box_iou(gt_boxes.float(), pred_boxes.float())
    return cls_cost + reg_weight * giou_cost


class ForegroundLossAssigner:
    """Hungarian assignment minimising :func:`foreground_loss_cost` inside the centre prior; ``@torch.no_grad()``.

    Points outside GT ``i``'s ``center_radius``-stride centre prior (every level, no scale range,
    :func:`~e2edet.assign.prior.center_prior`) cost :data:`INFEASIBLE_COST`. The matrices of the batch are solved by
    the shared solver (:func:`~e2edet.assign.hungarian.linear_assignment`, minimising, one host copy per batch).
    Infeasible matches (a GT matched outside its prior: no point inside its centre region, or too few for the GTs
    competing for them) are dropped unless ``keep_infeasible``, the rule of
    :class:`~e2edet.assign.poto.POTOAssigner`; the official code keeps them.

    Args:
        center_radius: prior radius in strides (``POTO.CENTER_SAMPLING_RADIUS`` = 1.5; 0 = inside the GT box).
        focal_alpha, focal_gamma, reg_weight: cost terms, the training loss's own (0.25, 2.0, 2.0).
        keep_infeasible: keep matches outside the prior (official DeFCN).
    """

    def __init__(self, center_radius: float = 1.5, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 reg_weight: float = 2.0, keep_infeasible: bool = False) -> None:
        self.center_radius = float(center_radius)
        self.focal_alpha, self.focal_gamma, self.reg_weight = float(focal_alpha), float(focal_gamma), float(reg_weight)
        self.keep_infeasible = bool(keep_infeasible)

    @torch.no_grad()
    def cost(self, logits: Tensor, pred_boxes: Tensor, points: Tensor, strides: Tensor, gt_boxes: Tensor,
             gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Prior-masked cost of one image: ``(C float32 [G, R], in_prior bool [G, R])``, ``C = 1e8`` outside."""
        gt_boxes = gt_boxes.float()
        c = foreground_loss_cost(logits.detach(), pred_boxes.detach(), gt_boxes, gt_labels, self.focal_alpha,
                                 self.focal_gamma, self.reg_weight)
        in_prior = center_prior(points.detach().float(), strides, gt_boxes, self.center_radius)
        return c.masked_fill(~in_prior, INFEASIBLE_COST), in_prior

    @torch.no_grad()
    def __call__(self, logits: Tensor, pred_boxes: Tensor, points: Tensor, strides: Tensor, targets: list[dict],
                 num_classes: int) -> DenseAssignment:
        """Assign one anchor point per GT in every image.

        Args:
            logits: ``[B, R, K]`` class logits (detached here); pred_boxes: ``[B, R, 4]`` decoded xyxy pixels.
            points: ``float [R, 2]``; strides: ``float [R]``.
            targets: B dicts with ``boxes float32 [G, 4]`` xyxy pixels and ``labels int64 [G]``.
            num_classes: ``K``.
        Returns:
            :class:`~e2edet.assign.base.DenseAssignment` on ``logits``' device.
        """
        device = logits.device
        gt_index = torch.full((len(targets), logits.shape[1]), -1, dtype=torch.int64, device=device)
        costs, priors = [], []
        for b, tgt in enumerate(targets):
            c, in_prior = self.cost(logits[b], pred_boxes[b], points, strides, tgt["boxes"].to(device),
                                    tgt["labels"].to(device))
            costs.append(c)
            priors.append(in_prior)
        for b, ((rows, cols), in_prior) in enumerate(zip(linear_assignment(costs, maximize=False), priors)):
            if rows.numel():
                keep = torch.ones_like(rows, dtype=torch.bool) if self.keep_infeasible else in_prior[rows, cols]
                gt_index[b, cols] = torch.where(keep, rows, -1)
        return assignment_from_gt_index(gt_index, targets, num_classes)
