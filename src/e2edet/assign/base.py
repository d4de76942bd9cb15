"""The per-point target record that every dense assigner returns (FCOS, POTO, Aux, O2F).

Losses consume only this record, so assigners are swappable (``specs/dense.md``, "Design notes for one codebase":
"Common per-image target record").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DenseAssignment:
    """Targets for the ``R`` anchor points of each of ``B`` images.

    Attributes:
        labels: ``int64 [B, R]``, class ``0..K-1`` of the matched GT, or ``K`` (background).
        box_targets: ``float32 [B, R, 4]``, xyxy box (pixels of the network input) of the matched GT; zeros for
            background points.
        pos_mask: ``bool [B, R]``, True for positive (foreground) points, i.e. ``labels != K``.
        gt_index: ``int64 [B, R]``, index of the matched GT in that image's ``targets[b]["boxes"]``, ``-1`` for
            background.
        soft_targets: optional ``float32 [B, R]`` classification target of each positive point at its label
            (1.0 for a hard positive; O2F soft anchors use values in (0, 1)). ``None`` means all positives are hard.
        weights: optional ``float32 [B, R]`` classification weight of each positive point (O2F: 1.0 for the certain
            positive, 0.4 for soft anchors). ``None`` means weight 1.
    """

    labels: Tensor
    box_targets: Tensor
    pos_mask: Tensor
    gt_index: Tensor
    soft_targets: Tensor | None = None
    weights: Tensor | None = None

    @property
    def num_pos(self) -> Tensor:
        """Number of positive points over the batch, an ``int64`` scalar tensor on the record's device."""
        return self.pos_mask.sum()

    def one_hot(self, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Classification target ``[B, R, K]``: 1 at ``(b, r, labels[b, r])`` for positives, 0 elsewhere.

        Background points (label ``K``) get an all-zero row. ``soft_targets`` are not applied here.
        """
        target = torch.zeros(*self.labels.shape, num_classes + 1, dtype=dtype, device=self.labels.device)
        target.scatter_(-1, self.labels.unsqueeze(-1), 1.0)
        return target[..., :num_classes]


def empty_assignment(batch_size: int, num_points: int, num_classes: int, device: torch.device) -> DenseAssignment:
    """An all-background :class:`DenseAssignment` for ``batch_size`` images of ``num_points`` anchor points."""
    return DenseAssignment(
        labels=torch.full((batch_size, num_points), num_classes, dtype=torch.int64, device=device),
        box_targets=torch.zeros(batch_size, num_points, 4, dtype=torch.float32, device=device),
        pos_mask=torch.zeros(batch_size, num_points, dtype=torch.bool, device=device),
        gt_index=torch.full((batch_size, num_points), -1, dtype=torch.int64, device=device),
    )


def assignment_from_gt_index(
    gt_index: Tensor, targets: list[dict], num_classes: int
) -> DenseAssignment:
    """Build a :class:`DenseAssignment` from a per-point GT index (``-1`` = background), without a host sync.

    This is the natural output of the "each point picks one GT" rules (FCOS smallest area, argmax POTO, Aux).

    Args:
        gt_index: ``int64 [B, R]``, index into ``targets[b]["boxes"]`` or ``-1``.
        targets: the batch's target dicts with ``boxes float32 [G_b, 4]`` (xyxy pixels) and ``labels int64 [G_b]``.
        num_classes: ``K``; background label.
    Returns:
        The record on ``gt_index``'s device.
    Raises:
        ValueError: if ``gt_index.shape[0] != len(targets)``.
    """
    if gt_index.shape[0] != len(targets):
        raise ValueError(f"gt_index has {gt_index.shape[0]} rows for {len(targets)} images")
    device = gt_index.device
    out = empty_assignment(gt_index.shape[0], gt_index.shape[1], num_classes, device)
    for b, tgt in enumerate(targets):
        if tgt["boxes"].shape[0] == 0:
            continue
        idx = gt_index[b]
        pos = idx >= 0
        safe = idx.clamp(min=0)
        labels = tgt["labels"].to(device=device, dtype=torch.int64)[safe]
        boxes = tgt["boxes"].to(device=device, dtype=torch.float32)[safe]
        out.labels[b] = torch.where(pos, labels, num_classes)
        out.box_targets[b] = boxes * pos.unsqueeze(-1)
        out.pos_mask[b] = pos
        out.gt_index[b] = torch.where(pos, idx, -1)
    return out
