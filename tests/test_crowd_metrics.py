"""CrowdHuman AP50 / mMR / recall: hand-computed examples and a loop reference on random data."""

import json
import math
import random

import numpy as np
import pytest
from faster_coco_eval import COCO

from e2edet.engine.crowd_metrics import (
    CALTECH_FPPI_REFS,
    average_precision,
    clip_boxes,
    crowd_curves,
    crowd_metrics,
    log_average_miss_rate,
    match_image,
)


def make_gt(images, anns, categories=(1,)):
    """images: {id: (w, h)}; anns: (image_id, [x, y, w, h], iscrowd[, category_id])."""
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i, (w, h) in images.items()],
        "annotations": [
            {"id": k + 1, "image_id": a[0], "bbox": a[1], "area": a[1][2] * a[1][3], "iscrowd": a[2],
             "category_id": a[3] if len(a) > 3 else 1}
            for k, a in enumerate(anns)
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
    }


def det(image_id, bbox, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


# 4 images of 100 x 100. Normal GTs A, B (image 1), C (image 2), D (image 3): G = 4; ignore region R in
# image 1; image 4 has neither GT nor detections but counts for FPPI: N = 4.
HAND_GT = make_gt(
    {1: (100, 100), 2: (100, 100), 3: (100, 100), 4: (100, 100)},
    [(1, [0, 0, 10, 10], 0), (1, [20, 0, 10, 10], 0), (1, [50, 50, 40, 40], 1),
     (2, [0, 0, 20, 20], 0), (3, [60, 60, 10, 10], 0)],
)
HAND_DETS = [
    det(1, [0, 0, 10, 10], 0.9),     # TP (A, IoU 1)
    det(1, [60, 60, 10, 10], 0.8),   # inside R: IoA 1 -> ignored
    det(2, [40, 40, 10, 10], 0.7),   # FP (touches nothing)
    det(1, [70, 70, 15, 15], 0.65),  # inside R again -> ignored (ignore regions are never used up)
    det(1, [1, 0, 10, 10], 0.6),     # FP: duplicate of A, which is taken; IoU with B is 0
    det(2, [0, 0, 20, 20], 0.5),     # TP (C)
    det(1, [22, 0, 10, 10], 0.4),    # TP (B, IoU 80 / 120 = 0.667)
    det(2, [80, 0, 10, 10], 0.3),    # FP
    det(3, [0, 80, 10, 10], 0.25),   # FP
    det(3, [60, 60, 10, 10], 0.2),   # TP (D)
]
# Pooled curve without the 2 ignored detections (k: TP FP -> recall, precision, FPPI = FP / 4, miss rate):
#   1: 1 0 -> 1/4 1   0    3/4     5: 3 2 -> 3/4 3/5 1/2 1/4
#   2: 1 1 -> 1/4 1/2 1/4 3/4     6: 3 3 -> 3/4 1/2 3/4 1/4
#   3: 1 2 -> 1/4 1/3 1/2 3/4     7: 3 4 -> 3/4 3/7 1   1/4
#   4: 2 2 -> 1/2 1/2 1/2 1/2     8: 4 4 -> 1   1/2 1   0
# AP (trapezoids between consecutive points, none before point 1):
#   (1/2-1/4)(1/3+1/2)/2 + (3/4-1/2)(1/2+3/5)/2 + (1-3/4)(3/7+1/2)/2 = 5/48 + 11/80 + 13/112 = 601/1680
# mMR (miss rate of the first point with FPPI >= ref): refs 0.01 .. 0.1778 -> point 2 (3/4), 0.3162 -> point 3
#   (3/4), 0.5623 -> point 6 (1/4), 1.0 -> point 7 (1/4): mMR = (0.75^7 * 0.25^2)^(1/9) = 0.587536...
#   (the Caltech MATLAB rule "last point with FPPI <= ref" would take point 8 at ref 1.0: miss rate 0).
# Recall = 4 / 4.
HAND_AP50 = 100 * 601 / 1680
HAND_MMR = 100 * (0.75**7 * 0.25**2) ** (1 / 9)


def test_hand_computed_example():
    result = crowd_metrics(HAND_GT, HAND_DETS)
    assert result["AP50"] == pytest.approx(HAND_AP50, abs=1e-6)
    assert result["mMR"] == pytest.approx(HAND_MMR, abs=1e-6)
    assert result["recall"] == pytest.approx(100.0, abs=1e-6)
    assert HAND_MMR == pytest.approx(58.7536, abs=1e-4)


def test_accepts_path_and_coco_object(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(HAND_GT))
    expected = crowd_metrics(HAND_GT, HAND_DETS)
    assert crowd_metrics(path, HAND_DETS) == expected
    assert crowd_metrics(str(path), HAND_DETS) == expected
    assert crowd_metrics(COCO(str(path)), HAND_DETS) == expected


def test_perfect_detector():
    gt = make_gt({1: (50, 40), 2: (50, 40)},
                 [(1, [0, 0, 10, 10], 0), (1, [20, 5, 10, 20], 0), (1, [30, 0, 20, 20], 1),
                  (2, [0, 0, 10, 10], 0), (2, [5, 5, 30, 30], 0), (2, [40, 30, 10, 10], 0)])
    dets = [det(a["image_id"], a["bbox"], 0.9 - 0.1 * k) for k, a in enumerate(gt["annotations"]) if not a["iscrowd"]]
    result = crowd_metrics(gt, dets)
    # 5 TPs, precision 1: the official trapezoid rule starts at recall 1/5, so AP50 = 100 * (1 - 1/5)
    assert result["AP50"] == pytest.approx(80.0, abs=1e-6)
    # FPPI stays 0 < every ref -> last point, miss rate 0; no floor in the log -> mMR 0 exactly
    assert result["mMR"] == 0.0
    assert result["recall"] == pytest.approx(100.0, abs=1e-6)


def test_no_detections_and_only_ignored_detections():
    assert crowd_metrics(HAND_GT, []) == {"AP50": 0.0, "mMR": 100.0, "recall": 0.0}
    ignored = [det(1, [60, 60, 10, 10], 0.9), det(1, [50, 50, 40, 40], 0.8)]
    assert crowd_metrics(HAND_GT, ignored) == {"AP50": 0.0, "mMR": 100.0, "recall": 0.0}


def test_boxes_are_clipped_to_the_image():
    gt = make_gt({1: (20, 20)}, [(1, [0, 0, 5, 5], 0)])
    # [-5, -5, 10, 10] -> xyxy [-5, -5, 5, 5], clipped to [0, 0, 5, 5]: IoU 1 (0.25 without clipping)
    result = crowd_metrics(gt, [det(1, [-5, -5, 10, 10], 0.9)])
    assert result["recall"] == pytest.approx(100.0)
    np.testing.assert_allclose(clip_boxes(np.array([[-5, -5, 30, 30], [25, 25, 40, 40]]), 20, 10),
                               [[0, 0, 20, 10], [19, 9, 20, 10]])


def test_class_aware_matching_pooled_over_categories():
    gt = make_gt({1: (100, 100)}, [(1, [0, 0, 10, 10], 0, 1), (1, [50, 50, 10, 10], 0, 2)], categories=(1, 2))
    dets = [det(1, [0, 0, 10, 10], 0.9, 2),    # on the category-1 box but category 2: FP
            det(1, [0, 0, 10, 10], 0.8, 1),    # TP
            det(1, [50, 50, 10, 10], 0.7, 2)]  # TP
    # G = 2, N = 1; points (recall, precision, FPPI): (0, 0, 1), (1/2, 1/2, 1), (1, 2/3, 1)
    # AP = 1/2 * (0 + 1/2) / 2 + 1/2 * (1/2 + 2/3) / 2 = 5/12; every ref <= 1 -> point 1, miss rate 1
    result = crowd_metrics(gt, dets)
    assert result["AP50"] == pytest.approx(100 * 5 / 12, abs=1e-6)
    assert result["mMR"] == pytest.approx(100.0) and result["recall"] == pytest.approx(100.0)
    # category 2 only: points (0, 0, 1), (1, 1/2, 1) -> AP = 1 * (0 + 1/2) / 2
    only2 = crowd_metrics(gt, dets, cat_ids=[2])
    assert only2["AP50"] == pytest.approx(25.0, abs=1e-6) and only2["recall"] == pytest.approx(100.0)


def test_bad_input():
    with pytest.raises(ValueError, match="image_id 9 is not in the ground truth"):
        crowd_metrics(HAND_GT, [det(9, [0, 0, 1, 1], 0.5)])
    with pytest.raises(ValueError, match="category_id 3 is not among"):
        crowd_metrics(HAND_GT, [det(1, [0, 0, 1, 1], 0.5, 3)])
    with pytest.raises(ValueError, match=r"detection 0: missing key\(s\) \['score'\]"):
        crowd_metrics(HAND_GT, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="bbox must be 4 numbers"):
        crowd_metrics(HAND_GT, [det(1, [0, 0, 1], 0.5)])
    with pytest.raises(ValueError, match="cat_ids"):
        crowd_metrics(HAND_GT, [], cat_ids=[7])
    with pytest.raises(ValueError, match="no normal"):
        crowd_metrics(make_gt({1: (10, 10)}, [(1, [0, 0, 5, 5], 1)]), [])
    with pytest.raises(FileNotFoundError):
        crowd_metrics("missing.json", [])


def test_match_image_rules():
    gt = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 100, 100]], dtype=float)
    ignore = np.array([False, False, True])
    dets = np.array([
        [0, 0, 10, 10],      # score 0.8: GT 0 is taken by the 0.9 detection; IoU with GT 1 is 1/3 -> FP
        [1, 0, 11, 10],      # score 0.9: IoU 0.82 with GT 0, 0.43 with GT 1 -> TP (greedy, higher score first)
        [60, 60, 70, 70],    # in the ignore region: IoU 0.04 but IoA 1 -> ignored
        [55, 55, 95, 95],    # ignored too: the region is not used up
        [0, 0, 200, 200],    # covers the region: IoA 0.0625 -> FP
        [5, 0, 15, 20],      # IoU exactly 0.5 with GT 1 (strict '>') -> FP
    ], dtype=float)
    scores = np.array([0.8, 0.9, 0.7, 0.6, 0.5, 0.4])
    np.testing.assert_array_equal(match_image(dets, scores, gt, ignore), [0, 1, -1, -1, 0, 0])
    np.testing.assert_array_equal(match_image(dets[5:], scores[5:], gt, ignore, iou_thresh=0.45), [1])
    # a normal match wins over an ignore region overlapping the same detection
    np.testing.assert_array_equal(
        match_image(np.array([[50, 50, 60, 60]]), np.array([0.5]), np.array([[50, 50, 60, 61], [0, 0, 100, 100]]),
                    np.array([False, True])), [1])
    assert match_image(np.zeros((0, 4)), np.zeros(0), gt, ignore).shape == (0,)
    np.testing.assert_array_equal(match_image(dets[:2], scores[:2], np.zeros((0, 4)), np.zeros(0)), [0, 0])
    with pytest.raises(ValueError, match="det_boxes"):
        match_image(dets[:2], scores, gt, ignore)


