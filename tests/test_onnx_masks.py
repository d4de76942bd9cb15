"""ONNX export of an instance-segmentation recipe (O2F CondInst): the ``masks`` output, its metadata, and
`e2edet predict model.onnx` giving the PyTorch predictor's detections *and masks* on a non-square real image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from e2edet.build import build_model
from e2edet.cli import main
from e2edet.config import apply_overrides, to_dict
from e2edet.engine.checkpoint import save_checkpoint
from e2edet.export import compare_detections, compare_masks
from e2edet.inference import OnnxPredictor, Predictor, read_image
from e2edet.recipes import get_recipe
from tests.conftest import TINY

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

CLASSES = ["Platelets", "RBC", "WBC"]


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    """An untrained O2F CondInst run (scores and mask logits spread by random biases) exported at 256x256."""
    cfg = apply_overrides(get_recipe("o2f_condinst_mnv2_cpu"),
                          [*TINY, "model.mask_channels=16", "model.mask_convs=1", "model.num_classes=3"])
    cfg.model.class_names = tuple(CLASSES)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.nn.init.normal_(model.head.cls_score.bias, 0.0, 1.5)
    run = tmp_path_factory.mktemp("mask_run")
    save_checkpoint(run, "best", model, None, None, {}, to_dict(cfg))
    assert main(["export", str(run), "--out", str(run / "m.onnx"), "--size", "256"]) == 0  # checks masks too
    return run


def test_the_graph_has_a_masks_output_and_its_metadata(mask_run):
    proto = onnx.load(str(mask_run / "m.onnx"))
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels", "masks"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.output[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2:] == ["mask_height", "mask_width"]
    m = OnnxPredictor(mask_run / "m.onnx").metadata
    assert m["score"] == "cls_ctr_cls_thresh" and m["outputs"] == ["boxes", "scores", "labels", "masks"]
    # the graph zeroes the scores whose cls probability is <= test.score_thresh: the runtime keeps scores > 0
    assert m["postprocess"] == {"score_thresh": 0.0, "clip": True, "masks": {"stride": 4, "threshold": 0.5}}


def test_onnx_masks_equal_pytorch_on_a_non_square_real_image(mask_run, bccd_root, tmp_path):
    image_file = bccd_root / "JPEGImages" / "BloodImage_00000.jpg"
    image = read_image(image_file)  # 480 x 640, resized to 192 x 256
    ref = Predictor.from_weights(mask_run, device="cpu")(image)[0]
    got = OnnxPredictor(mask_run / "m.onnx")(image)[0]
    assert 0 < len(got["scores"]) == len(ref["scores"]) <= 100
    assert compare_detections(*[(d["boxes"][None], d["scores"][None], d["labels"][None]) for d in (ref, got)]) == []
    assert got["masks"].shape == ref["masks"].shape == (len(ref["scores"]), 480, 640)
    assert ref["masks"].any() and not ref["masks"].all()  # the check below compares real masks
    compared = 0
    for i in range(len(ref["scores"])):  # same detection at the same index (tied scores may swap)
        if ref["labels"][i] == got["labels"][i] and abs(ref["scores"][i] - got["scores"][i]) < 1e-5:
            differ = (ref["masks"][i] != got["masks"][i]).float().mean().item()
            assert differ <= 1e-3, (i, differ)  # only pixels whose probability rounds across 0.5
            compared += 1
    assert compared >= len(ref["scores"]) // 2

    assert main(["predict", str(mask_run / "m.onnx"), str(image_file), "--out", str(tmp_path / "onnx"),
                 "--score", "0.0", "--coco-json"]) == 0
    results = json.loads((tmp_path / "onnx" / "results.json").read_text())
    assert len(results) == len(got["scores"]) and all(r["segmentation"]["size"] == [480, 640] for r in results)
    assert (tmp_path / "onnx" / "BloodImage_00000.png").is_file()


def test_compare_masks_names_the_detection_that_differs():
    boxes = np.array([[[0, 0, 10, 10], [5, 5, 20, 20]]], np.float32)
    scores, labels = np.array([[0.9, 0.5]], np.float32), np.array([[1, 2]])
    masks = np.random.default_rng(0).random((1, 2, 8, 8)).astype(np.float32)
    ref = [boxes, scores, labels, masks]
    assert compare_masks(ref, [boxes, scores, labels, masks + 1e-4]) == []
    other = masks.copy()
    other[0, 1, 3, 3] += 0.5
    assert compare_masks(ref, [boxes, scores, labels, other]) == ["image 0: mask of detection 1 differs by 0.5 "
                                                                  "(tolerance 0.001)"]
    swapped = [boxes[:, ::-1], scores[:, ::-1], labels[:, ::-1], masks[:, ::-1]]  # order of ties: no difference
    assert compare_masks(ref, swapped) == []
    assert "detection 0 differs" in compare_masks(ref, [boxes[:, ::-1], scores[:, ::-1], labels[:, ::-1], masks])[0]
    assert "shapes differ" in compare_masks(ref, [boxes, scores, labels, masks[:, :1]])[0]
