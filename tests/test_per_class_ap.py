"""Per-class AP/AP50 from COCO's precision arrays (exact hand-built cases, pycocotools), the per-class table and
the precision-recall PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from e2edet.engine.diagnostics import plot_pr_curves
from e2edet.engine.evaluator import CocoEvaluator, format_per_class_table, format_results_table, per_class_ap

PNG = b"\x89PNG\r\n\x1a\n"


def _ann(ann_id, image_id, cat, box, crowd=0):
    x, y, w, h = box
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
            "iscrowd": crowd}


def _pred(rows):
    """rows of (x1, y1, x2, y2, score, label) -> post-processor dict."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"boxes": t[:, :4], "scores": t[:, 4], "labels": t[:, 5].long()}


# labels 0..3 -> category ids 11, 3, 9, 7 (non-contiguous and not sorted, so label order != id order)
LABEL_TO_CAT = [11, 3, 9, 7]
EXACT_GT = {
    "images": [{"id": i, "width": 300, "height": 300} for i in (1, 2)],
    "annotations": [_ann(1, 1, 3, (0, 0, 50, 50)), _ann(2, 2, 3, (100, 100, 50, 50)),  # "ant": 2 boxes
                    _ann(3, 1, 7, (100, 0, 100, 100)),  # "bee": 1 box
                    _ann(4, 2, 11, (0, 200, 40, 40)),  # "fly": 1 box, never detected
                    _ann(5, 2, 3, (200, 200, 60, 60), crowd=1)],  # crowd region: not counted
    "categories": [{"id": 3, "name": "ant"}, {"id": 7, "name": "bee"}, {"id": 9, "name": "moth"},
                   {"id": 11, "name": "fly"}],  # "moth" has no ground truth
}
# ant: exact TP (0.9), FP (0.8), exact TP (0.7) -> precision 1 up to recall 0.5, then 2/3 up to recall 1; COCO's
# 101-point AP = (51 * 1 + 50 * 2/3) / 101 at every IoU threshold. bee: one box of IoU 6200/10000 = 0.62, a TP at
# the thresholds 0.50, 0.55, 0.60 only -> AP50 100, AP 30.
EXACT_DETS = {1: [(0, 0, 50, 50, 0.9, 1), (200, 0, 250, 50, 0.8, 1), (100, 0, 200, 62, 0.6, 3)],
              2: [(100, 100, 150, 150, 0.7, 1)]}
ANT_AP = 100.0 * (51 + 50 * 2 / 3) / 101


def _evaluator(gt, dets, label_to_cat=LABEL_TO_CAT):
    ev = CocoEvaluator(gt, label_to_cat)
    for image_id, rows in dets.items():
        ev.update([image_id], [_pred(rows)])
    return ev


def test_per_class_ap_exact_values_and_order():
    ev = _evaluator(EXACT_GT, EXACT_DETS)
    metrics = ev.summarize()
    rows = per_class_ap(ev.pr_curves())
    assert [(r["name"], r["category_id"], r["num_gt"]) for r in rows] == [
        ("fly", 11, 1), ("ant", 3, 2), ("moth", 9, 0), ("bee", 7, 1)]  # label order, crowd box not counted
    by_name = {r["name"]: r for r in rows}
    assert by_name["ant"]["AP"] == pytest.approx(ANT_AP) and by_name["ant"]["AP50"] == pytest.approx(ANT_AP)
    assert by_name["bee"]["AP"] == pytest.approx(30.0) and by_name["bee"]["AP50"] == pytest.approx(100.0)
    assert (by_name["fly"]["AP"], by_name["fly"]["AP50"]) == (0.0, 0.0)
    assert (by_name["moth"]["AP"], by_name["moth"]["AP50"]) == (None, None)
    # COCO's AP is the mean over the classes with ground truth
    assert metrics["AP"] == pytest.approx((ANT_AP + 30.0 + 0.0) / 3)
    assert metrics["AP50"] == pytest.approx((ANT_AP + 100.0 + 0.0) / 3)
    curves = ev.pr_curves()
    assert curves["precision"].shape == (10, 101, 4) and (curves["precision"][:, :, 2] == -1).all()


def test_per_class_without_detections_and_before_summarize():
    ev = CocoEvaluator(EXACT_GT, LABEL_TO_CAT)
    with pytest.raises(RuntimeError, match="summarize"):
        ev.pr_curves()
    assert ev.summarize()["AP"] == 0.0
    assert [(r["AP"], r["AP50"]) for r in per_class_ap(ev.pr_curves())] == [
        (0.0, 0.0), (0.0, 0.0), (None, None), (0.0, 0.0)]
    ev.update([1], [_pred(EXACT_DETS[1])])  # new detections invalidate the curves of the last summarize
    with pytest.raises(RuntimeError, match="summarize"):
        ev.pr_curves()


