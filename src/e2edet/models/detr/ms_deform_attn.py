"""Multi-scale deformable attention module (Deformable DETR) on the grid_sample core :mod:`e2edet.ops.ms_deform_attn`.

Spec ``detr.md`` 1.2 "Multi-scale deformable attention"; reference behaviour ``fundamentalvision/Deformable-DETR``
(commit ``11169a6``, with the offset normaliser of PR #7) ``models/ops/modules/ms_deform_attn.py`` → ``MSDeformAttn``
(``__init__``, ``_reset_parameters``, ``forward``). Parameter names are the official ones (``sampling_offsets``,
``attention_weights``, ``value_proj``, ``output_proj``), so official checkpoints load by name.

Formats: ``spatial_shapes`` are ``(H_l, W_l)``; reference points and sampling locations are normalised ``(x, y)`` (2-d)
or ``(cx, cy, w, h)`` (4-d) in [0, 1] over the padded level map; padding masks are True on padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2edet.ops.ms_deform_attn import as_spatial_shapes, ms_deform_attn_core

__all__ = ["MSDeformAttn", "sampling_locations"]


def sampling_locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: Sequence[Sequence[int]]) -> Tensor:
    """Normalised sampling locations from references and offsets (official ``MSDeformAttn.forward``).

    Args:
        reference_points: ``(N, Lq, L, 2)`` normalised (x, y), or ``(N, Lq, L, 4)`` normalised (cx, cy, w, h); per level
            (already multiplied by the valid ratios).
        offsets: ``(N, Lq, M, L, P, 2)`` (x, y) offsets.
        spatial_shapes: ``L`` pairs ``(H_l, W_l)``.

    Returns:
        ``(N, Lq, M, L, P, 2)`` normalised (x, y), in at least float32:
        - 2-d reference: ``ref + Δ / (W_l, H_l)``, i.e. offsets in level-l pixels, normaliser in x, y order (the fix of
          PR #7 / issue #6; the first release divided by (H, W));
        - 4-d reference: ``(cx, cy) + Δ / P · (w, h) · 0.5``, so offsets of magnitude up to P reach half a box side
          (the division by P is intended, issue #239).

    Raises:
        ValueError: a last reference dimension other than 2 or 4.
    """
    # At least float32: under autocast the offsets come out of a bf16/fp16 linear layer.
    dtype = torch.promote_types(torch.promote_types(offsets.dtype, reference_points.dtype), torch.float32)
    offsets = offsets.to(dtype)
    ref = reference_points.to(dtype)[:, :, None, :, None, :]  # (N, Lq, 1, L, 1, 2|4)
    if reference_points.shape[-1] == 2:
        normaliser = torch.tensor([[w, h] for h, w in as_spatial_shapes(spatial_shapes)], dtype=dtype,
                                  device=offsets.device)  # (L, 2) as (W_l, H_l)
        return ref + offsets / normaliser[:, None, :]
    if reference_points.shape[-1] == 4:
        return ref[..., :2] + offsets / offsets.shape[-2] * ref[..., 2:] * 0.5
    raise ValueError(f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape "
                     f"{tuple(reference_points.shape)}")


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (spec 1.2): per head m, a softmax-weighted sum over L levels × P points of
    bilinear samples of the projected values around each query's reference, then ``output_proj``.

    ``sampling_offsets``: Linear(C → M·L·P·2) of the query, laid out as (M, L, P, 2); ``attention_weights``:
    Linear(C → M·L·P) of the query, one softmax over the joint (L, P) axis per head (no query·key product);
    ``value_proj``, ``output_proj``: Linear(C → C), M heads of D = C / M channels.

    Args:
        d_model: C, channels of queries, inputs and output.
        n_levels: L, feature levels.
        n_heads: M, heads; must divide ``d_model``.
        n_points: P, sampling points per head and level.

    Raises:
        ValueError: ``d_model`` not divisible by ``n_heads``, or a size below 1.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if min(d_model, n_levels, n_heads, n_points) < 1:
            raise ValueError(f"MSDeformAttn sizes must be >= 1, got d_model={d_model}, n_levels={n_levels}, "
                             f"n_heads={n_heads}, n_points={n_points}")
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init (``MSDeformAttn._reset_parameters``, spec 1.2 "Init").

        ``sampling_offsets``: weight 0; bias[m, l, k] = (k + 1) · dir_m for every level l, with dir_m = (cos θ_m,
        sin θ_m) / max(|cos θ_m|, |sin θ_m|), θ_m = 2πm / M (for M = 8: (1, 0), (1, 1), (0, 1), (−1, 1), ...).
        ``attention_weights``: weight and bias 0 (uniform 1 / (L·P) after the softmax). ``value_proj`` and
        ``output_proj``: Xavier-uniform weight, bias 0.
        """
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().amax(-1, keepdim=True)  # (M, 2), max-abs component 1
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32)  # k + 1
        bias = direction[:, None, None, :] * scale[None, None, :, None]  # (M, 1, P, 2)
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                spatial_shapes: Sequence[Sequence[int]] | Tensor, input_padding_mask: Tensor | None = None) -> Tensor:
        """Attend from each query to P points per head and level around its reference.

        Args:
            query: ``(N, Lq, C)`` (content + position embedding in Deformable DETR).
            reference_points: ``(N, Lq, L, 2)`` normalised (x, y) or ``(N, Lq, L, 4)`` normalised (cx, cy, w, h),
                per level (see :func:`sampling_locations`).
            input_flatten: ``(N, S, C)``, the L level maps flattened row-major and concatenated, ``S = Σ H_l·W_l``.
            spatial_shapes: ``L`` pairs ``(H_l, W_l)``, python ints (or an integer ``(L, 2)`` tensor).
            input_padding_mask: ``(N, S)`` bool, True at padding (those values are set to 0 before sampling), or None.

        Returns:
            ``(N, Lq, C)``.

        Raises:
            ValueError: ``len(spatial_shapes) ≠ n_levels``, ``S ≠ Σ H·W``, a reference of the wrong shape (last
            dimension not 2 or 4, or not ``(N, Lq, L, ·)``), or a mask not ``(N, S)``.
        """
        shapes = as_spatial_shapes(spatial_shapes)
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        if len(shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn has n_levels={self.n_levels} but got {len(shapes)} spatial_shapes {shapes}")
        total = sum(h * w for h, w in shapes)
        if s != total:
            raise ValueError(f"input_flatten has S = {s} positions but spatial_shapes {shapes} give sum(H*W) = {total}")
        if reference_points.shape[-1] not in (2, 4) or reference_points.dim() != 4 or \
                tuple(reference_points.shape[:3]) != (n, lq, self.n_levels):
            raise ValueError(f"reference_points must be (N, Lq, L, 2) or (N, Lq, L, 4) = ({n}, {lq}, {self.n_levels}, "
                             f"2|4), got {tuple(reference_points.shape)}")
        if input_padding_mask is not None and tuple(input_padding_mask.shape) != (n, s):
            raise ValueError(f"input_padding_mask must be (N, S) = ({n}, {s}), got {tuple(input_padding_mask.shape)}")

        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
        logits = self.attention_weights(query).view(n, lq, heads, levels * points)
        # One softmax over the joint (L, P) axis per head, in at least float32 (also under autocast).
        weights = F.softmax(logits, -1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights = weights.view(n, lq, heads, levels, points)
        locations = sampling_locations(reference_points, offsets, shapes)
        return self.output_proj(ms_deform_attn_core(value, shapes, locations, weights))
