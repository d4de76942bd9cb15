"""(l, t, r, b) box coding relative to anchor points, in pixels, and the FCOS centerness target.

cvpods ``box_regression.py::Shift2BoxTransform`` with weights (1, 1, 1, 1) (spec ``dense.md`` 1.2): targets are
distances in pixels, never divided by the stride. Centerness: spec 1.3 / FCOS ``compute_centerness_targets``.
"""

from __future__ import annotations

import torch

__all__ = ["encode_ltrb", "decode_ltrb", "centerness_target"]


def encode_ltrb(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Distances from anchor points to box sides.

    Args:
        points: ``[..., 2]`` (x, y) pixels.
        boxes: ``[..., 4]`` xyxy pixels; broadcast against ``points``.

    Returns:
        ``[..., 4]`` (l, t, r, b) = (x - x1, y - y1, x2 - x, y2 - y) in pixels; all > 0 iff the point is strictly
        inside the box.
    """
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], dim=-1)


def decode_ltrb(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_ltrb`.

    Args:
        points: ``[..., 2]`` (x, y) pixels.
        ltrb: ``[..., 4]`` distances (l, t, r, b) in pixels; broadcast against ``points``.

    Returns:
        ``[..., 4]`` xyxy pixels = (x - l, y - t, x + r, y + b).
    """
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]], dim=-1)


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    """FCOS centerness ``sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b))``.

    Args:
        ltrb: ``[..., 4]`` (l, t, r, b) regression targets in pixels (of points inside their box).

    Returns:
        ``[...]`` in [0, 1]: 1 at the box centre, 0 on an edge. Points outside the box (a negative distance) and
        degenerate boxes give 0 (numerators are clamped at 0 and denominators at 1e-12), never NaN.
    """
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    ratio_x = lr.min(dim=-1).values.clamp(min=0) / lr.max(dim=-1).values.clamp(min=1e-12)
    ratio_y = tb.min(dim=-1).values.clamp(min=0) / tb.max(dim=-1).values.clamp(min=1e-12)
    return torch.sqrt(ratio_x * ratio_y)
