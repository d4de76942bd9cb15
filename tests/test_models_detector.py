"""Dense head and detector: init, output contract, gradients (spec dense.md 1.2, 1.8.7, 2.2)."""

import math

import pytest
import torch

from e2edet.ops.boxes import decode_ltrb
from e2edet.models.dense.detector import DenseDetector
from e2edet.models.dense.head import DenseHead

SIZES = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]  # P3..P7 of a 64x96 input
R = sum(h * w for h, w in SIZES)


def _tiny(backbone="resnet18", **kwargs):
    torch.manual_seed(0)
    return DenseDetector(backbone, num_classes=3, pretrained=False, fpn_channels=32, num_convs=1, **kwargs)


def test_head_init_and_initial_cls_probability():
    torch.manual_seed(0)
    head = DenseHead(32, num_classes=5, num_convs=2, centerness=True, max_filter=True)
    assert head.cls_score.bias.detach().allclose(torch.full((5,), -math.log(99.0)))
    assert abs(head.cls_score.bias[0].item() + 4.595) < 1e-3
    for conv in [head.cls_tower[0], head.reg_tower[3], head.bbox_pred, head.centerness, head.max3d.conv, head.filter]:
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.2) and torch.all(conv.bias[:1] == 0)
    assert head.cls_tower[1].num_groups == 16 and torch.all(head.cls_tower[1].weight == 1)
    assert all(s.scale.item() == 1.0 for s in head.scales)
    # zero features: every layer before cls_score gives 0, so the probability is exactly sigmoid(-4.595) = 0.01
    out = head([torch.zeros(1, 32, h, w) for h, w in SIZES])
    for logits in out["cls_logits"]:
        torch.testing.assert_close(logits.sigmoid(), torch.full_like(logits, 0.01))


def test_initial_cls_probability_of_detector_is_about_001():
    model = _tiny()
    with torch.no_grad():
        prob = model(torch.randn(1, 3, 64, 96))["pred_logits"].sigmoid()
    assert prob.min() > 0.005 and prob.max() < 0.02
    assert abs(prob.mean().item() - 0.01) < 1e-3


def test_head_box_is_relu_scale_times_stride():
    torch.manual_seed(0)
    head = DenseHead(16, num_classes=2, num_convs=1)
    with torch.no_grad():
        head.scales[1].scale.fill_(2.0)
    feats = [torch.randn(1, 16, h, w) for h, w in SIZES]
    out = head(feats)
    with torch.no_grad():
        raw = head.bbox_pred(head.reg_tower(feats[1]))
    torch.testing.assert_close(out["bbox_ltrb"][1], torch.relu(2.0 * raw) * 16)
    assert set(out) == {"cls_logits", "bbox_ltrb"}


@pytest.mark.parametrize(
    "backbone,centerness,max_filter",
    [
        ("resnet18", False, False),
        ("resnet18", True, False),
        ("mobilenet_v2", False, True),
        ("mobilenet_v2", True, True),
    ],
)
def test_detector_outputs_and_gradients(backbone, centerness, max_filter):
    model = _tiny(backbone, centerness=centerness, max_filter=max_filter, freeze_at=2)
    model.train()
    out = model(torch.randn(2, 3, 64, 96))
    expected = {"pred_logits", "pred_boxes", "pred_ltrb", "points", "strides", "levels", "num_points_per_level"}
    expected |= {"pred_ctr"} if centerness else set()
    expected |= {"pred_filter"} if max_filter else set()
    assert set(out) == expected
    assert out["pred_logits"].shape == (2, R, 3)
    assert out["pred_boxes"].shape == out["pred_ltrb"].shape == (2, R, 4)
    assert out["points"].shape == (R, 2) and out["strides"].shape == out["levels"].shape == (R,)
    assert out["num_points_per_level"] == [h * w for h, w in SIZES]
    assert out["levels"].dtype == torch.int64 and torch.all(out["pred_ltrb"] >= 0)
    torch.testing.assert_close(out["pred_boxes"], decode_ltrb(out["points"][None], out["pred_ltrb"]))
    for key in ("pred_ctr", "pred_filter"):
        if key in out:
            assert out[key].shape == (2, R)
    loss = out["pred_logits"].sigmoid().sum() + out["pred_boxes"].mean()
    loss = loss + sum(out[k].sum() for k in ("pred_ctr", "pred_filter") if k in out)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_level_order_matches_cvpods_permute():
    model = _tiny(max_filter=False).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(images)
        head_out = model.head(model.fpn(model.backbone(images)))
    # P4 (level 1), cell (i=2, j=5) -> flat index 96 + 2*6 + 5; its point is ((5+0.5)*16, (2+0.5)*16)
    idx = 96 + 2 * 6 + 5
    torch.testing.assert_close(out["pred_logits"][0, idx], head_out["cls_logits"][1][0, :, 2, 5])
    assert out["points"][idx].tolist() == [88.0, 40.0] and out["levels"][idx] == 1


