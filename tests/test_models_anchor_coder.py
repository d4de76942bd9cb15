"""The dense detector's anchor-delta box coder (DeFCN Anchor baseline, specs/dense.md 2.3): DeltaXYWH with cvpods'
``Box2BoxTransform`` semantics, square anchors 32..512 on P3..P7, the output contract, and ONNX export."""

from __future__ import annotations

import math

import pytest
import torch

from e2edet.build import build_model
from e2edet.config import apply_overrides
from e2edet.models.dense.detector import DenseDetector
from e2edet.models.dense.head import DenseHead
from e2edet.ops.boxes import (
    MAX_LOG_RATIO,
    delta_xywh_decode,
    delta_xywh_encode,
    square_boxes,
)
from e2edet.recipes import get_recipe
from tests.conftest import TINY


def test_delta_xywh_encode_decode_round_trip_and_cvpods_clamp():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=gen) * 300
    anchors = torch.cat([xy, xy + 4 + torch.rand(50, 2, generator=gen) * 200], 1)
    xy = torch.rand(50, 2, generator=gen) * 300
    boxes = torch.cat([xy, xy + 4 + torch.rand(50, 2, generator=gen) * 200], 1)
    deltas = delta_xywh_encode(anchors, boxes)
    decoded = delta_xywh_decode(anchors, deltas, stds=(1.0, 1.0, 1.0, 1.0), clamp_below=False)
    torch.testing.assert_close(decoded, boxes, rtol=1e-5, atol=1e-3)
    # (dx, dy) move the centre by width/height units, dw = log 2 doubles the width; Box2BoxTransform clamps dw, dh
    # only from above (at log(1000 / 16)), mmdet on both sides.
    anchor = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    assert delta_xywh_decode(anchor, torch.tensor([[0.5, 0.0, math.log(2.0), 0.0]]), stds=(1, 1, 1, 1),
                             clamp_below=False).tolist() == [[0.0, 0.0, 64.0, 32.0]]
    anchor = torch.tensor([[-16.0, -16.0, 16.0, 16.0]])  # centred on 0: x2 - x1 has no cancellation
    big, small = torch.tensor([[0.0, 0.0, 10.0, 0.0]]), torch.tensor([[0.0, 0.0, -10.0, 0.0]])
    w_big = delta_xywh_decode(anchor, big, stds=(1, 1, 1, 1), clamp_below=False)
    assert (w_big[0, 2] - w_big[0, 0]).item() == pytest.approx(32 * math.exp(MAX_LOG_RATIO), rel=1e-5)  # 2000
    w_small = delta_xywh_decode(anchor, small, stds=(1, 1, 1, 1), clamp_below=False)
    assert (w_small[0, 2] - w_small[0, 0]).item() == pytest.approx(32 * math.exp(-10.0), rel=1e-4)
    w_mmdet = delta_xywh_decode(anchor, small, stds=(1, 1, 1, 1))
    assert (w_mmdet[0, 2] - w_mmdet[0, 0]).item() == pytest.approx(32 * math.exp(-MAX_LOG_RATIO), rel=1e-5)


def test_square_boxes():
    boxes = square_boxes(torch.tensor([[4.0, 4.0], [8.0, 24.0]]), torch.tensor([32.0, 64.0]))
    assert boxes.tolist() == [[-12.0, -12.0, 20.0, 20.0], [-24.0, -8.0, 40.0, 56.0]]


def test_head_with_anchor_deltas_has_no_scale_and_raw_outputs():
    torch.manual_seed(0)
    head = DenseHead(32, num_classes=3, num_convs=1, box_coder="anchor_deltas")
    assert head.scales is None and not any("scales" in n for n, _ in head.named_parameters())
    out = head([torch.randn(1, 32, 4, 4)] * 5)
    assert set(out) == {"cls_logits", "bbox_deltas"} and (out["bbox_deltas"][0] < 0).any()  # no ReLU
    with pytest.raises(ValueError, match="box_coder"):
        DenseHead(32, num_classes=3, box_coder="xywh")


def test_detector_with_anchor_deltas_decodes_at_square_anchors():
    torch.manual_seed(0)
    model = DenseDetector("resnet18", num_classes=3, pretrained=False, fpn_channels=32, num_convs=1,
                          box_coder="anchor_deltas")
    images = torch.randn(2, 3, 64, 96, requires_grad=True)
    out = model(images)
    assert "pred_ltrb" not in out and out["pred_deltas"].shape == out["pred_boxes"].shape == (2, 129, 4)
    anchors = out["anchors"]
    sides = anchors[:, 2] - anchors[:, 0]
    assert anchors[0].tolist() == [-12.0, -12.0, 20.0, 20.0]  # cell (0, 0) of P3: centre (4, 4), side 32
    assert sides.unique().tolist() == [32.0, 64.0, 128.0, 256.0, 512.0]
    torch.testing.assert_close(sides, out["strides"] * 4)
    torch.testing.assert_close(out["pred_boxes"], delta_xywh_decode(anchors[None], out["pred_deltas"],
                                                                    stds=(1, 1, 1, 1), clamp_below=False))
    out["pred_boxes"].sum().backward()
    assert model.head.bbox_pred.weight.grad.abs().sum() > 0
    torch.nn.init.zeros_(model.head.bbox_pred.weight)
    torch.nn.init.zeros_(model.head.bbox_pred.bias)
    torch.testing.assert_close(model(images)["pred_boxes"][0], anchors)  # zero deltas give the anchors


def test_anchor_recipe_exports_to_onnx_with_dynamic_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from e2edet.export import export_onnx

    cfg = apply_overrides(get_recipe("anchor_mnv2_cpu"), [*TINY, "model.num_classes=3", "backbone=resnet18",
                                                          "model.fpn_channels=16"])  # the fastest to export
    cfg.model.class_names = ("a", "b", "c")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.nn.init.normal_(model.head.bbox_pred.bias, 0.0, 0.5)  # boxes away from the anchors
    # export_onnx compares onnxruntime with PyTorch at 64 x 96 and at 128 x 160 (dynamic height and width)
    assert export_onnx(model, cfg, tmp_path / "anchor.onnx", 64, 96).is_file()
