"""AdaMixer operators in pure PyTorch: xyzr boxes, sinusoidal position embedding, IoF attention bias, adaptive 3D
sampling and adaptive mixing.

Spec ``query.md`` section 2.2; reference behaviour ``MCG-NJU/AdaMixer`` (commit ``a50e33d``)
``mmdet/models/roi_heads/bbox_heads/adamixer_decoder_stage.py`` (``decode_box``, ``make_sample_points``,
``position_embedding``, ``refine_xyzr``), ``sampling_3d_operator.py`` (``sampling_3d``, ``translate_to_linear_weight``)
and ``adaptive_mixing_operator.py`` (``AdaptiveMixing``).

Box state ``xyzr`` (float32, pixels of the network input): x, y = box center; z = log2(sqrt(w·h)); r = log2(h / w);
its conversions and update (``xyzr_to_xyxy``, ``xyxy_to_xyzr``, ``refine_xyzr``) are in :mod:`e2edet.ops.boxes`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2edet.ops.boxes import normalized_cxcywh_to_xyxy, xyxy_to_xyzr, xyzr_to_xyxy

__all__ = ["initial_xyzr", "position_embedding", "box_iof", "iof_attn_bias", "level_weights", "make_sample_points", "sampling_3d", "joint_layer_norm",
           "AdaptiveMixing", "grid_offsets"]


def initial_xyzr(sizes: Tensor, proposals: Tensor) -> Tensor:
    """Fixed stage-0 box state (not learnable, spec 2.2 "Queries").

    Args:
        sizes: ``[B, 2]`` (h, w) of the unpadded inputs (``common.input_sizes``).
        proposals: ``[N, 4]`` normalised (cx, cy, w, h) of ``common.proposal_init``: ``"whole"`` (AdaMixer: every
            query is the whole image) or ``"grid"`` (half-size boxes on a rows x cols grid, D-RMM's ``preset`` init).

    Returns:
        float32 ``[B, N, 4]`` (x, y, z, r), detached; the whole image is (W/2, H/2, log2 sqrt(W·H), log2(H/W)).
    """
    return xyxy_to_xyzr(normalized_cxcywh_to_xyxy(proposals.float(), sizes.float())).detach()


def position_embedding(xyzr: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (x, y, z, r): ``[B, N, 4]`` -> ``[B, N, 4·num_feats]``.

    Coordinates are divided by (1000, 1000, 1, 1); frequency i of a coordinate is 10000^(2·floor(i/2)/num_feats);
    sin on even and cos on odd indices (interleaved); the 4 coordinates are concatenated in order x, y, z, r.

    Raises:
        ValueError: ``num_feats`` odd or ``xyzr`` not ``[..., 4]``.
    """
    if num_feats % 2 or xyzr.shape[-1] != 4:
        raise ValueError(f"position_embedding needs [..., 4] boxes and an even num_feats, got "
                         f"{tuple(xyzr.shape)} and {num_feats}")
    scaled = xyzr.float() / xyzr.new_tensor([1000.0, 1000.0, 1.0, 1.0], dtype=torch.float32)
    i = torch.arange(num_feats, device=xyzr.device, dtype=torch.float32)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)
    angles = scaled[..., None] / freq  # [..., 4, F]
    even = (i % 2 == 0)
    return torch.where(even, angles.sin(), angles.cos()).flatten(-2)


def box_iof(boxes: Tensor, eps: float = 1e-6) -> Tensor:
    """Batched intersection over foreground: ``[B, N, 4]`` xyxy -> ``[B, N, N]`` with
    ``iof[b, i, j] = area(b_i ∩ b_j) / max(area(b_i), eps)`` (mmdet ``bbox_overlaps(mode='iof')``)."""
    lt = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    rb = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return inter / area.clamp(min=eps)[..., :, None]


def iof_attn_bias(xyzr: Tensor, tau: Tensor) -> Tensor:
    """Position-aware self-attention bias (spec 2.2 (a)): ``tau_h · log(IoF_ij + 1e-7)``.

    Args:
        xyzr: ``[B, N, 4]`` box states (IoF computed without gradient).
        tau: ``[heads]`` learnable per-head scales.

    Returns:
        float ``[B·heads, N, N]`` (row ``b·heads + h``, the ``nn.MultiheadAttention`` float ``attn_mask`` layout),
        added to the attention logits of query i over key j. Disjoint boxes give ``tau_h · log(1e-7) = -16.118·tau_h``.
    """
    with torch.no_grad():
        log_iof = torch.log(box_iof(xyzr_to_xyxy(xyzr.float())) + 1e-7)
    return (log_iof[:, None] * tau.view(1, -1, 1, 1)).flatten(0, 1)


