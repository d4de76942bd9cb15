"""Paired bootstrap of the AP difference: full-set APs agree with the evaluator, a resample counts a drawn image as
often as it is drawn (checked with pycocotools on an explicitly duplicated dataset), and the interval's behaviour."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from e2edet.engine.bootstrap import paired_bootstrap_ap
from e2edet.engine.evaluator import CocoEvaluator, evaluate, format_results_table
from tests.test_evaluator import _FixedDetector, _postprocess, _pycocotools_stats

CATS = [{"id": 1, "name": "tree"}]


def _dataset(num_images: int = 6, seed: int = 0):
    """``num_images`` 100x100 images with 2-5 boxes each. Column a finds every box with a small error. Column b
    keeps those detections except the first box's, and adds for every even-numbered box (the first included) a copy
    shifted by 3 px at half the score: a duplicate, or for the first box a worse detection than column a's."""
    rng = np.random.default_rng(seed)
    images, anns, dets_a, dets_b = [], [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 100, "height": 100})
        for k in range(int(rng.integers(2, 6))):
            x, y, w, h = (float(v) for v in (*rng.uniform(0, 60, 2), *rng.uniform(10, 35, 2)))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            score = float(rng.uniform(0.3, 1.0))
            jitter = [x + float(rng.normal(0, 1.5)), y + float(rng.normal(0, 1.5)), w, h]
            det = {"image_id": image_id, "category_id": 1, "bbox": jitter, "score": score}
            dets_a.append(det)
            if k > 0:
                dets_b.append(det)
            if k % 2 == 0:
                dets_b.append({**det, "bbox": [jitter[0] + 3, jitter[1] + 3, w, h], "score": score * 0.5})
    gt = {"images": images, "annotations": anns, "categories": CATS}
    return gt, dets_a, dets_b


def _evaluator_ap(gt, dets) -> float:
    ev = CocoEvaluator(gt, [1])
    for image in gt["images"]:
        rows = [d for d in dets if d["image_id"] == image["id"]]
        xywh = torch.tensor([d["bbox"] for d in rows], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        ev.update([image["id"]], [{"boxes": boxes, "scores": torch.tensor([d["score"] for d in rows]),
                                   "labels": torch.zeros(len(rows), dtype=torch.long)}])
    return ev.summarize()["AP"]


def test_full_set_aps_match_the_evaluator():
    gt, dets_a, dets_b = _dataset()
    out = paired_bootstrap_ap(gt, dets_a, dets_b, num_samples=20, seed=3)
    assert out["a"] == pytest.approx(_evaluator_ap(gt, dets_a), abs=1e-4)
    assert out["b"] == pytest.approx(_evaluator_ap(gt, dets_b), abs=1e-4)
    assert out["difference"] == pytest.approx(out["a"] - out["b"])
    assert out["a"] > out["b"]  # the duplicates and misses cost column b
    assert out["num_images"] == 6 and out["num_samples"] == 20 and out["seed"] == 3


def test_a_resample_counts_each_drawn_image_as_often_as_drawn():
    """One resample, redrawn here as the docstring says (``default_rng(seed).integers(0, n, n)``), evaluated by
    pycocotools on a dataset where every drawn copy is a separate image."""
    gt, dets_a, dets_b = _dataset(num_images=5, seed=1)
    seed = 11
    draw = np.random.default_rng(seed).integers(0, 5, 5)
    assert len(set(draw.tolist())) < 5  # the draw repeats an image: the case under test
    images, anns, cols = [], [], ([], [])
    for new_id, index in enumerate(draw.tolist(), start=1):
        image_id = gt["images"][index]["id"]
        images.append({**gt["images"][index], "id": new_id})
        for ann in gt["annotations"]:
            if ann["image_id"] == image_id:
                anns.append({**ann, "id": len(anns) + 1, "image_id": new_id})
        for col, dets in zip(cols, (dets_a, dets_b)):
            col += [{**d, "image_id": new_id} for d in dets if d["image_id"] == image_id]
    dup = {"images": images, "annotations": anns, "categories": CATS}
    expected = 100 * (_pycocotools_stats(dup, cols[0])[0] - _pycocotools_stats(dup, cols[1])[0])
    out = paired_bootstrap_ap(gt, dets_a, dets_b, num_samples=1, seed=seed)
    assert out["mean"] == pytest.approx(expected, abs=1e-4)
    assert out["ci"][0] == pytest.approx(expected, abs=1e-4) == pytest.approx(out["ci"][1], abs=1e-4)


def test_identical_columns_give_a_zero_interval_and_the_seed_repeats():
    gt, dets_a, _ = _dataset()
    out = paired_bootstrap_ap(gt, dets_a, copy.deepcopy(dets_a), num_samples=15, seed=0)
    assert out["difference"] == 0.0 and out["ci"] == [0.0, 0.0] and out["share_a_ge_b"] == 1.0
    _, _, dets_b = _dataset()
    first = paired_bootstrap_ap(gt, dets_a, dets_b, num_samples=15, seed=5)
    assert paired_bootstrap_ap(gt, dets_a, dets_b, num_samples=15, seed=5) == first
    assert first["ci"][0] <= first["mean"] <= first["ci"][1]


def test_a_consistently_better_column_has_an_interval_above_zero():
    gt, dets_a, dets_b = _dataset(num_images=8, seed=2)
    out = paired_bootstrap_ap(gt, dets_a, dets_b, num_samples=40, seed=0)
    assert out["ci"][0] > 0 and out["share_a_ge_b"] == 1.0


def test_bad_arguments():
    gt, dets_a, dets_b = _dataset()
    with pytest.raises(ValueError, match="num_samples"):
        paired_bootstrap_ap(gt, dets_a, dets_b, num_samples=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ap(gt, dets_a, dets_b, confidence=1.0)
    with pytest.raises(ValueError, match=r"image ids \[99\]"):
        paired_bootstrap_ap(gt, dets_a, dets_b, image_ids=[1, 99])
    with pytest.raises(ValueError, match=r"detections_b: detections of image ids \[4, 5, 6\]"):
        paired_bootstrap_ap(gt, dets_a[:1], dets_b, image_ids=[1, 2, 3])


def test_evaluate_reports_the_interval_in_its_results_and_table():
    gt = {"images": [{"id": 7, "width": 64, "height": 64}, {"id": 8, "width": 64, "height": 64}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 8, "category_id": 1, "bbox": [20, 20, 30, 30], "area": 900,
                           "iscrowd": 0}],
          "categories": CATS}
    table = {7: [(5, 5, 25, 25, 0.9, 0), (6, 6, 26, 26, 0.85, 0)], 8: [(10, 10, 25, 25, 0.8, 0)]}
    loader = [(torch.full((1, 3, 32, 32), float(i)), [{"image_id": i, "size": torch.tensor([32, 32]),
                                            "orig_size": torch.tensor([64, 64])}]) for i in (7, 8)]
    res = evaluate(_FixedDetector(table), _postprocess, loader, "cpu", gt, [1], nms_iou=0.6, progress=False,
                   bootstrap=10)
    boot = res["bootstrap"]
    assert boot["a"] == pytest.approx(res["no_nms"]["AP"], abs=1e-4)
    assert boot["b"] == pytest.approx(res["nms"]["AP"], abs=1e-4)
    assert boot["num_samples"] == 10 and boot["num_images"] == 2 and boot["ci"][1] <= 0
    assert "AP no NMS - NMS 0.6: " in format_results_table(res)
    assert "bootstrap" not in evaluate(_FixedDetector(table), _postprocess, loader, "cpu", gt, [1], progress=False)
