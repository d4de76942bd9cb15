"""3D max filtering (3DMF) over (FPN level, y, x) from DeFCN.

Spec ``dense.md`` 2.2 (DeFCN ``playground/.../3dmf/fcos.py`` ``MaxFiltering``, built as ``FCOSHead.max3d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from e2edet.models.dense.layers import group_norm

__all__ = ["MaxFiltering3D"]


def _box_max(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride=1, padding=kernel_size // 2)`` (-inf padding) as a max over shifted
    views, rows then columns: the same values, and on CPU several times faster than ``max_pool2d_with_indices`` in
    training. A gradient reaches the maximum of each window (split between exact ties, which ``max_pool2d`` gives to
    one of them)."""
    r = kernel_size // 2
    if r == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, 0, 0), value=float("-inf"))
    rows = padded[..., 0:w]
    for d in range(1, kernel_size):
        rows = torch.maximum(rows, padded[..., d : d + w])
    padded = F.pad(rows, (0, 0, r, r), value=float("-inf"))
    out = padded[..., 0:h, :]
    for d in range(1, kernel_size):
        out = torch.maximum(out, padded[..., d : d + h, :])
    return out


class MaxFiltering3D(nn.Module):
    """Learned 3D max filter across neighbouring FPN levels.

    For regression-tower outputs ``x_l`` (level ``l`` of ``L``), with ``margin = tau // 2``:

    1. ``f_l = conv3x3(x_l)``: one ``channels -> channels`` conv with bias, shared across levels.
    2. Stack ``f_k`` for ``k = max(0, l - margin) .. min(L - 1, l + margin)`` on a new depth axis, each ``f_k`` with
       ``k != l`` resized to level ``l``'s grid by bilinear interpolation (``align_corners=False``).
    3. ``F.max_pool3d`` with kernel ``(tau + 1, k, k)``, stride 1, padding ``(tau // 2, k // 2, k // 2)``; max pooling
       pads with -inf, so borders and the first/last level take the max over valid neighbours only. Keep the depth
       slice of level ``l``, index ``min(l, margin)``: this is ``M_l``.
    4. ``y_l = ReLU(GN(M_l + x_l))`` (``use_gn=True``) or ``ReLU(M_l + x_l)``: the residual adds the tower output
       ``x_l``, not ``f_l``. GN uses 32 groups (fewer for narrow models, see ``layers.group_norm``) and is shared
       across levels.

    Args:
        channels: feature channels ``C`` (256 in DeFCN).
        kernel_size: spatial kernel ``k`` (``POTO.FILTER_KERNEL_SIZE=3``), odd.
        tau: scale extent (``POTO.FILTER_TAU=2``: levels l-1, l, l+1); 0 gives per-level 2D max pooling.
        use_gn: GroupNorm after the residual (``3dmf`` variants) or not (``3dmf_wo_gn``).

    Computed as ``max_pool2d(max_k f_k)``: the depth window ``tau + 1`` centred on slice ``min(l, margin)`` with
    ``tau // 2`` padding covers exactly the stacked levels, and max commutes with max, so this equals step 3's
    slice while pooling one 2D map instead of a whole 3D volume; the 2D pooling itself is a separable max over shifted
    views (:func:`_box_max`).

    Init: call ``e2edet.models.dense.layers.init_head_modules`` (the head does: N(0, 0.01), bias 0).

    Raises:
        ValueError: for an even ``kernel_size`` or a negative or odd ``tau`` (DeFCN uses 2; an odd depth kernel
            has no centred slice).
    """

    def __init__(self, channels: int, kernel_size: int = 3, tau: int = 2, use_gn: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if tau < 0 or tau % 2:
            raise ValueError(f"tau must be even and >= 0, got {tau}")
        self.kernel_size = kernel_size
        self.tau = tau
        self.margin = tau // 2
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)
        self.norm = group_norm(channels) if use_gn else nn.Identity()

    def max_maps(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Steps 1-3: ``[B, C, H_l, W_l]`` per level -> ``M_l`` ``[B, C, H_l, W_l]`` per level."""
        filtered = [self.conv(x) for x in features]
        num_levels = len(filtered)
        out = []
        for level, f in enumerate(filtered):
            size = f.shape[-2:]
            across = f  # max over the neighbouring levels, elementwise (no stacked copy)
            for k in range(max(0, level - self.margin), min(num_levels - 1, level + self.margin) + 1):
                if k != level:
                    across = torch.maximum(across, F.interpolate(filtered[k], size=size, mode="bilinear",
                                                                 align_corners=False))
            out.append(_box_max(across, self.kernel_size))
        return out

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``x_l`` ``[B, C, H_l, W_l]`` per level -> ``y_l`` of the same shapes (step 4 on :meth:`max_maps`)."""
        return [F.relu(self.norm(m + x)) for m, x in zip(self.max_maps(features), features)]