def level_weights(z: Tensor, strides: list[int] | tuple[int, ...], tau: float = 2.0) -> Tensor:
    """Soft feature-level choice of a sample at log2 scale ``z`` (``translate_to_linear_weight``):
    ``softmax_j(-(z - log2 stride_j)^2 / tau)``. ``z`` ``[...]`` -> ``[..., len(strides)]``, summing to 1."""
    grid = torch.log2(torch.as_tensor(strides, dtype=z.dtype, device=z.device))
    return torch.softmax(-(z[..., None] - grid).pow(2) / tau, dim=-1)


def make_sample_points(offsets: Tensor, xyzr: Tensor, num_groups: int) -> Tensor:
    """3D sample points of every query (``make_sample_points``; its "yx" names are really (x, y)).

    Args:
        offsets: ``[B, N, G·P·3]`` generator output, group-major: viewed as ``[B, N, G, P, 3]``.
        xyzr: ``[B, N, 4]`` box states.
        num_groups: ``G``.

    Returns:
        ``[B, N, G, P, 3]`` (x, y, z): x = x_q + o_x·w_q, y = y_q + o_y·h_q pixels, z = z_q + o_z (log2 pixels).
    """
    b, n = offsets.shape[:2]
    offsets = offsets.view(b, n, num_groups, -1, 3)
    box = xyzr_to_xyxy(xyzr)
    wh = (box[..., 2:] - box[..., :2])[:, :, None, None]
    xy = xyzr[:, :, None, None, :2] + offsets[..., :2] * wh
    z = xyzr[:, :, None, None, 2:3] + offsets[..., 2:3]
    return torch.cat([xy, z], dim=-1)