def test_non_multiple_of_32_input_raises():
    model = _tiny()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError):
        model(torch.randn(3, 64, 64))


def test_point_cache():
    model = _tiny(centerness=True)
    assert model.num_classes == 3 and model.strides == [8, 16, 32, 64, 128]
    first = model._anchor_points(SIZES, torch.device("cpu"))
    assert model._anchor_points(SIZES, torch.device("cpu")) is first


def test_o2f_centerness_branch_is_three_64_channel_convs_then_one():
    # spec 3.2: 3 x [3x3 conv + GN(32) + ReLU], C -> 64 -> 64 -> 64, then conv_centerness 3x3 64 -> 1 on the reg tower
    torch.manual_seed(0)
    head = DenseHead(256, num_classes=3, num_convs=1, centerness=True, ctr_convs=3, ctr_channels=64)
    layers = list(head.ctr_tower)
    assert len(layers) == 9
    convs, norms, relus = layers[0::3], layers[1::3], layers[2::3]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (256, 64, (3, 3), (1, 1)), (64, 64, (3, 3), (1, 1)), (64, 64, (3, 3), (1, 1))]
    assert all(isinstance(n, torch.nn.GroupNorm) and n.num_groups == 32 and n.num_channels == 64 for n in norms)
    assert all(isinstance(r, torch.nn.ReLU) for r in relus)
    c = head.centerness
    assert (c.in_channels, c.out_channels, c.kernel_size, c.padding) == (64, 1, (3, 3), (1, 1))
    for conv in [*convs, c]:
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.2) and torch.all(conv.bias == 0)
    feats = [torch.randn(2, 256, h, w) for h, w in SIZES]
    out = head(feats)
    with torch.no_grad():
        manual = c(head.ctr_tower(head.reg_tower(feats[2])))
    torch.testing.assert_close(out["centerness"][2], manual)
    assert [x.shape for x in out["centerness"]] == [(2, 1, h, w) for h, w in SIZES]
    # ctr_convs = 0: the FCOS branch, one conv C -> 1 straight on the reg tower
    fcos = DenseHead(256, num_classes=3, num_convs=1, centerness=True)
    assert fcos.ctr_tower is None and fcos.centerness.in_channels == 256


def test_detector_passes_o2f_centerness_convs():
    model = _tiny(centerness=True, ctr_convs=3, ctr_channels=16)
    convs = [m for m in model.head.ctr_tower if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(32, 16), (16, 16), (16, 16)]
    assert model.head.centerness.in_channels == 16
    out = model(torch.randn(1, 3, 64, 96))
    assert out["pred_ctr"].shape == (1, R)


def test_image_sizes_are_checked_like_every_detector():
    model = _tiny()
    with pytest.raises(ValueError, match="rows"):
        model(torch.randn(1, 3, 64, 96), torch.tensor([[64, 96], [64, 96]]))
    with pytest.raises(ValueError, match="image_sizes rows must be"):
        model(torch.randn(1, 3, 64, 96), torch.tensor([[64, 128]]))
    assert model(torch.randn(1, 3, 64, 96), torch.tensor([[50, 90]]))["pred_logits"].shape[0] == 1
