"""Instance-mask losses of the CondInst variant: dice loss and the auxiliary semantic-segmentation targets.

Source: ``specs/dense.md`` §3.10; official ``strongwolf/o2f`` ``condinst_head.py`` (module-level
``dice_coefficient``; the ``sem_loss_on`` block of ``E2ECondInstHead.loss``), as AdelaiDet
``adet/modeling/condinst/dynamic_mask_head.py::dice_coefficient``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dice_loss", "semantic_targets"]


def dice_loss(pred: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-instance dice loss ``1 - 2·Σ p·t / (Σ p² + Σ t² + eps)`` over all pixels of each instance.

    Args:
        pred: ``[N, ...]`` mask probabilities (sigmoid of the logits).
        target: ``[N, ...]`` the same shape, 0/1 targets.
        eps: 1e-5 (official).
    Returns:
        float32 ``[N]``; an all-zero target gives ``1 - 0 = 1`` unless the prediction is exactly zero everywhere.
    Raises:
        ValueError: shapes differ.
    """
    if pred.shape != target.shape:
        raise ValueError(f"dice_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    n = pred.shape[0]
    pred = pred.float().reshape(n, -1)
    target = target.float().reshape(n, -1)
    intersection = (pred * target).sum(dim=1)
    union = pred.pow(2).sum(dim=1) + target.pow(2).sum(dim=1) + eps
    return 1.0 - 2.0 * intersection / union


def semantic_targets(masks: Tensor, labels: Tensor, num_classes: int, stride: int) -> Tensor:
    """Per-pixel class targets of the auxiliary semantic-segmentation loss, sampled at the pixel centers of a
    stride-``stride`` grid (``[stride // 2 :: stride]``, the P3 grid for stride 8).

    Each sampled pixel takes the label of the **smallest** mask (area counted over the full-resolution mask) that
    covers it, the first such GT on ties, and ``num_classes`` (background) where no mask does (official ``loss``,
    ``sem_loss_on`` block).

    Args:
        masks: ``[G, H, W]`` 0/1 instance masks of one image (padded frame, ``H``, ``W`` multiples of ``stride``).
        labels: ``int64 [G]``.
    Returns:
        ``int64 [H // stride, W // stride]``.
    """
    g = masks.shape[0]
    grid = masks[:, stride // 2 :: stride, stride // 2 :: stride] != 0  # [G, h', w']
    if g == 0:
        return torch.full(grid.shape[1:], num_classes, dtype=torch.int64, device=masks.device)
    areas = (masks != 0).sum(dim=(1, 2)).float()
    inf = torch.finfo(torch.float32).max
    per_pixel = torch.where(grid, areas[:, None, None], torch.full_like(grid, inf, dtype=torch.float32))
    smallest = per_pixel.argmin(dim=0)  # first minimum on ties, as the official ``min(dim)``
    covered = grid.any(dim=0)
    return torch.where(covered, labels.to(masks.device)[smallest], torch.full_like(smallest, num_classes))