def sampling_3d(points: Tensor, features: list[Tensor], strides: list[int] | tuple[int, ...],
                tau: float = 2.0) -> Tensor:
    """Adaptive 3D sampling (``sampling_3d``): bilinear sampling of every level, mixed by ``level_weights``.

    Level j is read with ``F.grid_sample`` (bilinear, zeros padding, ``align_corners=False``) at
    (x / (W_j·stride_j), y / (H_j·stride_j))·2 - 1, i.e. normalised w.r.t. feature size x stride (the PADDED input).
    Channels are split into G contiguous groups; the points of group g read only channel group g.

    Args:
        points: ``[B, N, G, P, 3]`` (x, y pixels, z log2 pixels), e.g. from ``make_sample_points``.
        features: per level ``[B, C, H_j, W_j]``, C divisible by G.
        strides: stride of each level in pixels.
        tau: level-weight temperature (2).

    Returns:
        float32 ``[B, N, G, P, C/G]``.

    Raises:
        ValueError: level count mismatch, or C not divisible by G.
    """
    if len(features) != len(strides):
        raise ValueError(f"sampling_3d got {len(features)} feature maps for {len(strides)} strides")
    b, n, g, p, _ = points.shape
    c = features[0].shape[1]
    if c % g:
        raise ValueError(f"feature channels {c} are not divisible by the {g} sampling groups")
    weights = level_weights(points[..., 2].float(), strides, tau).permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B·G, N, P, L]
    xy = points[..., :2].float().permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B·G, N, P, 2]
    out = xy.new_zeros(b * g, c // g, n, p)
    for j, (value, stride) in enumerate(zip(features, strides)):
        size = xy.new_tensor([value.shape[-1] * stride, value.shape[-2] * stride])
        grid = (xy / size) * 2.0 - 1.0
        # float32 sampling: bf16 normalised coordinates would be off by several pixels on large inputs
        sampled = F.grid_sample(value.float().reshape(b * g, c // g, *value.shape[-2:]), grid,
                                mode="bilinear", padding_mode="zeros", align_corners=False)  # [B·G, c, N, P]
        out = out + sampled * weights[:, None, ..., j]
    return out.view(b, g, c // g, n, p).permute(0, 3, 1, 4, 2)


def joint_layer_norm(x: Tensor) -> Tensor:
    """Layer norm over the last TWO dims jointly (points x channels), no affine (AdaptiveMixing, spec 2.9)."""
    return F.layer_norm(x, [int(s) for s in x.shape[-2:]])  # python ints: static shapes for ONNX export


class AdaptiveMixing(nn.Module):
    """Query-conditioned channel and spatial mixing (spec 2.2 (c), ``adaptive_mixing_operator.AdaptiveMixing``).

    Per query and group, ``parameter_generator`` (Linear dim -> G·(c·c + P_in·P_out), c = feat_dim / G) gives
    M ``[c, c]`` and S ``[P_out, P_in]``; X ``[P_in, c]`` -> ReLU(joint_LN(X·M)) -> ReLU(joint_LN(S·X)) ``[P_out, c]``;
    the G·P_out·c values are flattened (group-major) and projected by ``out_proj`` to ``dim``. The residual and the
    LayerNorm after it belong to the caller (``q = LN(q + mixing(x, q))``).

    Init (``AdaptiveMixing.init_weights``): ``parameter_generator`` weight 0 (bias keeps the default uniform), so at
    init every query shares the same M and S. The stage's xavier pass must run BEFORE ``reset_generator``.
    """

    def __init__(self, feat_dim: int, dim: int, in_points: int, out_points: int, num_groups: int):
        super().__init__()
        if feat_dim % num_groups:
            raise ValueError(f"feature width {feat_dim} is not divisible by {num_groups} groups")
        self.num_groups, self.in_points, self.out_points = num_groups, in_points, out_points
        self.channels = feat_dim // num_groups
        self.m_params, self.s_params = self.channels * self.channels, in_points * out_points
        self.parameter_generator = nn.Linear(dim, num_groups * (self.m_params + self.s_params))
        self.out_proj = nn.Linear(num_groups * out_points * self.channels, dim)
        self.reset_generator()

    @torch.no_grad()
    def reset_generator(self) -> None:
        """Zero the generator weight (official ``init_weights``)."""
        nn.init.zeros_(self.parameter_generator.weight)

    def generate(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """``query [B, N, dim]`` -> M ``[B, N, G, c, c]``, S ``[B, N, G, P_out, P_in]``."""
        b, n = query.shape[:2]
        params = self.parameter_generator(query).view(b, n, self.num_groups, -1)
        m, s = params.split([self.m_params, self.s_params], dim=-1)
        return (m.reshape(b, n, self.num_groups, self.channels, self.channels),
                s.reshape(b, n, self.num_groups, self.out_points, self.in_points))

    def forward(self, sampled: Tensor, query: Tensor) -> Tensor:
        """``sampled [B, N, G, P_in, c]``, ``query [B, N, dim]`` -> ``[B, N, dim]`` (no residual)."""
        b, n, g, p, c = sampled.shape
        if (g, p, c) != (self.num_groups, self.in_points, self.channels):
            raise ValueError(f"AdaptiveMixing expects sampled [B, N, {self.num_groups}, {self.in_points}, "
                             f"{self.channels}], got {tuple(sampled.shape)}")
        m, s = self.generate(query)
        out = F.relu(joint_layer_norm(torch.matmul(sampled.to(m.dtype), m)))  # channel mixing [B, N, G, P_in, c]
        out = F.relu(joint_layer_norm(torch.matmul(s, out)))  # spatial mixing [B, N, G, P_out, c]
        return self.out_proj(out.flatten(2))


def grid_offsets(in_points: int) -> Tensor | None:
    """Regular sqrt(P) x sqrt(P) grid of (x, y) offsets in (-0.5, 0.5) (cell centers) for a square ``in_points``
    (official ``AdaptiveSamplingMixing.init_weights``), else None. ``[P, 2]``; coordinate 0 varies slowest."""
    side = math.isqrt(in_points)
    if side * side != in_points:
        return None
    centers = (torch.arange(side, dtype=torch.float32) + 0.5) / side - 0.5
    a, b = torch.meshgrid(centers, centers, indexing="ij")
    return torch.stack([a.flatten(), b.flatten()], dim=-1)
