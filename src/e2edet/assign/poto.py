"""POTO: prediction-aware one-to-one assignment of DeFCN (Hungarian or per-GT argmax).

Source: ``specs/dense.md`` §2.3 "POTO" and §2.9; DeFCN
``playground/detection/coco/poto.res50.fpn.coco.800size.3x_ms/fcos.py`` ``FCOS.get_ground_truth`` (Hungarian) and
``playground/detection/coco/poto.res50.fpn.coco.800size.3x_ms.argmax/fcos.py`` ``FCOS.get_ground_truth`` (argmax).
"""

from __future__ import annotations

import torch
from torch import Tensor

from e2edet.assign.base import DenseAssignment, assignment_from_gt_index
from e2edet.assign.hungarian import linear_assignment
from e2edet.assign.prior import center_prior, quality_matrix

#: Quality written outside the prior. Real quality lies in [0, 1], so -1 is strictly worse than any in-prior
#: point, including zero-quality ones (``specs/dense.md`` §2.9).
INFEASIBLE_QUALITY = -1.0


class POTOAssigner:
    """Prediction-aware One-To-One assignment, ``@torch.no_grad()``, no parameters.

    Quality of GT ``i`` and anchor point ``j``: ``Q = p_j(c_i)^(1 - alpha) · IoU(b_i, B_j)^alpha`` (plain IoU with
    the current predicted box), set to ``-1`` outside the ``center_radius``-stride center prior, which is applied on
    **every** FPN level (no scale ranges).

    - ``mode="hungarian"``: maximising linear sum assignment on ``Q`` (one shared solver, one host copy per batch);
      with ``R >= G`` every GT gets exactly one distinct point when feasible.
    - ``mode="argmax"``: each GT takes ``argmax_j Q[i, j]``; a point chosen by several GTs keeps the one with the
      highest ``Q`` (first index on ties); the losers and GTs whose best ``Q`` is ``-1`` get no positive. No host
      synchronisation.

    Infeasible Hungarian matches (a GT matched to a point outside its prior, ``Q = -1``; happens for a GT with no
    anchor point strictly inside its center region, or when GTs compete for too few in-prior points): the official
    code keeps whatever the solver returns, which gives the GT a positive at an arbitrary out-of-prior point (all
    ``-1`` columns tie, so the solver's tie-break picks it; typically a far-away point whose regression target is
    not even inside the GT box). That trains a spurious detection, so by default (``keep_infeasible=False``) such
    matches are **dropped** and the GT gets no positive, the same rule as the argmax variant and O2F.
    ``keep_infeasible=True`` reproduces the official behaviour.

    Args:
        alpha: IoU weight of the quality (``MODEL.POTO.ALPHA`` = 0.8).
        center_radius: prior radius in strides (1.5 on COCO; 0 = strictly inside the GT box, CrowdHuman).
        mode: ``"hungarian"`` or ``"argmax"``.
        keep_infeasible: keep Hungarian matches with ``Q = -1`` (official DeFCN) instead of dropping them.
    Raises:
        ValueError: for an unknown ``mode``.
    """

    def __init__(
        self,
        alpha: float = 0.8,
        center_radius: float = 1.5,
        mode: str = "hungarian",
        keep_infeasible: bool = False,
    ) -> None:
        if mode not in ("hungarian", "argmax"):
            raise ValueError(f"mode must be 'hungarian' or 'argmax', got {mode!r}")
        self.alpha = float(alpha)
        self.center_radius = float(center_radius)
        self.mode = mode
        self.keep_infeasible = bool(keep_infeasible)

    @torch.no_grad()
    def quality(
        self,
        scores: Tensor,
        pred_boxes: Tensor,
        points: Tensor,
        strides: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Prior-masked quality of one image.

        Args:
            scores: ``[R, K]`` class probabilities; pred_boxes: ``[R, 4]`` xyxy pixels; points: ``[R, 2]``;
            strides: ``[R]``; gt_boxes: ``float [G, 4]`` xyxy pixels; gt_labels: ``int64 [G]``.
        Returns:
            ``(Q float32 [G, R], in_prior bool [G, R])`` with ``Q = -1`` where ``in_prior`` is False.
        """
        gt_boxes = gt_boxes.float()
        q = quality_matrix(scores.detach(), pred_boxes.detach(), gt_boxes, gt_labels, self.alpha)
        in_prior = center_prior(points.detach().float(), strides, gt_boxes, self.center_radius)
        return q.masked_fill(~in_prior, INFEASIBLE_QUALITY), in_prior

    @torch.no_grad()
    def __call__(
        self,
        scores: Tensor,
        pred_boxes: Tensor,
        points: Tensor,
        strides: Tensor,
        targets: list[dict],
        num_classes: int,
    ) -> DenseAssignment:
        """Assign one anchor point per GT in every image.

        Args:
            scores: ``[B, R, K]`` class probabilities used for the quality: ``sigmoid(cls)`` (plain POTO) or
                ``sigmoid(cls) · sigmoid(filter)`` (3DMF variants). Detached internally.
            pred_boxes: ``[B, R, 4]`` current decoded predictions, xyxy pixels.
            points: ``float [R, 2]`` anchor points; strides: ``float [R]``.
            targets: B dicts with ``boxes float32 [G, 4]`` xyxy pixels and ``labels int64 [G]``; ``G = 0`` gives
                an all-background image.
            num_classes: ``K``.
        Returns:
            :class:`~e2edet.assign.base.DenseAssignment` on ``scores``' device.
        """
        device = scores.device
        num_points = scores.shape[1]
        gt_index = torch.full((len(targets), num_points), -1, dtype=torch.int64, device=device)
        qualities, priors = [], []
        for b, tgt in enumerate(targets):
            q, in_prior = self.quality(
                scores[b], pred_boxes[b], points, strides, tgt["boxes"].to(device), tgt["labels"].to(device)
            )
            qualities.append(q)
            priors.append(in_prior)

        if self.mode == "hungarian":
            matches = linear_assignment(qualities, maximize=True)
            for b, ((rows, cols), in_prior) in enumerate(zip(matches, priors)):
                if rows.numel() == 0:
                    continue
                keep = torch.ones_like(rows, dtype=torch.bool) if self.keep_infeasible else in_prior[rows, cols]
                gt_index[b, cols] = torch.where(keep, rows, -1)
        else:
            for b, q in enumerate(qualities):
                if q.shape[0] == 0:
                    continue
                gt_index[b] = _argmax_assign(q)
        return assignment_from_gt_index(gt_index, targets, num_classes)


def _argmax_assign(q: Tensor) -> Tensor:
    """Argmax POTO for one image: ``q`` ``[G, R]`` prior-masked quality -> ``int64 [R]`` GT index or ``-1``.

    Each GT picks its argmax point; GTs whose best is ``INFEASIBLE_QUALITY`` pick nothing; a point picked by several
    GTs keeps the highest-quality one. Source: DeFCN ``poto...3x_ms.argmax/fcos.py`` ``FCOS.get_ground_truth``.
    """
    best_q, best_j = q.max(dim=1)  # [G]
    chosen = torch.full_like(q, float("-inf"))
    chosen.scatter_(1, best_j[:, None], torch.where(best_q > INFEASIBLE_QUALITY, best_q, float("-inf"))[:, None])
    point_q, winner = chosen.max(dim=0)  # [R]
    return torch.where(torch.isfinite(point_q), winner, -1)