def test_log_average_miss_rate_hand_computed():
    fppi = [0.0, 0.02, 0.02, 0.2, 0.5, 2.0]
    miss = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    # first point with FPPI >= ref: 0.01, 0.0178 -> 0.8 (the first 0.02, not the second); 0.0316 .. 0.1778 -> 0.6;
    # 0.3162 -> 0.5; 0.5623, 1.0 -> 0.4
    expected = math.exp((2 * math.log(0.8) + 4 * math.log(0.6) + math.log(0.5) + 2 * math.log(0.4)) / 9)
    assert log_average_miss_rate(fppi, miss) == pytest.approx(expected, abs=1e-12)
    # the curve never reaches FPPI 0.0562: the last point stands in for the larger refs
    assert log_average_miss_rate([0.02, 0.05], [0.5, 0.25]) == pytest.approx(2 ** (-16 / 9), abs=1e-12)
    # a ref hit exactly takes the first point at that FPPI
    assert log_average_miss_rate([0.0, 1.0, 1.0], [0.8, 0.5, 0.1], refs=[1.0]) == pytest.approx(0.5)
    assert log_average_miss_rate([0.5, 1.0], [0.2, 0.0]) == 0.0      # a zero miss rate: no floor, mMR 0
    assert log_average_miss_rate([], []) == 1.0                      # nothing detected
    assert len(CALTECH_FPPI_REFS) == 9
    np.testing.assert_allclose(CALTECH_FPPI_REFS, 10 ** np.linspace(-2, 0, 9), atol=6e-5)
    with pytest.raises(ValueError, match="non-decreasing"):
        log_average_miss_rate([0.5, 0.1], [0.2, 0.1])


