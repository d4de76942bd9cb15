"""Cutting large annotated images into fixed-size tiles (used to build training tiles of aerial images)."""

from __future__ import annotations

import math

import torch

__all__ = ["tile_origins", "tile_windows", "boxes_in_tile"]


def tile_origins(length: int, tile: int) -> list[int]:
    """Start offsets (pixels) of tiles of size ``tile`` covering ``[0, length)`` along one axis.

    Tiles start at ``0, tile, 2 * tile, ...``; the last one is shifted back to ``length - tile`` so that
    it stays inside the image (it then overlaps its neighbour). An axis shorter than ``tile`` gives one
    tile at 0 (of size ``length``).

    Raises:
        ValueError: non-positive ``length`` or ``tile``.
    """
    if length <= 0 or tile <= 0:
        raise ValueError(f"tile_origins: length and tile must be positive, got {length}, {tile}")
    if length <= tile:
        return [0]
    count = math.ceil(length / tile)
    return [min(i * tile, length - tile) for i in range(count)]


def tile_windows(width: int, height: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Tile windows ``(x0, y0, x1, y1)`` in pixels covering a ``width x height`` image, row-major.

    Each window is ``min(tile, width)`` wide and ``min(tile, height)`` high (see :func:`tile_origins`).
    """
    tw, th = min(tile, width), min(tile, height)
    return [(x, y, x + tw, y + th) for y in tile_origins(height, tile) for x in tile_origins(width, tile)]


def boxes_in_tile(
    boxes: torch.Tensor, window: tuple[int, int, int, int], min_visible: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of the whole image that belong to a tile, in the tile's pixel coordinates.

    A box is kept when at least ``min_visible`` of its area lies inside the window; kept boxes are
    clipped to the window and shifted so the window's top-left corner is the origin.

    Args:
        boxes: ``float [N, 4]`` xyxy pixels of the whole image.
        window: ``(x0, y0, x1, y1)`` pixels of the tile.
        min_visible: fraction of a box's area that must be inside the tile.

    Returns:
        ``(tile_boxes float32 [M, 4]`` xyxy pixels of the tile, ``index int64 [M]`` of the kept input boxes).
    """
    x0, y0, x1, y1 = window
    boxes = boxes.to(torch.float32).reshape(-1, 4)
    clipped = torch.stack([
        boxes[:, 0].clamp(x0, x1), boxes[:, 1].clamp(y0, y1), boxes[:, 2].clamp(x0, x1), boxes[:, 3].clamp(y0, y1),
    ], dim=1)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (area > 0) & (inside > 0) & (inside >= min_visible * area)
    index = torch.nonzero(keep).flatten()
    offset = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    return clipped[index] - offset, index
