"""ImageNet backbones (ResNet-18/34/50/101, MobileNetV2) that return C3, C4, C5 (optionally C2) feature maps.

Built on ``torchvision.models`` with its weights API. Freezing follows cvpods ``FREEZE_AT`` (spec ``dense.md`` 1.2):
``freeze_at = k`` freezes the first ``k`` stages, where stage 1 is the stem and stage 2 is the first stride-4 stage
(``layer1`` = res2 for ResNet). Every normalisation layer inside a frozen stage becomes a ``FrozenBatchNorm2d`` so its
statistics cannot drift (cvpods ``ResNet.freeze``).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["Backbone", "build_backbone", "BACKBONES", "freeze_module"]

# Child-module names of each freezing stage (stem first) and of the C3/C4/C5 taps.
_RESNET_STAGES = [["conv1", "bn1", "relu", "maxpool"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
_RESNET_TAPS = ["layer1", "layer2", "layer3", "layer4"]  # C2..C5
# MobileNetV2 ``features`` indices grouped by output stride: 2 (stem), 4, 8, 16, 32. Taps verified on torchvision 0.29:
# features[3] -> 24 ch at stride 4, features[6] -> 32 ch at stride 8, features[13] -> 96 ch at stride 16,
# features[18] -> 1280 ch at stride 32.
_MBV2_STAGES = [[str(i) for i in range(a, b)] for a, b in [(0, 2), (2, 4), (4, 7), (7, 14), (14, 19)]]
_MBV2_TAPS = ["3", "6", "13", "18"]  # C2..C5

# name -> (torchvision constructor, ImageNet weights enum member, C2/C3/C4/C5 channels)
BACKBONES: dict[str, tuple[Callable[..., nn.Module], object, list[int]]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
    "mobilenet_v2": (models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V1, [24, 32, 96, 1280]),
}

_NORMS: dict[str, type[nn.Module]] = {
    "frozenbn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "syncbn": nn.SyncBatchNorm,
}


def _to_frozen_bn(module: nn.Module) -> nn.Module:
    """Return ``module`` with every ``BatchNorm2d``/``SyncBatchNorm`` replaced by a ``FrozenBatchNorm2d``.

    The frozen copy keeps the affine parameters and running statistics (as buffers). Replacement is in place for
    children; the return value must be used when ``module`` itself is a batch-norm layer.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = _to_frozen_bn(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def freeze_module(module: nn.Module) -> nn.Module:
    """Freeze ``module``: batch norms become ``FrozenBatchNorm2d`` and every parameter gets ``requires_grad=False``.

    Returns the frozen module (a new object when ``module`` itself is a batch-norm layer; otherwise ``module``).
    """
    module = _to_frozen_bn(module)
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _load_imagenet_state_dict(name: str, weights) -> dict | None:
    """Fetch torchvision ImageNet weights through the weights API, or warn and return ``None`` when unreachable.

    ``weights.get_state_dict`` reads ``$TORCH_HOME/hub/checkpoints/<file>`` when present and downloads otherwise;
    ``URLError``/``OSError`` (no network, unwritable cache) and ``RuntimeError`` (bad hash, corrupt file) are caught.
    """
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:  # urllib.error.URLError is an OSError
        file_name = weights.url.rsplit("/", 1)[-1]
        warnings.warn(
            f"Could not load ImageNet weights for backbone '{name}' ({type(err).__name__}: {err}). "
            f"The backbone trains FROM SCRATCH (random init; trainable BatchNorm unless a norm is given), which needs "
            f"far longer schedules. "
            f"To use pretrained weights, download {weights.url} and place '{file_name}' in "
            f"'{torch.hub.get_dir()}/checkpoints/' (for mobilenet_v2, e2edet.data.samples.ensure_mobilenet_weights() "
            f"does this offline). Frozen stages (freeze_at) keep their random init; pass freeze_at=0 to train them.",
            stacklevel=3,
        )
        return None


class Backbone(nn.Module):
    """Feature extractor returning ``OrderedDict(c3=[B,C3,H/8,W/8], c4=[B,C4,H/16,W/16], c5=[B,C5,H/32,W/32])``,
    preceded by ``c2=[B,C2,H/4,W/4]`` when built with ``with_c2=True`` (Sparse R-CNN, AdaMixer).

    Attributes:
        name: backbone name (a key of ``BACKBONES``).
        out_channels: channel counts of the returned maps, in order.
        strides: output strides in pixels of the input (``[8, 16, 32]`` or ``[4, 8, 16, 32]``).
        body: ``IntermediateLayerGetter`` over the torchvision model (classifier layers dropped).
    """

    def __init__(self, name: str, body: nn.Module, out_channels: list[int], strides: list[int] | None = None):
        super().__init__()
        self.name = name
        self.body = body
        self.out_channels = list(out_channels)
        self.strides = list(strides) if strides is not None else [8, 16, 32]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """images ``[B, 3, H, W]`` (normalised RGB) -> ``OrderedDict`` of the maps named ``c2``/``c3``.. ``c5``."""
        return self.body(images)


def build_backbone(
    name: str, pretrained: bool = True, norm: str | None = None, freeze_at: int = 2, with_c2: bool = False
) -> Backbone:
    """Build a C3-C5 (or C2-C5) backbone, optionally with torchvision ImageNet weights.

    Args:
        name: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``mobilenet_v2``.
        pretrained: load ``*_Weights.IMAGENET1K_V1`` through torchvision's weights API (hub cache, else download).
            If the weights cannot be obtained, a ``UserWarning`` is emitted and the backbone is randomly initialised.
        norm: ``"FrozenBN"``, ``"BN"`` or ``"SyncBN"`` (case-insensitive). ``None`` means ``FrozenBN`` when
            ImageNet weights are loaded (cvpods default) and trainable ``BN`` otherwise.
        freeze_at: number of leading stages to freeze, 0..5 (cvpods ``FREEZE_AT``; default 2). ResNet: 1 = stem
            (conv1, bn1), 2 = + layer1 (res2), 3..5 = + layer2..layer4. MobileNetV2 ``features`` grouped by output
            stride: 1 = [0:2] (stride 2), 2 = + [2:4] (stride 4), 3 = + [4:7], 4 = + [7:14], 5 = + [14:19].
        with_c2: also return the stride-4 map ``c2`` (ResNet ``layer1``, MobileNetV2 ``features[3]``).

    Returns:
        ``Backbone`` whose forward maps ``[B, 3, H, W]`` to C3/C4/C5 at strides 8/16/32 (C2..C5 at 4..32 with
        ``with_c2``). C2/C3/C4/C5 channels: ResNet-18/34 ``[64, 128, 256, 512]``, ResNet-50/101
        ``[256, 512, 1024, 2048]``, MobileNetV2 ``[24, 32, 96, 1280]``.

    Raises:
        ValueError: unknown ``name`` or ``norm``, or ``freeze_at`` outside 0..5.
    """
    key = name.lower()
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; valid names: {', '.join(BACKBONES)}")
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
    if norm is not None and norm.lower().replace("_", "") not in _NORMS:
        raise ValueError(f"unknown norm '{norm}'; valid: FrozenBN, BN, SyncBN or None")
    constructor, weights, channels = BACKBONES[key]

    state_dict = _load_imagenet_state_dict(key, weights) if pretrained else None
    if norm is None:
        norm_layer = FrozenBatchNorm2d if state_dict is not None else nn.BatchNorm2d
    else:
        norm_layer = _NORMS[norm.lower().replace("_", "")]
    model = constructor(weights=None, norm_layer=norm_layer)
    if state_dict is not None:
        model.load_state_dict(state_dict)

    if key == "mobilenet_v2":
        trunk, stages, taps = model.features, _MBV2_STAGES, _MBV2_TAPS
    else:
        trunk, stages, taps = model, _RESNET_STAGES, _RESNET_TAPS
    for stage in stages[:freeze_at]:
        for child in stage:
            setattr(trunk, child, freeze_module(getattr(trunk, child)))
    first = 0 if with_c2 else 1
    body = IntermediateLayerGetter(trunk, return_layers={t: f"c{i + 2}" for i, t in enumerate(taps) if i >= first})
    return Backbone(key, body, channels[first:], [4, 8, 16, 32][first:])
