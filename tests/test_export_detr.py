"""ONNX export of Deformable DETR (plain, refine, two-stage, ++; MS-DETR's layer order, with SQR) through
:func:`e2edet.export.export_onnx`: one graph with the top-k post-processing and no NMS node, the deformable
attention core as ``GridSample`` (opset >= 16); the batch stays dynamic and onnxruntime's detections match
PyTorch's as sets (:func:`compare_detections`)."""

from __future__ import annotations

import pytest
import torch

from e2edet.build import build_model
from e2edet.config import apply_overrides
from e2edet.export import EndToEndDetector, compare_detections, export_onnx
from e2edet.recipes import get_recipe

#: A tiny model of each variant's CPU recipe (the variant's switches kept, sizes shrunk).
TINY = ["model.pretrained=false", "model.num_classes=3", "model.fpn_channels=64", "model.num_queries=20",
        "model.dim_feedforward=128", "model.enc_layers=2", "model.dec_layers=2"]
RECIPES = ["deformable_detr_mnv2_cpu", "deformable_detr_refine_mnv2_cpu", "deformable_detr_two_stage_mnv2_cpu",
           "deformable_detr_pp_mnv2_cpu", "ms_detr_pp_mnv2_cpu", "sqr_ms_detr_refine_mnv2_cpu"]


@pytest.mark.parametrize("name", RECIPES)
def test_deformable_detr_exports_and_matches_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    cfg = apply_overrides(get_recipe(name), TINY)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.backbone.name == "mobilenet_v2" and model.two_stage == cfg.model.two_stage
    path = export_onnx(model, cfg, tmp_path / "m.onnx", 96, 128)  # checks itself on a random batch of one

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "GridSample" in ops and "NonMaxSuppression" not in ops and "TopK" in ops

    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))  # another batch size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"images": images.numpy()})
    k = min(cfg.test.max_detections, cfg.model.num_queries * 3)  # every (query, class) pair of 20 queries x 3
    assert boxes.shape == (2, k, 4) and scores.shape == (2, k) and labels.shape == (2, k)
    with torch.no_grad():
        ref = EndToEndDetector(model, cfg.test.score, cfg.test.max_detections)(images)
    assert compare_detections(ref, (boxes, scores, labels)) == []
    assert torch.allclose(torch.from_numpy(scores), ref[1], atol=1e-5)  # sorted scores agree position by position
    assert (scores[:, :-1] >= scores[:, 1:]).all() and ((labels >= 0) & (labels < 3)).all()
    assert (boxes[..., 2:] >= boxes[..., :2]).all()  # xyxy (DETR does not clip boxes to the image)
