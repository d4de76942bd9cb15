"""Small building blocks of the dense head: per-level ``Scale``, GroupNorm factory and the head initialiser."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Scale", "group_norm", "init_head_modules"]


class Scale(nn.Module):
    """Learnable scalar multiplier, one per FPN level (cvpods ``fcos.py`` ``Scale``, init 1.0).

    forward(x: any shape) -> ``scale · x`` (same shape).
    """

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``scale · x``."""
        return x * self.scale


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups (32 in the FCOS head, spec ``dense.md`` 1.2) when ``channels`` allows it.

    The group count is the largest divisor of ``groups`` that divides ``channels`` and leaves at least 2 channels per
    group: 32 for any multiple of 32 above 32 (e.g. 256), 16 for 32 channels, 8 for 24 or 16 channels, 1 for odd
    channels. Narrow CPU/test models thus still work, and a group never holds a single value on a 1x1 level with
    batch 1 (which GroupNorm rejects).
    """
    common = math.gcd(groups, channels)
    num_groups = max([d for d in range(1, common + 1) if common % d == 0 and (channels // d >= 2 or d == 1)])
    return nn.GroupNorm(num_groups, channels)


def init_head_modules(modules: list[nn.Module], std: float = 0.01) -> None:
    """Init every ``Conv2d`` in ``modules`` with N(0, std) weights and zero bias; every ``GroupNorm`` with weight 1,
    bias 0 (cvpods/DeFCN ``FCOSHead.__init__``; spec ``dense.md`` 1.2 and 2.2)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, nn.GroupNorm):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)
