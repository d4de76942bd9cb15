"""Sine position encodings of Deformable DETR: of a padded feature map (:func:`sine_position_encoding`) and of
proposal boxes (:func:`box_sine_embedding`).

Source: ``fundamentalvision/Deformable-DETR`` ``models/position_encoding.py`` ``PositionEmbeddingSine`` (normalize=True,
with the cumulative sum offset by -0.5) and ``models/deformable_transformer.py``
``DeformableTransformer.get_proposal_pos_embed`` (``specs/detr.md`` §1.2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["box_sine_embedding", "sine_position_encoding"]


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    """``temperature ** (2 * (i // 2) / num_feats)`` for ``i = 0..num_feats-1`` (float32)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave(pos: Tensor) -> Tensor:
    """``[..., F]`` phases -> ``[..., F]`` with sin of the even and cos of the odd features, stacked then flattened
    (sin_0, cos_1, sin_2, cos_3, ...) as the official code does."""
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_encoding(mask: Tensor, num_feats: int = 128, temperature: float = 10000.0,
                           scale: float = 2 * math.pi, eps: float = 1e-6) -> Tensor:
    """Position encoding of a padded feature map.

    Args:
        mask: bool ``[B, H, W]``, True at padded positions.
        num_feats: features per axis (128: the encoding has ``2 * num_feats`` = 256 channels).
    Returns:
        float32 ``[B, 2 * num_feats, H, W]``: the y half first, then the x half. Positions are the cumulative count of
        valid pixels minus 0.5, divided by the valid extent (+ ``eps``) and multiplied by ``scale``.
    """
    not_mask = (~mask).to(torch.float32)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = _frequencies(num_feats, temperature, mask.device)
    pos_x = _interleave(x_embed[..., None] / dim_t)
    pos_y = _interleave(y_embed[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(box_logits: Tensor, num_feats: int = 128, temperature: float = 10000.0,
                       scale: float = 2 * math.pi) -> Tensor:
    """Sine embedding of proposal boxes (two-stage queries).

    Args:
        box_logits: ``[B, Q, 4]`` proposal boxes as logits of normalised (cx, cy, w, h) (inverse sigmoid).
    Returns:
        float32 ``[B, Q, 4 * num_feats]`` (512): per coordinate in cx, cy, w, h order the interleaved sin/cos of
        ``sigmoid(box) * scale / temperature ** (2 * (i // 2) / num_feats)``.
    """
    dim_t = _frequencies(num_feats, temperature, box_logits.device)
    pos = box_logits.float().sigmoid()[..., None] * scale / dim_t
    return _interleave(pos).flatten(2)
