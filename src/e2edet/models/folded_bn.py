"""Frozen batch norms folded into the convolution before them (an exact rewrite; state dicts are unchanged).

A ``FrozenBatchNorm2d`` after a convolution is the per-channel affine map ``y = x·s + t`` with
``s = γ / sqrt(σ² + ε)`` and ``t = β − μ·s`` (torchvision ``FrozenBatchNorm2d.forward``). Folded, the pair is one
convolution with weight ``W·s`` (per output channel) and bias ``t`` (+ ``b·s`` when the conv has a bias), which saves
two passes over every feature map of the backbone in the forward *and* the backward pass: measured here on 2 CPU
cores, a ``defcn_mnv2_cpu`` training step took 0.82x the time of the unfolded model (benchmarks/speed.py). The fold is
recomputed from the current tensors at every call, so the conv weight keeps training, loading a state dict updates
both, and the parameters and buffers keep their names (checkpoints and ONNX files are unaffected). Trainable batch
norms are never folded: their statistics change during training.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["FoldedConv2d", "FoldedFrozenBatchNorm2d", "fold_frozen_batch_norms"]

#: torchvision modules whose ``forward`` applies ``bn{k}`` right after ``conv{k}`` (stem and residual blocks).
_NAMED_PAIRS = (ResNet, BasicBlock, Bottleneck)


class FoldedConv2d(nn.Conv2d):
    """A ``Conv2d`` that applies the ``FrozenBatchNorm2d`` following it (``self.folded_bn``) inside its own call.

    Set up by :func:`fold_frozen_batch_norms`, never built directly. forward: ``[B, C_in, H, W]`` ->
    ``[B, C_out, H', W']`` = ``bn(conv(x))`` up to float rounding.
    """

    folded_bn: list[FrozenBatchNorm2d]  # a list, so that the norm is not registered twice as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.folded_bn[0]
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        bias = shift if self.bias is None else shift + self.bias * scale
        return self._conv_forward(x, self.weight * scale.view(-1, 1, 1, 1).to(self.weight.dtype), bias)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A ``FrozenBatchNorm2d`` whose map its preceding :class:`FoldedConv2d` already applied: the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _pairs(parent: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(conv, norm) children of ``parent`` that its forward applies back to back."""
    children = dict(parent.named_children())
    if isinstance(parent, (nn.Sequential, IntermediateLayerGetter)):  # children applied in order
        items = list(children.values())
        return list(zip(items, items[1:]))
    if isinstance(parent, _NAMED_PAIRS):
        return [(children[f"conv{k}"], children[f"bn{k}"]) for k in (1, 2, 3)
                if f"conv{k}" in children and f"bn{k}" in children]
    return []


def fold_frozen_batch_norms(model: nn.Module) -> int:
    """Fold every ``FrozenBatchNorm2d`` into the ``Conv2d`` its container applies right before it, in place.

    Pairs are looked for in ``nn.Sequential`` and ``IntermediateLayerGetter`` containers (consecutive children) and
    in torchvision's ResNet blocks (``conv{k}`` then ``bn{k}``). Idempotent: call it again after replacing norms (e.g.
    :func:`e2edet.models.backbone.frozen_bn_like`); a folded conv whose norm is no longer a frozen one is unfolded.

    Returns:
        The number of folded pairs.
    """
    folded = 0
    for parent in model.modules():
        for conv, norm in _pairs(parent):
            if not isinstance(conv, nn.Conv2d):
                continue
            if isinstance(norm, FrozenBatchNorm2d):
                conv.__class__ = FoldedConv2d
                conv.folded_bn = [norm]
                norm.__class__ = FoldedFrozenBatchNorm2d
                folded += 1
            elif isinstance(conv, FoldedConv2d):
                conv.__class__ = nn.Conv2d
                del conv.folded_bn
    return folded
