"""End-to-end diagnostics: greedy matching, duplicate rate, calibration (ECE), reliability diagram."""

from __future__ import annotations

import json

import numpy as np
import pytest

from e2edet.engine.diagnostics import (calibration, diagnostics, duplicate_stats, match_detections,
                                       plot_reliability)


def _ann(ann_id, image_id, cat, box, crowd=0):
    x, y, w, h = box
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
            "iscrowd": crowd}


def _det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


def _gt(anns, image_ids=(1, 2, 3)):
    return {"images": [{"id": i, "width": 200, "height": 200} for i in image_ids], "annotations": anns,
            "categories": [{"id": 1, "name": "cell"}, {"id": 5, "name": "blob"}]}


# Image 1: GT A (id 1) = [0,0,10,10] and GT B (id 2) = [4,0,10,10], both category 1 (xywh).
#   IoU([1,0,10,10], A) = 90/110 = 0.818, with B = 70/130 = 0.538
#   IoU([3,0,10,10], A) = 70/130 = 0.538, with B = 90/110 = 0.818
#   IoU([0,0,10,10], A) = 1,             with B = 60/140 = 0.429
GT_AB = [_ann(1, 1, 1, (0, 0, 10, 10)), _ann(2, 1, 1, (4, 0, 10, 10))]
BOX_HIGH, BOX_MID, BOX_LOW = (1, 0, 10, 10), (3, 0, 10, 10), (0, 0, 10, 10)


def test_greedy_matching_follows_score_order():
    # scores 0.9 / 0.85 / 0.8: HIGH takes A (0.818 > 0.538), MID takes B (A taken), LOW finds A taken and
    # B at 0.429 < 0.5 -> duplicate of A, although it has IoU 1 with A. Input order must not matter.
    dets = [_det(1, 1, BOX_LOW, 0.8), _det(1, 1, BOX_MID, 0.85), _det(1, 1, BOX_HIGH, 0.9)]
    m = match_detections(_gt(GT_AB), dets)
    assert m["is_tp"].tolist() == [False, True, True]
    assert m["matched_gt_id"].tolist() == [-1, 2, 1]
    assert m["is_duplicate"].tolist() == [True, False, False]
    np.testing.assert_allclose(m["best_iou"], [1.0, 90 / 110, 90 / 110])
    assert m["best_gt_id"].tolist() == [1, 2, 1]
    # LOW scored highest: it takes A, HIGH then takes B (0.538), MID overlaps only taken GTs -> duplicate
    dets = [_det(1, 1, BOX_LOW, 0.95), _det(1, 1, BOX_MID, 0.85), _det(1, 1, BOX_HIGH, 0.9)]
    m = match_detections(_gt(GT_AB), dets)
    assert m["matched_gt_id"].tolist() == [1, -1, 2]
    assert m["is_duplicate"].tolist() == [False, True, False]
    # MID first: both GTs are free, it takes the one with the higher IoU (B, 0.818), not the first listed (A)
    m = match_detections(_gt(GT_AB), [_det(1, 1, BOX_MID, 0.9), _det(1, 1, BOX_HIGH, 0.8)])
    assert m["matched_gt_id"].tolist() == [2, 1]
    # equal scores: the stable sort keeps the input order (the first of two identical boxes wins)
    m = match_detections(_gt(GT_AB), [_det(1, 1, BOX_LOW, 0.5), _det(1, 1, BOX_LOW, 0.5)])
    assert m["is_tp"].tolist() == [True, False] and m["is_duplicate"].tolist() == [False, True]


def test_matching_is_class_aware():
    # the same perfect box with category 5 neither matches A nor is a duplicate of it: a plain FP
    dets = [_det(1, 1, BOX_LOW, 0.9), _det(1, 5, BOX_LOW, 0.95)]
    m = match_detections(_gt(GT_AB), dets)
    assert m["is_tp"].tolist() == [True, False]
    assert m["is_duplicate"].tolist() == [False, False]
    assert m["best_iou"].tolist() == [1.0, 0.0] and m["best_gt_id"].tolist() == [1, -1]


# Image 2: GT C (id 3) = [20,20,20,20] (category 1).
DUP_DETS = [
    _det(2, 1, (20, 20, 20, 20), 0.9),  # TP on C
    _det(2, 1, (22, 20, 20, 20), 0.7),  # IoU 360/440 = 0.818 with C, C taken -> duplicate
    _det(2, 1, (50, 50, 10, 10), 0.6),  # no overlap -> plain FP
    _det(2, 1, (30, 20, 20, 20), 0.5),  # IoU 200/600 = 0.333 -> FP (localisation), not a duplicate
    _det(2, 1, (21, 21, 20, 20), 0.2),  # IoU 361/439 = 0.822 -> duplicate, but below conf_thresh 0.3
]


