"""Frozen batch norms folded into their convolutions (:mod:`e2edet.models.folded_bn`): the same function, the same
gradients and the same state-dict keys as the unfolded torchvision layers; trainable norms are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from e2edet.models.backbone import build_backbone, frozen_bn_like
from e2edet.models.folded_bn import FoldedConv2d, FoldedFrozenBatchNorm2d, fold_frozen_batch_norms


def _unfold(module):
    """The plain torchvision layers of a folded copy (the reference)."""
    ref = copy.deepcopy(module)
    for m in ref.modules():
        if isinstance(m, FoldedConv2d):
            m.__class__ = torch.nn.Conv2d
            del m.folded_bn
        elif isinstance(m, FoldedFrozenBatchNorm2d):
            m.__class__ = FrozenBatchNorm2d
    return ref


def _randomise_norms(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=g) * 0.4 + 0.6)  # scales near 1: activations stay O(1) in depth
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_folded_backbone_equals_torchvision_layers(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained=False, norm="FrozenBN", freeze_at=0)
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert sum(isinstance(m, FoldedConv2d) for m in backbone.modules()) == frozen > 0  # every frozen norm folded
    _randomise_norms(backbone)
    reference = _unfold(backbone)
    assert list(backbone.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 64, 96)
    out, ref = backbone(x), reference(x)
    for key in ref:  # relative to the map's scale (float rounding grows with depth)
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4 * float(ref[key].detach().abs().max()))
    sum(v.square().sum() for v in out.values()).backward()
    sum(v.square().sum() for v in ref.values()).backward()
    for (n, p), q in zip(backbone.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4 * float(q.grad.abs().max()), msg=n)


def test_fold_follows_loaded_statistics_and_refolds_after_replacement():
    torch.manual_seed(0)
    trainable = build_backbone("resnet18", pretrained=False, norm="BN", freeze_at=0)
    assert not any(isinstance(m, FoldedConv2d) for m in trainable.modules())  # trainable BN: statistics move
    frozen = build_backbone("resnet18", pretrained=False, norm="FrozenBN", freeze_at=0)
    state = {k: v for k, v in frozen.state_dict().items()}
    rebuilt = frozen_bn_like(trainable, state)  # BatchNorm2d -> FrozenBatchNorm2d, then folded
    assert sum(isinstance(m, FoldedConv2d) for m in rebuilt.modules()) == 20
    _randomise_norms(frozen, seed=3)
    rebuilt.load_state_dict(frozen.state_dict())  # the fold is computed from the loaded buffers at each call
    x = torch.randn(1, 3, 64, 64)
    ref = _unfold(frozen)(x)["c5"]
    torch.testing.assert_close(rebuilt.eval()(x)["c5"], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_fold_is_idempotent_and_unfolds_a_conv_whose_norm_changed():
    layers = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), torch.nn.ReLU())
    body = IntermediateLayerGetter(torch.nn.Sequential(layers), {"0": "out"})
    assert fold_frozen_batch_norms(body) == 1 and fold_frozen_batch_norms(body) == 1
    layers[1] = torch.nn.BatchNorm2d(4)
    assert fold_frozen_batch_norms(body) == 0 and type(layers[0]) is torch.nn.Conv2d
