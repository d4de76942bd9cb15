"""ImageNet backbones (ResNet-18/34/50/101, MobileNetV2, Swin-T) that return C3, C4, C5 (optionally C2) feature maps.

Built on ``torchvision.models`` with its weights API. Freezing follows cvpods ``FREEZE_AT`` (spec ``dense.md`` 1.2):
``freeze_at = k`` freezes the first ``k`` stages, where stage 1 is the stem and stage 2 is the first stride-4 stage
(``layer1`` = res2 for ResNet). Every normalisation layer inside a frozen stage becomes a ``FrozenBatchNorm2d`` so its
statistics cannot drift (cvpods ``ResNet.freeze``). Swin-T follows mmdet's ``SwinTransformer`` instead (see
``SwinBody``).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import FrozenBatchNorm2d

from e2edet.models.folded_bn import fold_frozen_batch_norms

__all__ = ["Backbone", "SwinBody", "build_backbone", "BACKBONES", "freeze_module"]

# Child-module names of each freezing stage (stem first) and of the C3/C4/C5 taps.
_RESNET_STAGES = [["conv1", "bn1", "relu", "maxpool"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
_RESNET_TAPS = ["layer1", "layer2", "layer3", "layer4"]  # C2..C5
# MobileNetV2 ``features`` indices grouped by output stride: 2 (stem), 4, 8, 16, 32. Taps verified on torchvision 0.29:
# features[3] -> 24 ch at stride 4, features[6] -> 32 ch at stride 8, features[13] -> 96 ch at stride 16,
# features[18] -> 1280 ch at stride 32.
_MBV2_STAGES = [[str(i) for i in range(a, b)] for a, b in [(0, 2), (2, 4), (4, 7), (7, 14), (14, 19)]]
_MBV2_TAPS = ["3", "6", "13", "18"]  # C2..C5
# torchvision Swin ``features``: [patch embed, stage1, merge, stage2, merge, stage3, merge, stage4] (NHWC outputs).
_SWIN_TAPS = [1, 3, 5, 7]  # C2..C5 (strides 4, 8, 16, 32)

# name -> (torchvision constructor, ImageNet weights enum member, C2/C3/C4/C5 channels)
BACKBONES: dict[str, tuple[Callable[..., nn.Module], object, list[int]]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
    "mobilenet_v2": (models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V1, [24, 32, 96, 1280]),
    "swin_t": (models.swin_t, models.Swin_T_Weights.IMAGENET1K_V1, [96, 192, 384, 768]),
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


def frozen_bn_like(model: nn.Module, keys: Iterable[str]) -> nn.Module:
    """Make ``model``'s batch norms the kind a weights file was saved from, before loading it.

    :func:`build_backbone` picks ``FrozenBatchNorm2d`` when it loads ImageNet weights and trainable ``BatchNorm2d``
    otherwise; a model rebuilt from a run's config *without* downloading ImageNet weights (to load trained
    weights over them) must still have the frozen layers the run trained with. A ``BatchNorm2d`` whose
    ``<name>.running_mean`` is among ``keys`` but ``<name>.num_batches_tracked`` is not (``FrozenBatchNorm2d`` has
    none) becomes a ``FrozenBatchNorm2d``, in place, and is folded into its conv
    (:func:`e2edet.models.folded_bn.fold_frozen_batch_norms`); returns ``model``.
    """
    keys = set(keys)
    for name, child in list(model.named_modules()):
        if (isinstance(child, nn.modules.batchnorm._BatchNorm) and f"{name}.running_mean" in keys
                and f"{name}.num_batches_tracked" not in keys):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, _to_frozen_bn(child))
    fold_frozen_batch_norms(model)
    return model


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
            f"The backbone trains FROM SCRATCH (random init; CNNs get trainable BatchNorm unless a norm is given), "
            f"which needs far longer schedules. "
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
        body: ``IntermediateLayerGetter`` over the torchvision model (classifier layers dropped), or ``SwinBody``.
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


class SwinBody(nn.Module):
    """Swin Transformer trunk returning NCHW maps ``c2``..``c5`` (or ``c3``..``c5``), each after its own LayerNorm.

    Mirrors mmdet's detection ``SwinTransformer`` (``mmdet/models/backbones/swin.py`` in MCG-NJU/AdaMixer and
    strongwolf/o2f): a freshly initialised ``LayerNorm`` per output index (``norm{i}``; the classifier's final norm
    is not reused), and ``frozen_stages`` freezes the patch embedding, then whole stages *including the patch merging
    that follows them*, plus the output norms of the frozen stages, all kept in eval mode (no drop path) during
    training. ``freeze_at = frozen_stages + 1``.

    Args:
        features: torchvision ``SwinTransformer.features`` (8 modules, NHWC in/out except the NCHW input).
        channels: C2..C5 channel counts (``[96, 192, 384, 768]`` for Swin-T).
        with_c2: also return ``c2`` (and build its norm).
        freeze_at: 0..5; ``k`` freezes ``features[:min(2k - 1, 8)]`` (k >= 1) and the norms of ``c2``..``c{k}``.

    Forward: ``[B, 3, H, W]`` float -> ``OrderedDict(c2=[B, 96, H/4, W/4], c3=[B, 192, H/8, W/8], c4=[B, 384, H/16,
    W/16], c5=[B, 768, H/32, W/32])`` for H, W multiples of 32 (pad to 32 as the detection pipelines do); window
    attention pads the maps to the 7x7 window internally, so small or non-multiple-of-7 maps are fine.
    """

    def __init__(self, features: nn.Sequential, channels: list[int], with_c2: bool, freeze_at: int):
        super().__init__()
        self.features = features
        first = 0 if with_c2 else 1
        self.taps = {_SWIN_TAPS[i]: f"c{i + 2}" for i in range(first, 4)}
        self.norms = nn.ModuleDict({f"c{i + 2}": nn.LayerNorm(channels[i]) for i in range(first, 4)})
        self.frozen = list(features[: min(2 * freeze_at - 1, 8)]) if freeze_at > 0 else []
        self.frozen += [self.norms[n] for n in (f"c{i}" for i in range(2, freeze_at + 1)) if n in self.norms]
        for module in self.frozen:
            module.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> SwinBody:
        """Set train/eval mode; frozen modules always stay in eval mode (mmdet ``SwinTransformer.train``)."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """``[B, 3, H, W]`` -> ``OrderedDict`` of normalised NCHW maps (see the class docstring)."""
        out = OrderedDict()
        x = images
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                name = self.taps[i]
                out[name] = self.norms[name](x).permute(0, 3, 1, 2).contiguous()
        return out


def _set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic-depth probability ``rate * k / (N - 1)`` for the k-th of N blocks (linear rule of torchvision
    ``SwinTransformer`` and mmdet ``SwinTransformer``: ``torch.linspace(0, drop_path_rate, N)``)."""
    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    for layer, p in zip(layers, torch.linspace(0, rate, len(layers)).tolist()):
        layer.p = p