def test_duplicate_rate_by_hand():
    gt = _gt([_ann(3, 2, 1, (20, 20, 20, 20))])
    m = match_detections(gt, DUP_DETS)
    assert m["is_tp"].tolist() == [True, False, False, False, False]
    assert m["is_duplicate"].tolist() == [False, True, False, False, True]
    np.testing.assert_allclose(m["best_iou"], [1.0, 360 / 440, 0.0, 200 / 600, 361 / 439])
    # confident (score >= 0.3): 4 detections, 1 duplicate -> 25 %
    assert duplicate_stats(m) == {"duplicate_rate": 25.0, "num_confident": 4, "num_duplicates": 1}
    # with conf_thresh 0.1 the low-score duplicate counts: 2 of 5 -> 40 %
    assert duplicate_stats(m, conf_thresh=0.1) == {"duplicate_rate": 40.0, "num_confident": 5,
                                                   "num_duplicates": 2}
    assert duplicate_stats(m, conf_thresh=0.95)["duplicate_rate"] == 0.0  # no confident detection
    d = diagnostics(gt, DUP_DETS)
    assert (d["duplicate_rate"], d["num_confident"], d["num_duplicates"]) == (25.0, 4, 1)
    # at IoU 0.85 the second box (0.818) is no longer a duplicate but a localisation FP
    assert diagnostics(gt, DUP_DETS, iou_thresh=0.85)["num_duplicates"] == 0


def test_crowd_regions_are_ignored():
    # Image 3: crowd region (id 4, category 1) [0,0,100,100] and a normal GT (id 5) [10,10,20,20].
    gt = _gt([_ann(4, 3, 1, (0, 0, 100, 100), crowd=1), _ann(5, 3, 1, (10, 10, 20, 20))])
    dets = [
        _det(3, 1, (10, 10, 20, 20), 0.9),  # TP: normal GT first, although inside the crowd region
        _det(3, 1, (11, 10, 20, 20), 0.8),  # IoU 380/420 with the taken GT, but inside the crowd -> ignored
        _det(3, 1, (60, 60, 30, 30), 0.7),  # crowd IoU 900/900 = 1 (plain IoU 0.09) -> ignored
        _det(3, 1, (90, 90, 20, 20), 0.6),  # crowd IoU 100/400 = 0.25 -> FP
        _det(3, 5, (60, 60, 30, 30), 0.5),  # other class than the crowd region -> FP
    ]
    m = match_detections(gt, dets)
    assert m["is_tp"].tolist() == [True, False, False, False, False]
    assert m["is_ignored"].tolist() == [False, True, True, False, False]
    assert not m["is_duplicate"].any()
    d = diagnostics(gt, dets)
    # ignored ones leave every statistic: 3 confident (0.9, 0.6, 0.5), no duplicate;
    # ECE over 0.9 (TP), 0.6 (FP), 0.5 (FP) in three bins = (0.1 + 0.6 + 0.5) / 3 = 40 %
    assert (d["num_confident"], d["num_duplicates"], d["num_ignored"], d["num_detections"]) == (3, 0, 2, 5)
    assert d["ece"] == pytest.approx(40.0)
    assert sum(d["reliability"]["counts"]) == 3


def test_matches_pycocotools_at_iou_half():
    """Random scenes: TP and ignore flags equal pycocotools' dtMatches/dtIgnore at IoU 0.5, area 'all'."""
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    anns, dets = [], []
    for image_id in (1, 2, 3):
        for _ in range(6):
            xy, wh = rng.uniform(0, 120, 2), rng.uniform(8, 60, 2)
            anns.append(_ann(len(anns) + 1, image_id, int(rng.choice([1, 5])), (*xy, *wh),
                             crowd=int(rng.uniform() < 0.15)))
            for _ in range(4):  # jittered copies: TPs, duplicates, misses
                box = np.concatenate([xy + rng.normal(0, 6, 2), wh * rng.uniform(0.7, 1.3, 2)])
                cat = anns[-1]["category_id"] if rng.uniform() < 0.85 else 6 - anns[-1]["category_id"]
                dets.append(_det(image_id, cat, box.tolist(), float(rng.uniform())))
    gt = _gt(anns)
    m = match_detections(gt, dets)

    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(dets))), "bbox")
    ev.params.iouThrs = np.array([0.5])
    ev.evaluate()
    ref_tp, ref_ign = np.zeros(len(dets), bool), np.zeros(len(dets), bool)
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        for k, dt_id in enumerate(e["dtIds"]):  # loadRes numbers the detections 1..D in input order
            ref_tp[dt_id - 1] = e["dtMatches"][0, k] > 0 and not e["dtIgnore"][0, k]
            ref_ign[dt_id - 1] = e["dtIgnore"][0, k]
    assert 0 < ref_tp.sum() < len(dets) and ref_ign.any()  # the scene exercises all cases
    np.testing.assert_array_equal(m["is_tp"], ref_tp)
    np.testing.assert_array_equal(m["is_ignored"], ref_ign)
    # duplicates are exactly the non-TP, non-ignored detections overlapping a same-class GT at >= 0.5
    np.testing.assert_array_equal(m["is_duplicate"], ~m["is_tp"] & ~m["is_ignored"] & (m["best_iou"] >= 0.5))


