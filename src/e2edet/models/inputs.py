"""The input checks every detector runs on its call ``model(images, image_sizes)`` (``docs/architecture.md``
"Model call")."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_inputs", "input_sizes"]


def input_sizes(images: Tensor, image_sizes: Tensor | None) -> Tensor:
    """float32 ``[B, 2]`` (h, w) of the unpadded inputs; the padded size when ``image_sizes`` is None.

    Raises:
        ValueError: ``image_sizes`` is not ``[B, 2]``.
    """
    batch = images.shape[0]
    if image_sizes is None:
        return images.new_tensor([images.shape[-2], images.shape[-1]], dtype=torch.float32).repeat(batch, 1)
    sizes = torch.as_tensor(image_sizes, device=images.device).to(torch.float32).reshape(-1, 2)
    if sizes.shape[0] != batch:
        raise ValueError(f"image_sizes has {sizes.shape[0]} rows for a batch of {batch} images")
    return sizes


def check_inputs(images: Tensor, image_sizes: Tensor | None) -> Tensor:
    """Validate a detector's inputs (the model call of ``docs/architecture.md``); return float32 ``[B, 2]`` (h, w)
    unpadded sizes.

    Args:
        images: ``[B, 3, H, W]``, ``H`` and ``W`` multiples of 32 (padded batch).
        image_sizes: ``[B, 2]`` (h, w) of the unpadded images with ``0 < h <= H``, ``0 < w <= W`` (the range is
            not checked while tracing or compiling); None = the padded size for every image.

    Raises:
        ValueError: ``images`` not ``[B, 3, H, W]``, ``H``/``W`` not multiples of 32, ``image_sizes`` not ``[B, 2]``
            (message names the rows) or outside ``(0, H] x (0, W]``.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    h, w = int(images.shape[-2]), int(images.shape[-1])
    if h % 32 != 0 or w % 32 != 0:
        raise ValueError(f"image height and width must be multiples of 32 (pad the batch), got {h}x{w}")
    sizes = input_sizes(images, image_sizes)
    if image_sizes is not None and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
        bad = (sizes <= 0).any(dim=1) | (sizes[:, 0] > h) | (sizes[:, 1] > w)
        if bool(bad.any()):
            raise ValueError(f"image_sizes rows must be (h, w) with 0 < h <= {h} and 0 < w <= {w} (the padded "
                             f"input), got {sizes[bad].tolist()}")
    return sizes
