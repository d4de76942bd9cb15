"""COCO evaluation: faster-coco-eval agrees with pycocotools; NMS/no-NMS columns; label mapping; edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import batched_nms

from e2edet.engine.evaluator import METRIC_NAMES, CocoEvaluator, evaluate, format_results_table, save_results

CAT_IDS = [1, 5]  # label 0 -> category 1 ("cell"), label 1 -> category 5 ("blob")


def _ann(ann_id, image_id, cat, box, crowd=0):
    x, y, w, h = box
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
            "iscrowd": crowd}


@pytest.fixture
def coco_gt():
    """4 images, 2 categories (non-contiguous ids), small/medium/large boxes, a crowd region, an empty image."""
    images = [{"id": i, "width": 200, "height": 160, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4)]
    anns = [
        _ann(1, 1, 1, (10, 10, 20, 20)),  # small
        _ann(2, 1, 5, (60, 40, 50, 40)),  # medium
        _ann(3, 2, 1, (5, 5, 40, 30)),  # medium
        _ann(4, 2, 1, (100, 20, 90, 120), crowd=1),  # crowd region
        _ann(5, 2, 5, (20, 50, 100, 100)),  # large
        _ann(6, 3, 1, (30, 30, 35, 35)),  # medium
        _ann(7, 3, 5, (120, 90, 12, 14)),  # small
    ]  # image 4 has no ground truth
    cats = [{"id": 1, "name": "cell"}, {"id": 5, "name": "blob"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _pred(rows):
    """rows of (x1, y1, x2, y2, score, label) -> post-processor dict."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"boxes": t[:, :4], "scores": t[:, 4], "labels": t[:, 5].long()}


PREDICTIONS = {
    1: [(11, 9, 31, 31, 0.9, 0), (12, 10, 30, 32, 0.85, 0), (61, 42, 108, 80, 0.7, 1), (0, 0, 15, 15, 0.3, 1)],
    2: [(6, 4, 47, 36, 0.95, 0), (110, 30, 150, 80, 0.6, 0), (22, 48, 118, 152, 0.8, 1), (20, 50, 70, 100, 0.4, 1)],
    3: [(30, 31, 66, 64, 0.5, 0), (121, 91, 131, 104, 0.65, 1), (0, 100, 40, 150, 0.75, 0)],
    4: [(50, 50, 90, 90, 0.88, 1)],  # false positive on the image without ground truth
}