def test_ece_by_hand():
    # bin 18 [0.90, 0.95): 0.91 TP, 0.93 TP -> conf 0.92, precision 1   -> |1 - 0.92| * 2/4 = 0.04
    # bin 4  [0.20, 0.25): 0.21 FP, 0.23 TP -> conf 0.22, precision 0.5 -> |0.5 - 0.22| * 2/4 = 0.14
    cal = calibration([0.91, 0.93, 0.21, 0.23], [True, True, False, True])
    assert cal["ece"] == pytest.approx(18.0)
    assert cal["counts"][18] == 2 and cal["counts"][4] == 2 and sum(cal["counts"]) == 4
    assert cal["confidences"][18] == pytest.approx(0.92) and cal["precisions"][4] == 0.5
    assert cal["confidences"][0] is None and cal["precisions"][0] is None  # empty bin -> JSON null
    assert len(cal["edges"]) == 21 and cal["edges"][0] == 0.0 and cal["edges"][-1] == 1.0
    assert calibration([], [])["ece"] == 0.0


def test_ece_synthetic():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=200_000)
    # calibrated: P(TP | s) = s -> ECE only sampling noise (about 0.4 %)
    assert calibration(scores, rng.uniform(size=scores.size) < scores)["ece"] < 1.0
    # P(TP | s) = s^2: ECE -> E|s - s^2| = 1/6 = 16.7 % (minus the within-bin spread, < 0.1 %)
    assert calibration(scores, rng.uniform(size=scores.size) < scores ** 2)["ece"] == pytest.approx(100 / 6, abs=0.5)


def test_always_confident_detector_has_ece_50():
    # 10 images, each with one GT; score 1.0 everywhere; one detection on the GT and one far away -> 50 % TP
    gt = _gt([_ann(i, i, 1, (10, 10, 30, 30)) for i in range(1, 11)], image_ids=range(1, 11))
    dets = [d for i in range(1, 11) for d in (_det(i, 1, (10, 10, 30, 30), 1.0), _det(i, 1, (150, 150, 20, 20), 1.0))]
    d = diagnostics(gt, dets)
    assert d["ece"] == pytest.approx(50.0)
    assert d["reliability"]["counts"][-1] == 20 and d["reliability"]["precisions"][-1] == 0.5
    assert d["duplicate_rate"] == 0.0 and d["num_confident"] == 20


def test_bin_edges():
    cal = calibration([1.0, 0.05, 0.0, 0.0499999, 0.95, float(np.float32(0.05))], [True] * 6)
    counts = cal["counts"]
    assert counts[19] == 2  # 1.0 (last bin is closed) and 0.95
    assert counts[1] == 2  # exactly 0.05 and float32(0.05) = 0.0500000007
    assert counts[0] == 2  # 0.0 and 0.0499999
    assert calibration([0.5], [True], num_bins=1)["ece"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration([1.2], [True])
    with pytest.raises(ValueError, match="TP flags"):
        calibration([0.2, 0.3], [True])
    with pytest.raises(ValueError, match="num_bins"):
        calibration([0.2], [True], num_bins=0)


def test_bad_detections_raise():
    gt = _gt(GT_AB)
    with pytest.raises(ValueError, match="image id 9"):
        match_detections(gt, [_det(9, 1, BOX_LOW, 0.5)])
    with pytest.raises(ValueError, match="category id 7"):
        match_detections(gt, [_det(1, 7, BOX_LOW, 0.5)])
    with pytest.raises(ValueError, match="lacks keys"):
        match_detections(gt, [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(ValueError, match="bbox"):
        match_detections(gt, [_det(1, 1, (0, 0, 1), 0.5)])
    with pytest.raises(ValueError, match="iou_thresh"):
        match_detections(gt, [], iou_thresh=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        diagnostics(gt, [_det(1, 1, BOX_LOW, 3.0)])
    empty = diagnostics(gt, [])
    assert (empty["duplicate_rate"], empty["ece"], empty["num_confident"]) == (0.0, 0.0, 0)


def test_plot_reliability_writes_png(tmp_path):
    from PIL import Image

    gt = _gt([_ann(3, 2, 1, (20, 20, 20, 20))])
    models = {"D-RMM": diagnostics(gt, DUP_DETS),
              "base": calibration([0.91, 0.93, 0.21, 0.23], [True, True, False, True]),
              "empty": diagnostics(gt, [])}
    out = plot_reliability(models, tmp_path / "sub" / "reliability.png", title="test")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    assert not list(out.parent.glob(".*tmp"))
    with pytest.raises(ValueError, match="at least one"):
        plot_reliability({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="lack"):
        plot_reliability({"bad": {"ece": 1.0}}, tmp_path / "x.png")
