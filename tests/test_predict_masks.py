"""Prediction with an instance-segmentation model: masks in the predictor's results, drawn in the pictures, and
written as RLE into the COCO results."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from e2edet.build import build_model
from e2edet.config import apply_overrides
from e2edet.engine.coco_utils import encode_masks
from e2edet.inference import Predictor
from e2edet.inference.outputs import coco_results, draw_detections
from e2edet.recipes import get_recipe


def _det(height=40, width=60):
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 5:height // 2, 5:width // 2] = True
    masks[1, height // 2 + 5 : height - 5, width // 2 + 5 : width - 5] = True
    boxes = torch.tensor([[5.0, 5.0, width // 2, height // 2],
                          [width // 2 + 5, height // 2 + 5, width - 5, height - 5]], dtype=torch.float32)
    return {"boxes": boxes, "scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([0, 0]), "masks": masks}


def test_draw_detections_fills_the_masks():
    image = torch.full((3, 160, 200), 128, dtype=torch.uint8)
    det = _det(160, 200)
    drawn = draw_detections(image, det, ["nucleus"], score_thresh=0.5)
    inside, other = (60, 70), (120, 150)  # (y, x): in the kept mask below its caption; in the mask under the threshold
    assert not torch.equal(drawn[:, inside[0], inside[1]], image[:, inside[0], inside[1]])
    assert torch.equal(drawn[:, other[0], other[1]], image[:, other[0], other[1]])
    boxes_only = draw_detections(image, {k: v for k, v in det.items() if k != "masks"}, ["nucleus"], 0.5)
    assert torch.equal(boxes_only[:, inside[0], inside[1]], image[:, inside[0], inside[1]])


def test_coco_results_carry_rle_segmentations():
    det = _det()
    results, _ = coco_results([("a.png", 40, 60, det)], ["nucleus"])
    assert [r["segmentation"] for r in results] == encode_masks(det["masks"])
    pre_encoded, _ = coco_results([("a.png", 40, 60, {**{k: v for k, v in det.items() if k != "masks"},
                                                      "rles": encode_masks(det["masks"])})], ["nucleus"])
    assert pre_encoded == results
    assert "segmentation" not in coco_results([("a.png", 40, 60, {k: v for k, v in det.items() if k != "masks"})],
                                              ["nucleus"])[0][0]


def test_predictor_returns_and_writes_masks(tmp_path):
    torch.manual_seed(0)
    cfg = apply_overrides(get_recipe("o2f_condinst_mnv2_cpu"), [
        "model.pretrained=false", "model.fpn_channels=32", "model.num_convs=1", "model.mask_channels=16",
        "model.mask_convs=1", "data.test_min_size=64", "data.test_max_size=96", "test.score_thresh=0.0"])
    cfg.model.num_classes, cfg.model.class_names = 1, ("nucleus",)
    predictor = Predictor(build_model(cfg), cfg, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    det = predictor(image)[0]
    assert det["masks"].dtype == torch.bool and det["masks"].shape == (len(det["scores"]), 50, 70)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = predictor.predict_files([tmp_path / "a.png"], tmp_path / "pred", score_thresh=0.0, coco_json=True)
    results = json.loads((out.parent / "results.json").read_text())
    assert len(results) == len(det["scores"]) and all(r["segmentation"]["size"] == [50, 70] for r in results)
    assert (tmp_path / "pred" / "a.png").is_file()
