"""Hungarian set matcher of the query-based detectors (Sparse R-CNN, AdaMixer; later the DETR family).

Cost = ``cost_class`` · FocalCost + ``cost_l1`` · L1 (normalised boxes in a declared box space)
+ ``cost_giou`` · (−GIoU on pixel xyxy), one optimal one-to-one assignment per image. Source: ``specs/query.md``
§1.3, §2.3 and "Design notes for one codebase" (one Hungarian matcher API, explicit box space); MMDetection 2.x
``mmdet/core/bbox/assigners/hungarian_assigner.py`` ``HungarianAssigner.assign`` and
``mmdet/core/bbox/match_costs/match_cost.py`` ``FocalLossCost`` / ``BBoxL1Cost`` / ``IoUCost``.

The assignment itself is :func:`e2edet.assign.hungarian.linear_assignment`, the project's one solver (one host copy
per batch, NaN-safe); the dense POTO assigner (:class:`e2edet.assign.poto.POTOAssigner`) keeps using the same
function with ``maximize=True`` on its quality matrix.

:func:`match_sets` matches several prediction sets (decoder stages, encoder proposals, one-to-many sets) at once: the
cost matrices of every set whose matcher has a ``cost_matrices`` method are solved in **one**
:func:`~e2edet.assign.hungarian.linear_assignment` call (one device-to-host copy per training step); any other
matcher (e.g. a top-k one-to-many assigner) is a plain callable with the same output format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

from e2edet.assign.hungarian import linear_assignment
from e2edet.ops.boxes import image_whwh

__all__ = ["BOX_FORMATS", "BOX_SPACES", "HungarianMatcher", "MatchRequest", "focal_cost", "match_sets"]

#: Box spaces of the L1 cost: normalised xyxy (Sparse R-CNN / AdaMixer) or normalised cxcywh (DETR family).
BOX_SPACES = ("xyxy_norm", "cxcywh_norm")
#: Formats of the predicted boxes handed to a matcher: ``"xyxy"`` pixels of the network input (Sparse R-CNN,
#: AdaMixer) or ``"cxcywh_norm"``, sigmoid outputs (cx, cy, w, h) in [0, 1] of the unpadded image (DETR family).
BOX_FORMATS = ("xyxy", "cxcywh_norm")

_EPS = 1e-12  # mmdet FocalLossCost eps


def focal_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal classification cost of every prediction against every GT (mmdet ``FocalLossCost``, unweighted).

    ``p = sigmoid(logit)``, ``pos = −α(1−p)^γ·log(p + 1e-12)``, ``neg = −(1−α)p^γ·log(1−p + 1e-12)``,
    ``cost[..., j] = (pos − neg)[..., labels[j]]``: the focal loss of the prediction with target 1 minus with
    target 0 at the GT's class column (``specs/query.md`` §1.3, §1.8 #4).

    Args:
        logits: ``[..., K]`` sigmoid class logits, any float dtype (computed in float32).
        labels: ``int64 [T]`` GT classes in ``[0, K)``.
        alpha, gamma: focal parameters.
    Returns:
        float32 ``[..., T]``.
    """
    prob = logits.float().sigmoid()
    pos = -alpha * (1 - prob).pow(gamma) * (prob + _EPS).log()
    neg = -(1 - alpha) * prob.pow(gamma) * (1 - prob + _EPS).log()
    return (pos - neg)[..., labels]


def _check_inputs(pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict]) -> None:
    if pred_logits.dim() != 3:
        raise ValueError(f"pred_logits must be [B, N, K], got shape {tuple(pred_logits.shape)}")
    if pred_boxes.shape != (*pred_logits.shape[:2], 4):
        raise ValueError(
            f"pred_boxes must be [B, N, 4] = {(*pred_logits.shape[:2], 4)}, got shape {tuple(pred_boxes.shape)}"
        )
    if len(targets) != pred_logits.shape[0]:
        raise ValueError(f"got {len(targets)} targets for a batch of {pred_logits.shape[0]} images")
    for b, t in enumerate(targets):
        if t["boxes"].dim() != 2 or t["boxes"].shape[-1] != 4 or t["labels"].shape != t["boxes"].shape[:1]:
            raise ValueError(
                f"targets[{b}]: 'boxes' must be [G, 4] and 'labels' [G], got {tuple(t['boxes'].shape)} and "
                f"{tuple(t['labels'].shape)}"
            )