def test_average_precision_and_curves():
    curves = crowd_curves([0.3, 0.9, 0.5], [True, True, False], num_gt=4, num_images=2)
    np.testing.assert_allclose(curves["recall"], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(curves["precision"], [1, 0.5, 2 / 3])
    np.testing.assert_allclose(curves["fppi"], [0, 0.5, 0.5])
    np.testing.assert_allclose(curves["miss_rate"], [0.75, 0.75, 0.5])
    assert average_precision(curves["recall"], curves["precision"]) == pytest.approx(0.25 * (0.5 + 2 / 3) / 2)
    assert average_precision([0.5], [1.0]) == 0.0
    with pytest.raises(ValueError):
        crowd_curves([0.5], [True], num_gt=0, num_images=1)


def _iou_ioa(d, g):
    iw = min(d[2], g[2]) - max(d[0], g[0])
    ih = min(d[3], g[3]) - max(d[1], g[1])
    inter = max(iw, 0) * max(ih, 0)
    ad, ag = (d[2] - d[0]) * (d[3] - d[1]), (g[2] - g[0]) * (g[3] - g[1])
    return inter / (ad + ag - inter + 1e-6), inter / (ad + 1e-6)


def _reference(gt, dets, thr=0.5):
    """Plain-loop reading of the definitions in the module doc (single category)."""
    def clip(b, w, h):
        return [min(max(b[0], 0), w - 1), min(max(b[1], 0), h - 1), min(max(b[2], 0), w), min(max(b[3], 0), h)]

    entries = []
    for img in gt["images"]:
        w, h = img["width"], img["height"]
        gts = [(clip([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]], w, h),
                a["iscrowd"]) for a in gt["annotations"] if a["image_id"] == img["id"]]
        mine = sorted((d for d in dets if d["image_id"] == img["id"]), key=lambda d: -d["score"])
        used = set()
        for d in mine:
            x, y, bw, bh = d["bbox"]
            box = clip([x, y, x + bw, y + bh], w, h)
            best, best_iou = None, thr
            for j, (g, crowd) in enumerate(gts):
                if not crowd and j not in used and _iou_ioa(box, g)[0] > best_iou:
                    best, best_iou = j, _iou_ioa(box, g)[0]
            if best is not None:
                used.add(best)
                entries.append((d["score"], 1))
            elif not any(crowd and _iou_ioa(box, g)[1] > thr for g, crowd in gts):
                entries.append((d["score"], 0))
    entries.sort(key=lambda e: -e[0])
    num_gt = sum(1 for a in gt["annotations"] if not a["iscrowd"])
    tp = fp = 0
    rec, prec, fppi = [], [], []
    for _, is_tp in entries:
        tp, fp = tp + is_tp, fp + (1 - is_tp)
        rec.append(tp / num_gt)
        prec.append(tp / (tp + fp))
        fppi.append(fp / len(gt["images"]))
    ap = sum((rec[k] - rec[k - 1]) * (prec[k] + prec[k - 1]) / 2 for k in range(1, len(rec)))
    sampled = [1 - rec[next((k for k, f in enumerate(fppi) if f >= ref), len(fppi) - 1)] for ref in CALTECH_FPPI_REFS]
    mmr = 0.0 if min(sampled) == 0 else math.exp(sum(math.log(m) for m in sampled) / len(sampled))
    return {"AP50": 100 * ap, "mMR": 100 * mmr, "recall": 100 * rec[-1]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference_on_random_data(seed):
    rng = random.Random(seed)
    images = {i: (rng.randint(40, 80), rng.randint(40, 80)) for i in range(1, 7)}
    anns, dets = [], []
    for i, (w, h) in images.items():
        for _ in range(rng.randint(0, 6)):
            x, y = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
            box = [x, y, rng.uniform(5, w - x), rng.uniform(5, h - y)]
            anns.append((i, box, int(rng.random() < 0.2)))
            for _ in range(rng.randint(0, 2)):  # jittered copies: TPs, duplicates, near misses
                dets.append(det(i, [v + rng.uniform(-4, 4) for v in box], rng.random()))
        for _ in range(rng.randint(0, 3)):  # random boxes, some crossing the border
            dets.append(det(i, [rng.uniform(-10, w), rng.uniform(-10, h), rng.uniform(3, 40), rng.uniform(3, 40)],
                            rng.random()))
    anns.append((1, [1, 1, 20, 20], 0))  # at least one normal GT
    gt = make_gt(images, anns)
    got, want = crowd_metrics(gt, dets), _reference(gt, dets)
    for key in ("AP50", "mMR", "recall"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert 0 < got["AP50"] < 100 and 0 < got["mMR"] < 100
