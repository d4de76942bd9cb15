"""Batching detection samples: zero-pad images to a common, stride-aligned size."""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["pad_images", "pad_masks", "collate"]


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 32) -> torch.Tensor:
    """Stack images of different sizes by zero-padding at the bottom and right.

    Args:
        images: ``B`` tensors ``[C, H_i, W_i]`` (same ``C``); converted to ``float32``.
        size_divisibility: the padded height and width are the maximum ``H_i`` / ``W_i`` rounded up to a
            multiple of this (use the largest FPN stride); ``1`` or ``0`` disables rounding.

    Returns:
        ``float32 [B, C, Hp, Wp]``; image ``i`` occupies ``[:, :H_i, :W_i]``, the rest is 0 (the mean
        colour after ImageNet normalisation).

    Raises:
        ValueError: empty list, a tensor that is not 3-D, or differing channel counts.
    """
    if len(images) == 0:
        raise ValueError("pad_images: no images to batch")
    if any(img.dim() != 3 for img in images):
        raise ValueError(f"pad_images: expected [C, H, W] tensors, got shapes {[tuple(i.shape) for i in images]}")
    channels = {int(img.shape[0]) for img in images}
    if len(channels) != 1:
        raise ValueError(f"pad_images: images have different channel counts {sorted(channels)}")
    div = max(int(size_divisibility), 1)
    max_h = max(int(img.shape[1]) for img in images)
    max_w = max(int(img.shape[2]) for img in images)
    pad_h, pad_w = math.ceil(max_h / div) * div, math.ceil(max_w / div) * div
    batch = images[0].new_zeros((len(images), channels.pop(), pad_h, pad_w), dtype=torch.float32)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]].copy_(img.as_subclass(torch.Tensor))
    return batch


def pad_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad instance masks ``[G, h, w]`` at the bottom and right to ``[G, height, width]`` (the padded image
    size); the dtype is kept.

    Raises:
        ValueError: ``masks`` is not 3-D or is larger than ``height`` x ``width``.
    """
    if masks.dim() != 3 or masks.shape[1] > height or masks.shape[2] > width:
        raise ValueError(f"pad_masks: masks of shape {tuple(masks.shape)} do not fit [G, {height}, {width}]")
    out = masks.new_zeros((masks.shape[0], height, width))
    out[:, : masks.shape[1], : masks.shape[2]] = masks
    return out


def collate(
    batch: Sequence[tuple[torch.Tensor, dict]], size_divisibility: int = 32
) -> tuple[torch.Tensor, list[dict]]:
    """``DataLoader`` collate function for :class:`~e2edet.data.coco.CocoDetection` samples.

    Args:
        batch: ``(image, target)`` pairs; images ``[3, h_i, w_i]`` (normalised ``float32`` with the
            standard transforms), targets as returned by the dataset.
        size_divisibility: see :func:`pad_images`.

    Returns:
        ``(images, targets)``: ``images`` ``float32 [B, 3, Hp, Wp]`` zero-padded bottom/right with ``Hp``,
        ``Wp`` multiples of ``size_divisibility``; ``targets`` the list of the ``B`` target dicts
        unchanged (their ``size`` is the unpadded ``(h, w)``), except that instance ``masks`` ``[G, h_i, w_i]``
        are zero-padded like their image to ``[G, Hp, Wp]`` (:func:`pad_masks`) in a copy of the dict.
    """
    images = pad_images([sample[0] for sample in batch], size_divisibility)
    targets = [sample[1] for sample in batch]
    height, width = int(images.shape[-2]), int(images.shape[-1])
    targets = [{**t, "masks": pad_masks(t["masks"], height, width)} if "masks" in t else t for t in targets]
    return images, targets