def build_backbone(
    name: str,
    pretrained: bool = True,
    norm: str | None = None,
    freeze_at: int = 2,
    with_c2: bool = False,
    drop_path_rate: float = 0.2,
) -> Backbone:
    """Build a C3-C5 (or C2-C5) backbone, optionally with torchvision ImageNet weights.

    Args:
        name: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``mobilenet_v2``, ``swin_t``.
        pretrained: load ``*_Weights.IMAGENET1K_V1`` through torchvision's weights API (hub cache, else download).
            If the weights cannot be obtained, a ``UserWarning`` is emitted and the backbone is randomly initialised.
            Swin-T: torchvision's own ImageNet-1k training (``swin_t-704ceda3.pth``, 81.5 top-1), not the official
            ``swin_tiny_patch4_window7_224.pth`` (81.2) that the mmdet configs load; same architecture.
        norm: ``"FrozenBN"``, ``"BN"`` or ``"SyncBN"`` (case-insensitive). ``None`` means ``FrozenBN`` when
            ImageNet weights are loaded (cvpods default) and trainable ``BN`` otherwise. Swin-T uses LayerNorm and
            only accepts ``None``.
        freeze_at: number of leading stages to freeze, 0..5 (cvpods ``FREEZE_AT``; default 2). ResNet: 1 = stem
            (conv1, bn1), 2 = + layer1 (res2), 3..5 = + layer2..layer4. MobileNetV2 ``features`` grouped by output
            stride: 1 = [0:2] (stride 2), 2 = + [2:4] (stride 4), 3 = + [4:7], 4 = + [7:14], 5 = + [14:19].
            Swin-T (mmdet ``frozen_stages = freeze_at - 1``): 1 = patch embedding, 2 = + stage 1 and the patch
            merging after it, 3..5 = + stages 2..4 likewise, with the output norms of frozen stages (see
            ``SwinBody``). The o2f Swin-T configs use ``frozen_stages=1`` (= 2 here); AdaMixer's Swin configs keep
            mmdet's default ``-1`` (= 0 here).
        with_c2: also return the stride-4 map ``c2`` (ResNet ``layer1``, MobileNetV2 ``features[3]``, Swin stage 1).
        drop_path_rate: Swin only (ignored by CNNs): stochastic-depth rate of the last block, rising linearly from 0
            (0.2 in the Swin-T detection configs: spec ``dense.md`` 3.6, AdaMixer ``adamixer_swin_s_*.py``).

    Returns:
        ``Backbone`` whose forward maps ``[B, 3, H, W]`` to C3/C4/C5 at strides 8/16/32 (C2..C5 at 4..32 with
        ``with_c2``). C2/C3/C4/C5 channels: ResNet-18/34 ``[64, 128, 256, 512]``, ResNet-50/101
        ``[256, 512, 1024, 2048]``, MobileNetV2 ``[24, 32, 96, 1280]``, Swin-T ``[96, 192, 384, 768]``.

    Raises:
        ValueError: unknown ``name`` or ``norm``, a ``norm`` for Swin, ``freeze_at`` outside 0..5 or
            ``drop_path_rate`` outside [0, 1).
    """
    key = name.lower()
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; valid names: {', '.join(BACKBONES)}")
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
    if norm is not None and norm.lower().replace("_", "") not in _NORMS:
        raise ValueError(f"unknown norm '{norm}'; valid: FrozenBN, BN, SyncBN or None")
    constructor, weights, channels = BACKBONES[key]
    first = 0 if with_c2 else 1

    if key == "swin_t":
        if norm is not None:
            raise ValueError(f"norm='{norm}' is not supported for swin_t (it uses LayerNorm); pass norm=None")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        model = constructor(weights=None)
        state_dict = _load_imagenet_state_dict(key, weights) if pretrained else None
        if state_dict is not None:
            model.load_state_dict(state_dict)
        _set_drop_path(model, drop_path_rate)
        body = SwinBody(model.features, channels, with_c2, freeze_at)
        return Backbone(key, body, channels[first:], [4, 8, 16, 32][first:])

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
    body = IntermediateLayerGetter(trunk, return_layers={t: f"c{i + 2}" for i, t in enumerate(taps) if i >= first})
    fold_frozen_batch_norms(body)  # exact, and a frozen norm no longer costs two passes over its feature map
    return Backbone(key, body, channels[first:], [4, 8, 16, 32][first:])
