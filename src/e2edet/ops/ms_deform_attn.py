"""Multi-scale deformable attention sampling core (Deformable DETR) on ``F.grid_sample``: no compiled op.

Spec ``detr.md`` 1.2 "Multi-scale deformable attention"; reference behaviour ``fundamentalvision/Deformable-DETR``
(commit ``11169a6``) ``models/ops/functions/ms_deform_attn_func.py`` → ``ms_deform_attn_core_pytorch``, the pure-PyTorch
twin of its CUDA op ``MSDeformAttnFunction`` (``models/ops/src/cuda/ms_deform_im2col_cuda.cuh``).

Conventions: ``spatial_shapes`` are ``(H_l, W_l)`` pairs (height first) while sampling locations are ``(x, y)``
(width first), normalised to [0, 1] over the padded level map: (0, 0) is the top-left corner of the top-left pixel,
(1, 1) the bottom-right corner of the bottom-right pixel, so pixel (i, j) has its centre at ((j + 0.5) / W,
(i + 0.5) / H). Values are read by bilinear interpolation with zero padding outside the map.

This module imports nothing from e2edet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["as_spatial_shapes", "ms_deform_attn_core"]


def as_spatial_shapes(spatial_shapes: Sequence[Sequence[int]] | Tensor) -> list[tuple[int, int]]:
    """Level sizes as a list of python ``(H_l, W_l)`` int pairs.

    Python ints keep the sizes static under tracing and ONNX export (they become constants of the graph); an int64
    ``(L, 2)`` tensor (the official argument) is read back to the host once.

    Raises:
        ValueError: not ``L >= 1`` pairs of positive integers.
    """
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[-1] != 2 or spatial_shapes.is_floating_point():
            raise ValueError(f"spatial_shapes tensor must be an integer (L, 2) tensor of (H, W), got dtype "
                             f"{spatial_shapes.dtype} and shape {tuple(spatial_shapes.shape)}")
        spatial_shapes = spatial_shapes.tolist()
    try:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    except (TypeError, ValueError) as err:
        raise ValueError(f"spatial_shapes must be a sequence of (H, W) integer pairs, got {spatial_shapes!r}") from err
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must hold at least one (H, W) pair of positive sizes, got {shapes}")
    return shapes


def _check_shapes(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
                  attention_weights: Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    n, s, m, _ = value.shape
    total = sum(h * w for h, w in shapes)
    if s != total:
        raise ValueError(f"value has S = {s} positions but spatial_shapes {shapes} give sum(H*W) = {total}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (N, Lq, M, L, P, 2), got shape {tuple(sampling_locations.shape)}")
    n_l, lq, m_l, levels, points, _ = sampling_locations.shape
    if (n_l, m_l, levels) != (n, m, len(shapes)):
        raise ValueError(f"sampling_locations (N, Lq, M, L, P, 2) = {tuple(sampling_locations.shape)} does not fit "
                         f"value (N, S, M, D) = {tuple(value.shape)} and {len(shapes)} levels")
    if tuple(attention_weights.shape) != (n, lq, m, levels, points):
        raise ValueError(f"attention_weights must be (N, Lq, M, L, P) = {(n, lq, m, levels, points)}, got "
                         f"{tuple(attention_weights.shape)}")


def ms_deform_attn_core(value: Tensor, spatial_shapes: Sequence[Sequence[int]] | Tensor, sampling_locations: Tensor,
                        attention_weights: Tensor) -> Tensor:
    """Weighted sum of bilinearly sampled values: the attention core of ``MSDeformAttn`` (spec 1.2, steps 1-4).

    For every batch element n, query q and head m: ``out[n, q, m·D:(m+1)·D] = Σ_l Σ_p A[n, q, m, l, p] ·
    bilinear(value_l[n, :, :, m, :], loc[n, q, m, l, p])``, with ``F.grid_sample`` (bilinear, ``padding_mode="zeros"``,
    ``align_corners=False``) on the grid ``2·loc − 1``. Behaviour of the official ``ms_deform_attn_core_pytorch``
    (``models/ops/functions/ms_deform_attn_func.py``); the levels are accumulated one at a time instead of stacked.

    Computed in float32 (float64 stays float64) with autocast disabled, since the op has no half-precision
    definition in the official code (spec 1.9, issue #64): the inputs are cast up and the result is returned in the
    dtype of ``value``.

    Args:
        value: ``(N, S, M, D)``, levels concatenated in order, each flattened row-major (``S = Σ H_l·W_l``), M heads of
            D channels.
        spatial_shapes: ``L`` pairs ``(H_l, W_l)`` as python ints (static under tracing/ONNX export), or an integer
            ``(L, 2)`` tensor.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised (x, y) in [0, 1] over each level map (outside values
            read zeros).
        attention_weights: ``(N, Lq, M, L, P)``; usually a softmax over the joint (L, P) axis, not required here.

    Returns:
        ``(N, Lq, M·D)`` in the dtype of ``value``, head-major along the channels.

    Raises:
        ValueError: inconsistent shapes (``S ≠ Σ H·W``, N / M / L mismatch, wrong ranks).
    """
    shapes = as_spatial_shapes(spatial_shapes)
    _check_shapes(value, shapes, sampling_locations, attention_weights)
    device_type = value.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return _core(value, shapes, sampling_locations, attention_weights)
    return _core(value, shapes, sampling_locations, attention_weights)


def _core(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
          attention_weights: Tensor) -> Tensor:
    out_dtype = value.dtype
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                                torch.promote_types(attention_weights.dtype, torch.float32))
    n, _, heads, channels = value.shape
    lq = sampling_locations.shape[1]
    # (N, S, M, D) -> (N, M, D, S) -> (N·M, D, S): batch and head become the grid_sample batch.
    value = value.to(dtype).permute(0, 2, 3, 1).flatten(0, 1)
    # (N, Lq, M, L, P, 2) -> (N, M, L, Lq, P, 2) -> (N·M, L, Lq, P, 2); grid_sample's grid is in [-1, 1].
    grids = (2 * sampling_locations.to(dtype) - 1).permute(0, 2, 3, 1, 4, 5).flatten(0, 1)
    # (N, Lq, M, L, P) -> (N, M, L, Lq, P) -> (N·M, L, 1, Lq, P): broadcast over the D channels.
    weights = attention_weights.to(dtype).permute(0, 2, 3, 1, 4).flatten(0, 1).unsqueeze(2)
    out = None
    start = 0
    for level, (h, w) in enumerate(shapes):
        value_l = value[:, :, start:start + h * w].reshape(n * heads, channels, h, w)
        start += h * w
        sampled = F.grid_sample(value_l, grids[:, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (N·M, D, Lq, P)
        term = (sampled * weights[:, level]).sum(-1)  # (N·M, D, Lq)
        out = term if out is None else out + term
    # (N·M, D, Lq) -> (N, M·D, Lq) -> (N, Lq, M·D)
    return out.reshape(n, heads * channels, lq).transpose(1, 2).contiguous().to(out_dtype)
