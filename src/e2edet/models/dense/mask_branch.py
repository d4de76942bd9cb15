"""CondInst mask branch: the mask bases shared by every instance of an image, and the auxiliary semantic head.

Source: ``specs/dense.md`` §3.10; official ``strongwolf/o2f`` ``condinst_head.py`` ``E2ECondInstHead._init_mask_branch``,
``forward_mask_branch`` and ``init_weights`` (AdelaiDet ``adet/modeling/condinst/mask_branch.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from e2edet.ops.dynamic_mask import aligned_bilinear

__all__ = ["MaskBranch"]


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MaskBranch(nn.Module):
    """Mask bases from P3-P5 and, for training, semantic logits on P3.

    - ``refine``: per input level (P3, P4, P5) a 3x3 conv ``in_channels -> channels`` (no bias) + BatchNorm + ReLU;
      the refined P4, P5 are upsampled to P3 with :func:`~e2edet.ops.dynamic_mask.aligned_bilinear` (factors 2, 4)
      and summed with the refined P3.
    - ``tower``: ``num_convs`` x [3x3 conv ``channels`` (no bias) + BatchNorm + ReLU], then a 1x1 conv (bias) to
      ``num_bases`` bases: the mask features at the stride of P3 (8).
    - ``semantic`` (``num_classes > 0``): 2 x [3x3 conv (no bias) + BatchNorm + ReLU] on P3 and a 1x1 conv to
      ``num_classes`` logits (auxiliary loss only; never run at test time).

    Init (official): the head's mmcv ``init_cfg`` Normal(0, 0.01) reaches every conv here (the ``kaiming_init`` calls
    of ``init_weights`` receive the ``ModuleList``/``Sequential`` containers, which have no ``weight``, and change
    nothing), biases 0, the semantic output bias ``-log((1 - 0.01) / 0.01)``; BatchNorm weight 1, bias 0.

    Args:
        in_channels: FPN channels (256). channels: branch width (128). num_convs: tower depth (4).
        num_bases: mask bases (8). num_levels: FPN levels merged (3: P3-P5). num_classes: ``K`` of the semantic
        head (0 = none).
    """

    def __init__(self, in_channels: int, channels: int = 128, num_convs: int = 4, num_bases: int = 8,
                 num_levels: int = 3, num_classes: int = 0, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_levels = int(num_levels)
        self.refine = nn.ModuleList([_conv_bn_relu(in_channels, channels) for _ in range(num_levels)])
        tower: list[nn.Module] = [_conv_bn_relu(channels, channels) for _ in range(num_convs)]
        self.tower = nn.Sequential(*tower, nn.Conv2d(channels, num_bases, 1))
        self.semantic = None
        if num_classes > 0:
            self.semantic = nn.Sequential(_conv_bn_relu(in_channels, channels), _conv_bn_relu(channels, channels),
                                          nn.Conv2d(channels, num_classes, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.semantic is not None:
            nn.init.constant_(self.semantic[-1].bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``features``: FPN levels from P3 (``[B, C, H_l, W_l]``, each level half the size of the one before).

        Returns:
            ``(mask_feats [B, num_bases, H_3, W_3], semantic logits [B, K, H_3, W_3] or None)``; the semantic logits
            only in training mode.
        Raises:
            ValueError: fewer levels than ``num_levels`` or a level whose size is not ``H_3 / 2^l``.
        """
        if len(features) < self.num_levels:
            raise ValueError(f"mask branch merges {self.num_levels} levels, got {len(features)}")
        x = self.refine[0](features[0])
        for level in range(1, self.num_levels):
            y = self.refine[level](features[level])
            factor = x.shape[-2] // y.shape[-2]
            if y.shape[-2] * factor != x.shape[-2] or y.shape[-1] * factor != x.shape[-1]:
                raise ValueError(f"level P{3 + level} of size {tuple(y.shape[-2:])} is not P3 "
                                 f"{tuple(x.shape[-2:])} divided by an integer (pad the input to a multiple of 32)")
            x = x + aligned_bilinear(y, factor)
        semantic = self.semantic(features[0]) if self.semantic is not None and self.training else None
        return self.tower(x), semantic
