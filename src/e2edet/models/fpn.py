"""Feature pyramid P3-P7 (strides 8-128) on C3-C5, as in RetinaNet/FCOS.

Spec ``dense.md`` 1.2 (cvpods ``build_retinanet_fpn_backbone`` with ``BLOCK_IN_FEATURES="p5"``): lateral 1x1 convs,
top-down nearest upsampling fused by sum, 3x3 output convs, no norm; P6 = 3x3 stride-2 conv on **P5** and
P7 = 3x3 stride-2 conv on ReLU(P6). torchvision's ``LastLevelP6P7(out, out)`` builds P6 from P5 because its
in_channels equal its out_channels.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

__all__ = ["FPN"]


class FPN(nn.Module):
    """FPN with P6/P7 extra levels.

    Args:
        in_channels: channels of C3, C4, C5 (e.g. ``Backbone.out_channels``).
        out_channels: channels of every output level (256 in FCOS).

    Attributes:
        strides: ``[8, 16, 32, 64, 128]``; out_channels: ``int``.

    Init (torchvision): ``kaiming_uniform_(a=1)`` and zero bias on every conv, the same as cvpods ``c2_xavier_fill``.
    """

    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.strides = [8, 16, 32, 64, 128]
        self.fpn = FeaturePyramidNetwork(
            list(in_channels), out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels)
        )

    def forward(self, features: OrderedDict[str, torch.Tensor] | list[torch.Tensor]) -> list[torch.Tensor]:
        """C3, C4, C5 (dict in order, or list) -> ``[P3, P4, P5, P6, P7]``, each ``[B, out_channels, H_l, W_l]``.

        ``H_l = ceil(H / stride_l)`` for an input of height ``H`` that is a multiple of 32.
        """
        if not isinstance(features, dict):
            features = OrderedDict((f"c{i + 3}", f) for i, f in enumerate(features))
        return list(self.fpn(features).values())
