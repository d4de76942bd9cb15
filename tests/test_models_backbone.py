"""Backbones (C3-C5, optional C2; ResNet, MobileNetV2, Swin-T), freezing, pretrained loading/fallback, and the P3-P7 FPN
(spec dense.md 1.2)."""

import copy
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from e2edet.models.backbone import BACKBONES, build_backbone
from e2edet.models.fpn import FPN

CHANNELS = {
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "resnet101": [512, 1024, 2048],
    "mobilenet_v2": [32, 96, 1280],
}


@pytest.mark.parametrize("name", list(CHANNELS))
def test_every_backbone_builds_with_channels_and_strides(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained=False).eval()
    assert backbone.out_channels == CHANNELS[name] and backbone.strides == [8, 16, 32]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert list(out) == ["c3", "c4", "c5"]
    for feat, ch, stride in zip(out.values(), backbone.out_channels, backbone.strides):
        assert feat.shape == (1, ch, 64 // stride, 64 // stride)


C2_CHANNELS = {"resnet18": 64, "resnet50": 256, "mobilenet_v2": 24}


@pytest.mark.parametrize("name", list(C2_CHANNELS))
def test_with_c2_adds_the_stride_4_map(name):
    backbone = build_backbone(name, pretrained=False, with_c2=True).eval()
    assert backbone.out_channels == [C2_CHANNELS[name], *CHANNELS[name]] and backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert list(out) == ["c2", "c3", "c4", "c5"]
    for feat, ch, stride in zip(out.values(), backbone.out_channels, backbone.strides):
        assert feat.shape == (1, ch, 64 // stride, 64 // stride)


def test_resnet_freeze_at_2_freezes_stem_and_layer1():
    backbone = build_backbone("resnet18", pretrained=False, freeze_at=2)
    for name, p in backbone.named_parameters():
        frozen = name.startswith(("body.conv1", "body.bn1", "body.layer1"))
        assert p.requires_grad == (not frozen), name
    # frozen stages use FrozenBN, later ones the default trainable BN (pretrained=False)
    assert isinstance(backbone.body.bn1, FrozenBatchNorm2d)
    assert isinstance(backbone.body.layer1[0].bn1, FrozenBatchNorm2d)
    assert type(backbone.body.layer2[0].bn1) is nn.BatchNorm2d
    assert "fc" not in dict(backbone.body.named_children())


def test_freeze_at_zero_and_invalid_arguments():
    backbone = build_backbone("resnet18", pretrained=False, freeze_at=0)
    assert all(p.requires_grad for p in backbone.parameters())
    with pytest.raises(ValueError, match="resnet18.*mobilenet_v2"):
        build_backbone("vgg16", pretrained=False)
    with pytest.raises(ValueError):
        build_backbone("resnet18", pretrained=False, freeze_at=6)
    with pytest.raises(ValueError):
        build_backbone("resnet18", pretrained=False, norm="LayerNorm")


def test_mobilenet_freeze_at_2_freezes_up_to_stride_4():
    backbone = build_backbone("mobilenet_v2", pretrained=False, freeze_at=2)
    for name, p in backbone.named_parameters():
        block = int(name.split(".")[1])
        assert p.requires_grad == (block >= 4), name


def test_norm_option_bn_and_frozen():
    frozen = build_backbone("resnet18", pretrained=False, norm="FrozenBN", freeze_at=0)
    assert isinstance(frozen.body.layer3[0].bn1, FrozenBatchNorm2d)
    bn = build_backbone("resnet18", pretrained=False, norm="BN", freeze_at=0)
    assert type(bn.body.layer3[0].bn1) is nn.BatchNorm2d


def test_pretrained_loads_weights_with_frozen_bn(monkeypatch):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    state = reference.state_dict()
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", lambda self, *a, **k: state)
    backbone = build_backbone("resnet18", pretrained=True, freeze_at=2)
    assert isinstance(backbone.body.layer4[0].bn1, FrozenBatchNorm2d)
    torch.testing.assert_close(backbone.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(backbone.body.layer2[0].bn1.running_mean, reference.layer2[0].bn1.running_mean)


def test_pretrained_offline_warns_and_falls_back(monkeypatch):
    def unreachable(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", unreachable)
    with pytest.warns(UserWarning, match="FROM SCRATCH"):
        backbone = build_backbone("resnet18", pretrained=True)
    assert type(backbone.body.layer2[0].bn1) is nn.BatchNorm2d  # trainable BN after the fallback
    assert backbone.body.layer2[0].bn1.weight.requires_grad


def test_mobilenet_imagenet_weights_from_hub_cache():
    weights = BACKBONES["mobilenet_v2"][1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    if not path.is_file():
        pytest.skip(f"{path} not present (e2edet.data.samples.ensure_mobilenet_weights() places it)")
    backbone = build_backbone("mobilenet_v2", pretrained=True).eval()
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)["c5"], reference.eval().features(x), rtol=1e-4, atol=1e-4)


def test_fpn_levels_strides_and_p6_from_p5():
    torch.manual_seed(0)
    fpn = FPN([16, 24, 40], 32)
    feats = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip([16, 24, 40], [8, 16, 32])]
    outs = fpn(feats)
    assert fpn.strides == [8, 16, 32, 64, 128]
    assert [tuple(p.shape[2:]) for p in outs] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    assert all(p.shape[:2] == (2, 32) for p in outs)
    extra = fpn.fpn.extra_blocks
    with torch.no_grad():
        torch.testing.assert_close(outs[3], extra.p6(outs[2]))  # P6 on P5, not C5
        torch.testing.assert_close(outs[4], extra.p7(torch.relu(outs[3])))
    dict_outs = fpn({"c3": feats[0], "c4": feats[1], "c5": feats[2]})
    for a, b in zip(outs, dict_outs):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------- Swin-T
SWIN_CHANNELS = [96, 192, 384, 768]


@pytest.fixture(scope="module")
def swin_reference():
    """One randomly initialised torchvision swin_t (slow to build: ~2 s) shared by the Swin tests."""
    torch.manual_seed(0)
    return torchvision.models.swin_t().eval()


@pytest.fixture
def fast_swin(monkeypatch, swin_reference):
    """Make ``build_backbone('swin_t')`` construct deep copies of ``swin_reference`` instead of re-initialising."""
    _, weights, channels = BACKBONES["swin_t"]

    def constructor(weights=None):
        assert weights is None
        return copy.deepcopy(swin_reference)

    monkeypatch.setitem(BACKBONES, "swin_t", (constructor, weights, channels))
    return swin_reference


@pytest.mark.parametrize("with_c2", [True, False])
def test_swin_t_names_channels_strides_and_layer_norm_outputs(fast_swin, with_c2):
    backbone = build_backbone("swin_t", pretrained=False, with_c2=with_c2).eval()
    first = 0 if with_c2 else 1
    assert backbone.out_channels == SWIN_CHANNELS[first:] and backbone.strides == [4, 8, 16, 32][first:]
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)  # 64x96: 16x24 .. 2x3 maps, not multiples of the 7x7 window (padded inside)
    with torch.no_grad():
        out = backbone(x)
        stages = [y for i, y in enumerate(_run_features(fast_swin, x)) if i in (1, 3, 5, 7)]
    assert list(out) == ["c2", "c3", "c4", "c5"][first:]
    for feat, ch, stride, nhwc in zip(out.values(), backbone.out_channels, backbone.strides, stages[first:]):
        assert feat.shape == (1, ch, 64 // stride, 96 // stride) and feat.is_contiguous()
        # independent reference: torchvision's stage output (NHWC), fresh LayerNorm (weight 1, bias 0), to NCHW
        expected = torch.nn.functional.layer_norm(nhwc, (ch,)).permute(0, 3, 1, 2)
        torch.testing.assert_close(feat, expected, rtol=1e-4, atol=1e-4)


def _run_features(model, x):
    outs = []
    for layer in model.features:
        x = layer(x)
        outs.append(x)
    return outs


def test_swin_t_freeze_at_freezes_patch_embed_then_stages_and_keeps_them_in_eval(fast_swin):
    backbone = build_backbone("swin_t", pretrained=False, freeze_at=2, with_c2=True).train()
    for name, p in backbone.named_parameters():
        # mmdet frozen_stages=1: patch embed, stage 1 + its patch merging (features[2]) and the c2 output norm
        frozen = name.startswith(("body.features.0.", "body.features.1.", "body.features.2.", "body.norms.c2."))
        assert p.requires_grad == (not frozen), name
    body = backbone.body
    assert not body.features[1].training and not body.norms["c2"].training  # no drop path in frozen stages
    assert body.features[3].training and body.norms["c3"].training
    only_embed = build_backbone("swin_t", pretrained=False, freeze_at=1)
    frozen_names = {n.split(".")[2] for n, p in only_embed.named_parameters() if not p.requires_grad}
    assert frozen_names == {"0"}
    everything = build_backbone("swin_t", pretrained=False, freeze_at=5)
    assert not any(p.requires_grad for p in everything.parameters())
    assert all(p.requires_grad for p in build_backbone("swin_t", pretrained=False, freeze_at=0).parameters())


def test_swin_t_drop_path_rate_is_linear_over_blocks(fast_swin):
    for rate in (0.2, 0.1):
        backbone = build_backbone("swin_t", pretrained=False, drop_path_rate=rate)
        probs = [m.p for m in backbone.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
        assert len(probs) == 12  # Swin-T depths 2 + 2 + 6 + 2
        torch.testing.assert_close(torch.tensor(probs), torch.arange(12) * rate / 11, check_dtype=False)
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_backbone("swin_t", pretrained=False, drop_path_rate=1.0)
    with pytest.raises(ValueError, match="LayerNorm"):
        build_backbone("swin_t", pretrained=False, norm="FrozenBN")


def test_swin_t_pretrained_loads_weights(fast_swin, monkeypatch):
    # "ImageNet" weights: the fixture's weights shifted by 0.5, so loading is distinguishable from the init
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in fast_swin.state_dict().items()}
    monkeypatch.setattr(torchvision.models.Swin_T_Weights, "get_state_dict", lambda self, *a, **k: state)
    backbone = build_backbone("swin_t", pretrained=True)
    body = backbone.body
    torch.testing.assert_close(body.features[5][3].mlp[0].weight, state["features.5.3.mlp.0.weight"])
    table = body.features[3][1].attn.relative_position_bias_table
    torch.testing.assert_close(table, state["features.3.1.attn.relative_position_bias_table"])
    torch.testing.assert_close(body.features[0][0].weight, state["features.0.0.weight"])


def test_swin_t_pretrained_offline_warns_and_falls_back(monkeypatch):
    """Uses the real (unpatched) torchvision constructor."""

    def unreachable(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.Swin_T_Weights, "get_state_dict", unreachable)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="swin_t.*FROM SCRATCH"):
        backbone = build_backbone("swin_t", pretrained=True, freeze_at=0).eval()
    assert all(p.requires_grad for p in backbone.parameters())
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 96, 64))
    assert [tuple(f.shape) for f in out.values()] == [(1, 192, 12, 8), (1, 384, 6, 4), (1, 768, 3, 2)]
    assert all(torch.isfinite(f).all() for f in out.values())
