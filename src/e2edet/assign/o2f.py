"""O2F: One-to-Few label assignment (one certain positive + a few soft anchors per object, epoch-scheduled).

Source: ``specs/dense.md`` §3.3 and §3.9; official ``strongwolf/o2f`` ``o2f_head.py``
``O2FHead._get_target_single_o2o`` (assignment, soft targets and weights) and ``O2FHead.__init__`` (``self.ff``: the
schedule ``t(e)``; constants ``poto_alpha=0.8``, ``o2f_topk=7``, ``soft_weight=0.4``, ``max_soft_weight=1.0``,
``max_t=0.6``, ``min_t=0.2``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from e2edet.assign.base import DenseAssignment, assignment_from_gt_index, empty_assignment
from e2edet.assign.prior import center_prior, poto_quality

__all__ = ["O2FAssigner", "soft_target_scale"]


def soft_target_scale(epoch: int, max_epoch: int, max_t: float = 0.6, min_t: float = 0.2) -> float:
    """The O2F schedule ``t(e) = max_t - (max_t - min_t) · e / (max_epoch - 1)`` of the 0-based epoch ``e``.

    Linear from ``max_t`` (first epoch) to ``min_t`` (last epoch): soft anchors are mostly positive early and
    mostly negative late. ``max_epoch <= 1`` gives ``max_t`` (the official lambda would divide by zero); ``epoch`` is
    clamped to ``[0, max_epoch - 1]``. Source: ``o2f_head.py`` ``self.ff``; ``specs/dense.md`` §3.3 step 7.
    """
    if max_epoch <= 1:
        return float(max_t)
    e = min(max(int(epoch), 0), max_epoch - 1)
    return float(max_t - (max_t - min_t) * e / (max_epoch - 1))


class O2FAssigner:
    """One-to-Few assignment, ``@torch.no_grad()``, no parameters; per image, vectorised over GTs and points.

    For image GTs ``(b_i, c_i)`` and anchor points ``j`` with joint probability ``p_j = sigmoid(cls)·sigmoid(ctr)``
    and decoded predicted box ``B_j``:

    1. ``Q[i, j] = p_j(c_i)^(1-alpha) · IoU(b_i, B_j)^alpha`` and ``IoU[i, j]``, both set to 0 outside GT ``i``'s
       ``center_radius``-stride center prior (FCOS center region clipped to the box, strict, every FPN level).
    2. Per GT: ``k_i = min(topk, #{j : IoU[i, j] > 0})``; the top-``k_i`` points by ``Q[i]`` over **all levels
       jointly** enter a matching matrix with their ``Q``.
    3. Each point goes to the GT with the largest matching value (first GT on ties, as ``torch.max``); points whose
       largest value is 0 stay background. A GT may lose points to others and end with none.
    4. Per GT with ``n >= 1`` kept points: the highest-``Q`` one is the **certain positive** (soft target 1, weight
       ``max_soft_weight``); each other one is a **soft anchor** with target ``t(e) · p_j(c_i) / max_soft p(c_i)``
       (the max over the soft anchors only, so the best soft anchor gets exactly ``t(e)``) and weight
       ``soft_weight``. If every soft anchor has probability 0 (the official code would divide 0 by 0), they all get
       ``t(e)``.

    Every kept point (certain or soft) gets its GT's class and box (full regression supervision).

    The instance-segmentation variant (§3.10, ``condinst_head.py``) centers the prior on the GT's mask centroid
    (:func:`~e2edet.assign.prior.mask_centroids`) instead of its box center: pass ``centers``.

    Args:
        alpha: IoU weight of ``Q`` (``poto_alpha`` = 0.8).
        center_radius: prior radius in strides (1.5).
        topk: ``o2f_topk``, counting the certain positive (7 on COCO, 4 on CrowdHuman).
        soft_weight, max_soft_weight: classification weights of soft anchors (0.4) and certain positives (1.0).
        max_t, min_t: schedule end points (0.6, 0.2).
    Raises:
        ValueError: ``topk < 1``.
    """

    def __init__(self, alpha: float = 0.8, center_radius: float = 1.5, topk: int = 7, soft_weight: float = 0.4,
                 max_soft_weight: float = 1.0, max_t: float = 0.6, min_t: float = 0.2) -> None:
        if topk < 1:
            raise ValueError(f"O2F topk must be >= 1, got {topk}")
        self.alpha, self.center_radius, self.topk = float(alpha), float(center_radius), int(topk)
        self.soft_weight, self.max_soft_weight = float(soft_weight), float(max_soft_weight)
        self.max_t, self.min_t = float(max_t), float(min_t)

    @torch.no_grad()
    def __call__(self, prob: Tensor, pred_boxes: Tensor, points: Tensor, strides: Tensor, targets: list[dict],
                 num_classes: int, epoch: int = 0, max_epoch: int = 1,
                 centers: list[Tensor | None] | None = None) -> DenseAssignment:
        """Assign the anchor points of a batch.

        Args:
            prob: ``[B, R, K]`` joint probabilities ``sigmoid(cls)·sigmoid(ctr)`` (detached here).
            pred_boxes: ``[B, R, 4]`` decoded predicted boxes, xyxy pixels of the network input.
            points: ``[R, 2]`` anchor points (x, y) pixels; strides: ``[R]`` pixels.
            targets: B dicts with ``boxes float32 [G, 4]`` xyxy pixels and ``labels int64 [G]``.
            num_classes: ``K`` (background label).
            epoch, max_epoch: 0-based epoch and number of epochs of the run, for :func:`soft_target_scale`.
            centers: optional per image ``float [G, 2]`` (x, y) pixels centering each GT's prior (mask centroids);
                None (or a None entry) means the box centers.
        Returns:
            :class:`DenseAssignment` with ``soft_targets`` and ``weights`` ``float32 [B, R]`` (0 on background).
        """
        batch, num_points = prob.shape[:2]
        device = prob.device
        t = soft_target_scale(epoch, max_epoch, self.max_t, self.min_t)
        gt_index = torch.full((batch, num_points), -1, dtype=torch.int64, device=device)
        soft = torch.zeros(batch, num_points, dtype=torch.float32, device=device)
        weight = torch.zeros_like(soft)
        for b, tgt in enumerate(targets):
            boxes = tgt["boxes"].to(device=device, dtype=torch.float32)
            if boxes.shape[0] == 0:
                continue
            labels = tgt["labels"].to(device=device, dtype=torch.int64)
            p = prob[b].float()[:, labels].t()  # [G, R] probability of each GT's class
            center = None if centers is None or centers[b] is None else centers[b].to(device=device, dtype=torch.float32)
            prior = center_prior(points.float(), strides, boxes, self.center_radius, centers=center)
            iou = box_iou(boxes, pred_boxes[b].float()).nan_to_num(0.0) * prior
            q = poto_quality(p, iou, self.alpha) * prior
            idx, k = self._select(q, iou)
            gt_index[b], soft[b], weight[b] = self._resolve(q, p, idx, k, t)
        out = assignment_from_gt_index(gt_index, targets, num_classes) if batch else empty_assignment(
            0, num_points, num_classes, device)
        out.soft_targets, out.weights = soft, weight
        return out

    def _select(self, q: Tensor, iou: Tensor) -> tuple[Tensor, Tensor]:
        """Top-``k`` candidates of every GT: indices ``[G, min(topk, R)]`` by ``Q`` and ``k_i`` ``[G]``."""
        k = (iou > 0).sum(dim=1).clamp(max=self.topk)
        idx = q.topk(min(self.topk, q.shape[1]), dim=1).indices
        return idx, k

    def _resolve(self, q: Tensor, p: Tensor, idx: Tensor, k: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor]:
        """Conflict resolution and soft targets of one image -> (gt_index ``[R]``, soft ``[R]``, weight ``[R]``)."""
        num_gt, num_points = q.shape
        rank = torch.arange(idx.shape[1], device=q.device).expand_as(idx)
        chosen = rank < k[:, None]
        matching = torch.zeros_like(q)
        matching.scatter_(1, idx, torch.where(chosen, q.gather(1, idx), torch.zeros_like(idx, dtype=q.dtype)))
        best, owner = matching.max(dim=0)  # [R]
        pos = best > 0
        kept = pos[None, :] & (owner[None, :] == torch.arange(num_gt, device=q.device)[:, None])  # [G, R]
        has = kept.any(dim=1)
        certain = torch.where(kept, q, torch.full_like(q, -1.0)).argmax(dim=1)  # [G]
        is_certain = torch.zeros_like(kept).scatter_(1, certain[:, None], has[:, None])  # no host sync
        soft_mask = kept & ~is_certain
        soft_p = torch.where(soft_mask, p, torch.zeros_like(p))
        p_max = soft_p.amax(dim=1, keepdim=True)
        ratio = torch.where(p_max > 0, soft_p / p_max.clamp(min=torch.finfo(p.dtype).tiny), torch.ones_like(p))
        soft_target = torch.where(is_certain, 1.0, torch.where(soft_mask, t * ratio, 0.0)).sum(dim=0)
        weights = torch.where(is_certain, self.max_soft_weight,
                              torch.where(soft_mask, self.soft_weight, 0.0)).sum(dim=0)
        gt_index = torch.where(pos, owner, torch.full_like(owner, -1))
        return gt_index, soft_target.float(), weights.float()
