"""FCOS one-to-many assignment: center region + per-level scale ranges, smallest-area GT wins.

Source: ``specs/dense.md`` §1.3; cvpods ``cvpods/modeling/meta_arch/fcos.py`` ``FCOS.get_ground_truth`` and DeFCN
``playground/detection/crowdhuman/fcos.res50.fpn.crowdhuman.800size.30k/fcos.py`` ``FCOS.get_ground_truth``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from e2edet.assign.base import DenseAssignment, assignment_from_gt_index
from e2edet.assign.prior import center_prior, pairwise_ltrb, smallest_area_gt

DEFAULT_SCALE_RANGES: tuple[tuple[float, float], ...] = (
    (-1.0, 64.0),
    (64.0, 128.0),
    (128.0, 256.0),
    (256.0, 512.0),
    (512.0, math.inf),
)


class FCOSAssigner:
    """FCOS label assignment (one-to-many), ``@torch.no_grad()``, no parameters.

    For each (anchor point ``j``, GT ``i``): (1) ``j`` is inside the ``center_radius``-stride center region of
    ``i`` clipped to the box, strict boundary (:func:`e2edet.assign.prior.center_prior`; radius 0 = strictly
    inside the box); (2) ``m = max(l, t, r, b)`` of ``j`` w.r.t. ``i`` satisfies ``lo <= m <= hi`` for ``j``'s FPN
    level (both bounds inclusive); (3) among GTs passing both, the one with the smallest area wins (first index
    on ties). Points with no GT are background (label ``K``).

    Args:
        center_radius: center-sampling radius in strides (1.5 in FCOS-imprv / DeFCN, 0 on CrowdHuman).
        scale_ranges: ``(lo, hi)`` in pixels per FPN level, P3 first.
    Source: ``specs/dense.md`` §1.3; cvpods ``FCOS.get_ground_truth``.
    """

    def __init__(
        self,
        center_radius: float = 1.5,
        scale_ranges: tuple[tuple[float, float], ...] = DEFAULT_SCALE_RANGES,
    ) -> None:
        self.center_radius = float(center_radius)
        self.scale_ranges = tuple((float(lo), float(hi)) for lo, hi in scale_ranges)

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        strides: Tensor,
        levels: Tensor,
        targets: list[dict],
        num_classes: int,
    ) -> DenseAssignment:
        """Assign every anchor point of every image.

        Args:
            points: ``float [R, 2]`` anchor points ``(x, y)`` pixels, levels concatenated P3..P7.
            strides: ``float [R]`` stride of each point's level.
            levels: ``int64 [R]`` FPN level index (0 = P3); must be ``< len(scale_ranges)``.
            targets: B dicts with ``boxes float32 [G, 4]`` xyxy pixels and ``labels int64 [G]``.
            num_classes: ``K``.
        Returns:
            :class:`~e2edet.assign.base.DenseAssignment` ``[B, R]`` on ``points``' device.
        Raises:
            ValueError: if ``levels`` has a level without a scale range (checked on the host only for CPU tensors).
        """
        points = points.detach().float()
        device = points.device
        ranges = torch.tensor(self.scale_ranges, dtype=torch.float32, device=device)
        if levels.device.type == "cpu" and levels.numel() and int(levels.max()) >= len(self.scale_ranges):
            raise ValueError(f"level {int(levels.max())} has no scale range ({len(self.scale_ranges)} given)")
        lo, hi = ranges[levels, 0], ranges[levels, 1]  # [R]
        gt_index = torch.full((len(targets), points.shape[0]), -1, dtype=torch.int64, device=device)
        for b, tgt in enumerate(targets):
            boxes = tgt["boxes"].to(device=device, dtype=torch.float32)
            if boxes.shape[0] == 0:
                continue
            in_prior = center_prior(points, strides, boxes, self.center_radius)  # [G, R]
            max_dist = pairwise_ltrb(points, boxes).amax(dim=-1)  # [G, R]
            ok = in_prior & (max_dist >= lo[None]) & (max_dist <= hi[None])
            gt_index[b] = smallest_area_gt(ok, boxes)
        return assignment_from_gt_index(gt_index, targets, num_classes)