def _check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise ValueError when a GT label lies outside ``[0, num_classes)`` (one device-to-host sync)."""
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"targets hold labels outside [0, {num_classes}) (pred_logits has K={num_classes})")


def _check_box_format(box_format: str) -> None:
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")


class HungarianMatcher:
    """Optimal one-to-one matching between the ``N`` queries and the ``G`` GTs of each image. No parameters.

    ``C = cost_class · FocalCost + cost_l1 · L1 + cost_giou · (−GIoU)`` with (``specs/query.md`` §1.3):

    - FocalCost: :func:`focal_cost` at the GT class column (α, γ = ``focal_alpha``, ``focal_gamma``);
    - L1: p1 distance between the predicted and GT boxes, both divided by ``(w, h, w, h)`` of the image's unpadded
      size ``targets[b]["size"]``, in ``box_space``: ``"xyxy_norm"`` (Sparse R-CNN / AdaMixer, mmdet ``BBoxL1Cost``
      with ``box_format='xyxy'``) or ``"cxcywh_norm"`` (DETR family, Deformable DETR ``models/matcher.py``
      ``HungarianMatcher``: ``torch.cdist(out_bbox, tgt_bbox, p=1)`` on normalised cxcywh);
    - GIoU: ``torchvision.ops.generalized_box_iou`` on xyxy (mmdet ``IoUCost`` with ``iou_mode='giou'``): pixels
      for ``"xyxy"`` predictions, normalised xyxy for ``"cxcywh_norm"`` ones (GIoU is invariant to the per-axis
      scaling).

    The predicted boxes come as ``box_format`` (:data:`BOX_FORMATS`, an argument of :meth:`cost_matrices`): xyxy
    pixels, or normalised cxcywh used as they are (no round trip through pixels). GT boxes are always xyxy pixels.
    The weights are **matching-cost** weights, independent of the loss weights of the criterion that uses the
    matcher (DETR's ``set_cost_*`` vs ``*_loss_coef``).

    All images' costs are built at once in float32 under ``no_grad`` (GTs of the batch concatenated, one
    ``[B, N, ΣG]`` tensor, no loop over queries), then each image's ``[G_b, N]`` block (rows = GTs) goes to
    :func:`~e2edet.assign.hungarian.linear_assignment`, which copies the batch to the host once and replaces
    NaN/±inf costs (e.g. from NaN logits or degenerate boxes) by the worst finite cost of that image.

    Args:
        cost_class, cost_l1, cost_giou: cost weights (2.0, 5.0, 2.0 in Sparse R-CNN and AdaMixer).
        focal_alpha, focal_gamma: focal-cost parameters (0.25, 2.0).
        box_space: one of :data:`BOX_SPACES`.
    Raises:
        ValueError: unknown ``box_space``.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_l1: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_space: str = "xyxy_norm",
    ) -> None:
        if box_space not in BOX_SPACES:
            raise ValueError(f"box_space must be one of {BOX_SPACES}, got {box_space!r}")
        self.cost_class = float(cost_class)
        self.cost_l1 = float(cost_l1)
        self.cost_giou = float(cost_giou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.box_space = box_space

    @torch.no_grad()
    def cost_matrices(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict],
                      check_labels: bool = True, box_format: str = "xyxy") -> list[Tensor]:
        """Weighted matching costs of each image.

        Args:
            pred_logits: ``[B, N, K]`` sigmoid class logits (detached internally).
            pred_boxes: ``[B, N, 4]`` in ``box_format`` (detached internally).
            targets: B dicts with ``boxes`` float ``[G_b, 4]`` xyxy pixels, ``labels`` int64 ``[G_b]`` in ``[0, K)``
                and ``size`` ``(h, w)`` of the unpadded network input.
            check_labels: validate the labels (one device sync; :func:`match_sets` does it once per step).
            box_format: ``"xyxy"`` pixels of the network input or ``"cxcywh_norm"`` (:data:`BOX_FORMATS`).
        Returns:
            B float32 matrices ``[G_b, N]`` (rows = GTs, columns = queries), on ``pred_logits``' device; may hold
            NaN/inf where the predictions do.
        Raises:
            ValueError: wrong shapes, a missing ``size``, a label outside ``[0, K)`` or an unknown ``box_format``.
        """
        _check_box_format(box_format)
        _check_inputs(pred_logits, pred_boxes, targets)
        batch, num_queries, num_classes = pred_logits.shape
        device = pred_logits.device
        counts = [int(t["boxes"].shape[0]) for t in targets]
        if sum(counts) == 0:
            return [torch.zeros(0, num_queries, device=device) for _ in targets]
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
        gt_labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)
        if check_labels:  # one device sync; match_stages checks once per step, not once per stage
            _check_labels(gt_labels, num_classes)
        whwh = image_whwh(targets, device)  # [B, 4]
        gt_whwh = whwh.repeat_interleave(torch.tensor(counts, device=device), dim=0)  # [T, 4]

        with torch.autocast(device_type=device.type, enabled=False):  # costs in float32
            boxes = pred_boxes.detach().float()
            cost = self.cost_class * focal_cost(pred_logits.detach(), gt_labels, self.focal_alpha, self.focal_gamma)
            gt_norm = gt_boxes / gt_whwh
            if box_format == "xyxy":
                pred_norm = boxes / whwh[:, None, :]
                giou_pred, giou_gt = boxes, gt_boxes  # pixels
                if self.box_space == "cxcywh_norm":
                    pred_norm = box_convert(pred_norm, "xyxy", "cxcywh")
            else:  # normalised cxcywh predictions (DETR family)
                giou_pred, giou_gt = box_convert(boxes, "cxcywh", "xyxy"), gt_norm
                pred_norm = boxes if self.box_space == "cxcywh_norm" else giou_pred
            if self.box_space == "cxcywh_norm":
                gt_norm = box_convert(gt_norm, "xyxy", "cxcywh")
            l1 = torch.cdist(pred_norm.reshape(-1, 4), gt_norm, p=1).view(batch, num_queries, -1)
            giou = generalized_box_iou(giou_pred.reshape(-1, 4), giou_gt).view(batch, num_queries, -1)
            cost = cost + self.cost_l1 * l1 - self.cost_giou * giou  # [B, N, T]

        blocks = cost.split(counts, dim=-1)  # block b: [B, N, G_b]; only image b's rows matter
        return [blocks[b][b].t() for b in range(batch)]

    @torch.no_grad()
    def __call__(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict],
                 box_format: str = "xyxy") -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch (arguments as in :meth:`cost_matrices`).

        Returns:
            one ``(pred_idx, gt_idx)`` pair per image, ``int64 [M_b]`` each with ``M_b = min(N, G_b)``, on the
            predictions' device, **sorted by ``gt_idx``** (ascending); an image with ``G_b = 0`` gives two empty
            tensors. Every matched pair is returned, including pairs whose cost was non-finite.
        """
        return match_sets([MatchRequest(self, pred_logits, pred_boxes, targets, box_format, check_labels=True)])[0]

    @torch.no_grad()
    def match_stages(self, stages: list[dict], targets: list[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """Match the predictions of every decoder stage with **one** host round trip for the whole training step.

        Args:
            stages: per stage a dict with ``pred_logits [B, N, K]`` and ``pred_boxes [B, N, 4]`` (xyxy pixels).
            targets: as in :meth:`cost_matrices`.
        Returns:
            per stage, the list of per-image ``(pred_idx, gt_idx)`` pairs of :meth:`__call__`.
        """
        return match_sets([MatchRequest(self, s["pred_logits"], s["pred_boxes"], targets, check_labels=i == 0)
                           for i, s in enumerate(stages)])


class MatchRequest(NamedTuple):
    """One prediction set to match (an argument of :func:`match_sets`).

    Attributes:
        matcher: a :class:`HungarianMatcher`, any object with its ``cost_matrices`` method (pooled into the one
            solver call), or a callable ``(pred_logits, pred_boxes, targets) -> [(pred_idx, gt_idx)]`` per image
            (called as is, with ``box_format=`` added when it is not ``"xyxy"``), e.g. a top-k one-to-many assigner
            whose ``pred_idx`` may repeat a query.
        pred_logits: ``[B, N, K]`` sigmoid class logits.
        pred_boxes: ``[B, N, 4]`` in ``box_format``.
        targets: B dicts (``boxes`` xyxy pixels ``[G_b, 4]``, ``labels`` int64 ``[G_b]``, ``size`` ``(h, w)``).
        box_format: one of :data:`BOX_FORMATS`.
        check_labels: validate the labels against ``K`` (one device sync; cost-matrix matchers only); ask it for
            one request per step.
    """

    matcher: Any
    pred_logits: Tensor
    pred_boxes: Tensor
    targets: list[dict]
    box_format: str = "xyxy"
    check_labels: bool = False


@torch.no_grad()
def match_sets(requests: Sequence[MatchRequest]) -> list[list[tuple[Tensor, Tensor]]]:
    """Match several prediction sets with **one** host round trip for all their Hungarian problems.

    The ``[G_b, N]`` cost matrices of every request whose matcher has ``cost_matrices`` (each with its own cost
    weights and box space) are built on the device, then solved together by one
    :func:`~e2edet.assign.hungarian.linear_assignment` call; other matchers are called directly.

    Args:
        requests: the sets to match (:class:`MatchRequest`).
    Returns:
        per request, one ``(pred_idx, gt_idx)`` pair of ``int64`` tensors per image (Hungarian: sorted by
        ``gt_idx``, ``min(N, G_b)`` pairs, as :meth:`HungarianMatcher.__call__`).
    Raises:
        ValueError: from the matchers (shapes, labels, ``size``, ``box_format``).
    """
    results: list[list[tuple[Tensor, Tensor]] | None] = [None] * len(requests)
    pooled: list[tuple[int, int]] = []  # (request index, number of images)
    matrices: list[Tensor] = []
    for i, r in enumerate(requests):
        if hasattr(r.matcher, "cost_matrices"):
            costs = r.matcher.cost_matrices(r.pred_logits, r.pred_boxes, r.targets, check_labels=r.check_labels,
                                            box_format=r.box_format)
            pooled.append((i, len(costs)))
            matrices.extend(costs)
        else:
            _check_box_format(r.box_format)
            extra = {} if r.box_format == "xyxy" else {"box_format": r.box_format}
            results[i] = list(r.matcher(r.pred_logits, r.pred_boxes, r.targets, **extra))
    flat = linear_assignment(matrices, maximize=False)  # the one host round trip
    start = 0
    for i, batch in pooled:
        results[i] = [(cols, rows) for rows, cols in flat[start:start + batch]]
        start += batch
    return results  # type: ignore[return-value]