def test_per_class_ap_matches_pycocotools():
    """Random (seeded) boxes, 3 classes, 12 images: jittered GT copies, misses and false positives."""
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    images, anns, preds = [], [], {}
    for image_id in range(1, 13):
        images.append({"id": image_id, "width": 400, "height": 300})
        rows = []
        for _ in range(rng.integers(0, 6)):
            cat = int(rng.integers(1, 4))
            x, y = rng.uniform(0, 300), rng.uniform(0, 200)
            w, h = rng.uniform(8, 100), rng.uniform(8, 100)
            anns.append(_ann(len(anns) + 1, image_id, cat, (x, y, w, h), crowd=int(rng.random() < 0.05)))
            if rng.random() < 0.8:  # detected, with a jitter of up to 20 % of the size
                j = rng.uniform(-0.2, 0.2, 4) * [w, h, w, h]
                rows.append((x + j[0], y + j[1], x + w + j[2], y + h + j[3], rng.random(), cat - 1))
        for _ in range(rng.integers(0, 4)):  # false positives, some with the wrong class
            x, y = rng.uniform(0, 300), rng.uniform(0, 200)
            rows.append((x, y, x + rng.uniform(8, 90), y + rng.uniform(8, 90), rng.random(), int(rng.integers(0, 3))))
        preds[image_id] = rows
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": n} for c, n in ((1, "rbc"), (2, "wbc"), (3, "platelets"))]}
    ev = _evaluator(gt, {i: r for i, r in preds.items() if r}, label_to_cat=[1, 2, 3])
    ev.summarize()
    ours = per_class_ap(ev.pr_curves())

    ref_gt = COCO()
    ref_gt.dataset = json.loads(json.dumps(gt))
    ref_gt.createIndex()
    ref = COCOeval(ref_gt, ref_gt.loadRes(ev.detections()), "bbox")
    ref.params.imgIds = sorted(i["id"] for i in images)
    ref.evaluate()
    ref.accumulate()
    precision = ref.eval["precision"]  # [T, R, K, A, M]; detectron2's per-category AP
    assert len(ours) == 3 and all(0 < r["AP"] < r["AP50"] < 100 for r in ours)
    for k, row in enumerate(ours):
        assert ref.params.catIds[k] == row["category_id"]
        for value, p in ((row["AP"], precision[:, :, k, 0, -1]), (row["AP50"], precision[0, :, k, 0, -1])):
            assert value == pytest.approx(100.0 * p[p > -1].mean(), abs=1e-6)


def test_per_class_table():
    ev = _evaluator(EXACT_GT, EXACT_DETS)
    plain = ev.summarize()
    rows = per_class_ap(ev.pr_curves())
    results = {"no_nms": plain, "nms": plain, "nms_iou": 0.5, "per_class": {"no_nms": rows, "nms": rows[:2]}}
    lines = format_per_class_table(results).splitlines()
    assert lines[0].split() == ["no", "NMS", "NMS", "0.5"]
    assert lines[1].split() == ["class", "GT", "AP", "AP50", "AP", "AP50"]
    cells = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert cells["ant"] == ["2", "83.5", "83.5", "83.5", "83.5"]
    assert cells["bee"] == ["1", "30.0", "100.0", "-", "-"]  # absent from the NMS rows
    assert cells["moth"] == ["0", "-", "-", "-", "-"]
    full = format_results_table(results)
    assert full.startswith(format_results_table(results, per_class=False)) and full.endswith("\n".join(lines))
    single = {**results, "per_class": {"no_nms": rows[:1], "nms": rows[:1]}}  # one class: no extra table
    assert format_results_table(single) == format_results_table(single, per_class=False)
    assert format_per_class_table({"no_nms": plain}) == ""


def test_plot_pr_curves(tmp_path):
    ev = _evaluator(EXACT_GT, EXACT_DETS)
    ev.summarize()
    curves = ev.pr_curves()
    out = plot_pr_curves({"no NMS": curves, "NMS 0.6": curves}, tmp_path / "sub" / "pr_curve.png", title="t")
    assert out.read_bytes()[:8] == PNG and sorted(p.name for p in out.parent.iterdir()) == ["pr_curve.png"]
    many = {**curves, "precision": np.repeat(curves["precision"][:, :, :1], 25, axis=2), "names": list("abcdefghij"
            "klmnopqrstuvwxy")}  # > 20 classes: grey lines without a legend entry each
    assert plot_pr_curves({"m": many}, tmp_path / "many.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="at least one model"):
        plot_pr_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="lack \\['recall'\\]"):
        plot_pr_curves({"m": {k: v for k, v in curves.items() if k != "recall"}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        plot_pr_curves({"m": {**curves, "names": ["a"]}}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
