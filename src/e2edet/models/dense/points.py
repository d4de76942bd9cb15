"""Anchor points ("shifts") of a dense detector: one point per FPN-level grid cell.

Spec ``dense.md`` 1.2 "Anchor points" (cvpods ``ShiftGenerator`` / ``_create_grid_offsets`` with
``SHIFT_GENERATOR.OFFSET=0.5``, ``NUM_SHIFTS=1``; MMDetection ``MlvlPointGenerator`` with offset 0.5).
"""

from __future__ import annotations

import torch

__all__ = ["anchor_points"]


def anchor_points(
    feature_sizes: list[tuple[int, int]],
    strides: list[int],
    offset: float = 0.5,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Anchor points of all FPN levels, concatenated P3..P7, row-major (y outer, x inner) within a level.

    Cell ``(i, j)`` of the level with stride ``s`` has the point ``x = (j + offset)·s``, ``y = (i + offset)·s``
    (pixels of the padded network input). An 800x1344 input (P3..P7 grids 100x168 .. 7x11) gives 22,400 points.

    Args:
        feature_sizes: ``[(h_l, w_l), ...]`` grid size of each level.
        strides: stride of each level in pixels (same length as ``feature_sizes``).
        offset: cell offset (0.5 = cell centre).
        device, dtype: of the returned float tensors.

    Returns:
        points ``[R, 2]`` (x, y) pixels; strides ``[R]`` float (``dtype``); levels ``[R]`` int64 (0 = first level);
        num_points_per_level ``list[int]`` with ``h_l·w_l`` per level, ``R = sum``.

    Raises:
        ValueError: when ``feature_sizes`` and ``strides`` have different lengths.
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(f"{len(feature_sizes)} feature sizes but {len(strides)} strides")
    points, point_strides, levels, counts = [], [], [], []
    for level, ((h, w), s) in enumerate(zip(feature_sizes, strides)):
        ys = (torch.arange(h, device=device, dtype=dtype) + offset) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + offset) * s
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        flat_x = grid_x.reshape(-1)
        points.append(torch.stack([flat_x, grid_y.reshape(-1)], dim=1))
        # ``full_like`` of the traced grid (not ``full((h·w,))``) keeps the sizes dynamic in an ONNX trace
        point_strides.append(torch.full_like(flat_x, float(s)))
        levels.append(torch.full_like(flat_x, level, dtype=torch.int64))
        counts.append(int(h) * int(w))
    return torch.cat(points), torch.cat(point_strides), torch.cat(levels), counts
