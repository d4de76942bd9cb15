"""ONNX export of the query-based detectors (Sparse R-CNN, D-RMM + Sparse R-CNN, AdaMixer): the graph keeps a dynamic
batch axis. :func:`e2edet.export.export_onnx` checks every file on one image and on a batch of two with different
``image_sizes`` (a traced ``unbind`` of the RoI boxes once fixed Sparse R-CNN graphs to the traced batch of one)."""

from __future__ import annotations

import pytest
import torch

from e2edet.build import build_model
from e2edet.config import apply_overrides
from e2edet.export import EndToEndDetector, compare_detections, export_onnx
from e2edet.recipes import get_recipe

TINY = ["model.pretrained=false", "model.num_classes=3", "model.num_queries=10", "model.num_stages=2",
        "model.dim_feedforward=64"]


@pytest.mark.parametrize("name", ["sparse_rcnn_mnv2_cpu", "drmm_sparse_rcnn_mnv2_cpu", "adamixer_mnv2_cpu"])
def test_query_graph_runs_any_batch(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg = apply_overrides(get_recipe(name), TINY)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = export_onnx(model, cfg, tmp_path / "q.onnx", 96, 128)  # raises if a batch of 2 differs or fails
    images = torch.randn(3, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[96, 128], [64, 100], [80, 96]])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy(), "image_sizes": sizes.numpy()})
    with torch.no_grad():
        ref = EndToEndDetector(model, cfg.test.score, cfg.test.max_detections)(images, sizes)
    assert got[0].shape[0] == 3 and compare_detections(ref, tuple(got)) == []