def _pycocotools_stats(gt_dict, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = json.loads(json.dumps(gt_dict))
    gt.createIndex()
    dt = gt.loadRes(json.loads(json.dumps(dets)))
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.array(ev.stats)


def test_matches_pycocotools(coco_gt, capsys):
    ev = CocoEvaluator(coco_gt, CAT_IDS)
    for image_id, rows in PREDICTIONS.items():
        ev.update([image_id], [_pred(rows)])
    ours = ev.summarize()
    ref = _pycocotools_stats(coco_gt, ev.detections())
    capsys.readouterr()
    assert list(ours) == list(METRIC_NAMES)
    got = np.array([v / 100.0 if v >= 0 else -1.0 for v in ours.values()])
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    assert 0 < ours["AP"] < 100 and ours["APs"] >= 0  # non-trivial numbers


def test_label_to_category_mapping(coco_gt):
    ev = CocoEvaluator(coco_gt, CAT_IDS)
    ev.update([3], [_pred([(0, 0, 10, 10, 0.5, 0), (0, 0, 10, 10, 0.4, 1)])])
    dets = ev.detections()
    assert [d["category_id"] for d in dets] == [1, 5]
    assert dets[0]["bbox"] == [0.0, 0.0, 10.0, 10.0]  # xyxy -> xywh
    with pytest.raises(ValueError, match="outside"):
        ev.update([3], [_pred([(0, 0, 10, 10, 0.5, 2)])])
    with pytest.raises(ValueError, match="absent from the ground truth"):
        CocoEvaluator(coco_gt, [1, 2])
    with pytest.raises(ValueError, match="not in the ground-truth"):
        ev.update([99], [_pred([])])


def test_empty_predictions_give_zeros(coco_gt):
    ev = CocoEvaluator(coco_gt, CAT_IDS)
    assert ev.summarize() == {name: 0.0 for name in METRIC_NAMES}
    ev.update([1, 2], [_pred([]), _pred([])])
    assert ev.summarize() == {name: 0.0 for name in METRIC_NAMES}


def test_images_without_predictions_count_as_missed(coco_gt):
    perfect = {1: [], 2: [], 3: []}
    for a in coco_gt["annotations"]:
        if not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            perfect[a["image_id"]].append((x, y, x + w, y + h, 0.9, CAT_IDS.index(a["category_id"])))
    ev = CocoEvaluator(coco_gt, CAT_IDS)
    for i, rows in perfect.items():
        ev.update([i], [_pred(rows)])
    assert ev.summarize()["AP"] == pytest.approx(100.0)
    ev.update([3], [_pred([])])  # image 3 seen, but nothing detected
    assert ev.summarize()["AP"] < 100.0


class _FixedDetector(nn.Module):
    """Returns pre-set detections per image id (ids are passed in the image tensor's first pixel)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, images, image_sizes=None):
        rows = [self.table[int(img[0, 0, 0])] for img in images]
        return {"dets": [torch.tensor(r, dtype=torch.float32) for r in rows]}


def _postprocess(outputs, image_sizes, orig_sizes, nms_iou=None):
    """Minimal post-processor obeying the contract: rescale to original size, sort, optional NMS."""
    results = []
    for dets, size, orig in zip(outputs["dets"], image_sizes, orig_sizes):
        scale = (orig.flip(0) / size.flip(0)).repeat(2).float()
        boxes, scores, labels = dets[:, :4] * scale, dets[:, 4], dets[:, 5].long()
        keep = scores.argsort(descending=True)
        if nms_iou is not None:
            keep = batched_nms(boxes, scores, labels, nms_iou)
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results


def test_duplicates_hurt_ap_only_without_nms(tmp_path):
    gt = {
        "images": [{"id": 7, "width": 64, "height": 64}, {"id": 8, "width": 64, "height": 64}],
        "annotations": [_ann(1, 7, 1, (10, 10, 40, 40)), _ann(2, 8, 1, (20, 20, 30, 30))],
        "categories": [{"id": 1, "name": "cell"}],
    }
    # inputs are resized to 32x32 (half size); detections are in input pixels
    table = {7: [(5, 5, 25, 25, 0.9, 0), (6, 6, 26, 26, 0.85, 0)],  # perfect box + a duplicate
             8: [(10, 10, 25, 25, 0.8, 0)]}
    loader = []
    for image_id in (7, 8):
        img = torch.full((1, 3, 32, 32), float(image_id))
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": image_id,
                  "size": torch.tensor([32, 32]), "orig_size": torch.tensor([64, 64])}
        loader.append((img, [target]))
    res = evaluate(_FixedDetector(table), _postprocess, loader, "cpu", gt, [1], nms_iou=0.6,
                   return_detections=True, progress=False)
    assert res["nms"]["AP50"] == pytest.approx(100.0)
    assert res["no_nms"]["AP50"] < 100.0
    assert res["num_images"] == 2 and res["seconds"] >= 0
    assert len(res["detections"]) == 3 and res["detections"][0]["bbox"] == [10.0, 10.0, 40.0, 40.0]

    table_text = format_results_table(res)
    assert "no NMS" in table_text and "NMS 0.6" in table_text and "AR100" in table_text
    out = save_results({k: v for k, v in res.items() if k != "detections"}, tmp_path / "eval.json")
    assert json.loads(out.read_text())["nms"]["AP50"] == pytest.approx(100.0)
    assert not list(tmp_path.glob(".*tmp"))


def test_gt_from_path_and_missing_path(tmp_path, coco_gt):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco_gt))
    assert CocoEvaluator(path, CAT_IDS).summarize()["AP"] == 0.0
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoEvaluator(tmp_path / "nope.json", CAT_IDS)


def test_evaluate_reports_diagnostics(tmp_path):
    """Duplicate rate and ECE per column, the table rows, the reliability PNG and plain JSON."""
    from PIL import Image

    gt = {
        "images": [{"id": 7, "width": 64, "height": 64}, {"id": 8, "width": 64, "height": 64}],
        "annotations": [_ann(1, 7, 1, (10, 10, 40, 40)), _ann(2, 8, 1, (20, 20, 30, 30))],
        "categories": [{"id": 1, "name": "cell"}],
    }
    # original-size boxes (x2): image 7: [10,10,50,50] TP (0.93) and [12,12,52,52] with IoU 1444/1756 = 0.82
    # with the same GT -> duplicate (0.87), removed by NMS 0.6; image 8: [20,20,50,50] TP (0.82).
    # (scores away from the bin edges: float32(0.9) = 0.8999999762 would fall into bin [0.85, 0.9))
    table = {7: [(5, 5, 25, 25, 0.93, 0), (6, 6, 26, 26, 0.87, 0)], 8: [(10, 10, 25, 25, 0.82, 0)]}
    loader = []
    for image_id in (7, 8):
        target = {"image_id": image_id, "size": torch.tensor([32, 32]), "orig_size": torch.tensor([64, 64])}
        loader.append((torch.full((1, 3, 32, 32), float(image_id)), [target]))
    png, pr_png = tmp_path / "plots" / "reliability.png", tmp_path / "plots" / "pr_curve.png"
    res = evaluate(_FixedDetector(table), _postprocess, loader, "cpu", gt, [1], nms_iou=0.6, progress=False,
                   plot_path=png, pr_curve_path=pr_png)
    # per class: no NMS TP (0.93), duplicate (0.87), TP (0.82) at every IoU -> (51 + 50 * 2/3) / 101; NMS: 100
    per_class = res["per_class"]
    assert [(r["name"], r["num_gt"]) for r in per_class["no_nms"]] == [("cell", 2)]
    assert per_class["no_nms"][0]["AP"] == pytest.approx(100 * (51 + 100 / 3) / 101) == res["no_nms"]["AP"]
    assert per_class["nms"][0]["AP50"] == pytest.approx(100.0) and per_class["nms"][0]["AP"] == pytest.approx(100.0)
    assert pr_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_nms, nms = res["diagnostics"]["no_nms"], res["diagnostics"]["nms"]
    # no NMS: 3 confident detections, 1 duplicate -> 33.3 %; NMS: 2 confident, none
    assert (no_nms["num_confident"], no_nms["num_duplicates"]) == (3, 1)
    assert no_nms["duplicate_rate"] == pytest.approx(100 / 3)
    assert (nms["num_confident"], nms["num_duplicates"], nms["duplicate_rate"]) == (2, 0, 0.0)
    # ECE, one detection per bin (18, 17, 16): no NMS (|1-0.93| + |0-0.87| + |1-0.82|) / 3 = 37.33 %;
    # NMS (0.07 + 0.18) / 2 = 12.5 %
    assert no_nms["ece"] == pytest.approx(112 / 3, abs=1e-4)
    assert nms["ece"] == pytest.approx(12.5, abs=1e-4)
    assert set(res) >= {"no_nms", "nms", "nms_iou", "num_images", "seconds", "diagnostics"}

    rows = {line.split()[0]: line.split()[1:] for line in format_results_table(res).splitlines()[1:]}
    assert rows["dup%"] == ["33.3", "0.0"] and rows["ECE"] == ["37.3", "12.5"]
    assert list(rows)[-4:] == ["dup%", "ECE", "mMR", "recall"]  # under the AP rows
    assert set(res["crowd"]["no_nms"]) == {"AP50", "mMR", "recall"}
    old = {k: v for k, v in res.items() if k not in ("diagnostics", "crowd")}  # results from before the diagnostics
    assert format_results_table(old).splitlines()[-1].split() == ["recall", "-", "-"]

    with Image.open(png) as img:
        assert img.format == "PNG"

    def _no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    out = save_results(res, tmp_path / "eval.json")
    loaded = json.loads(out.read_text(), parse_constant=_no_constants)
    assert loaded["diagnostics"]["no_nms"]["reliability"]["counts"][17] == 1
    assert loaded["diagnostics"]["nms"]["reliability"]["precisions"][0] is None
