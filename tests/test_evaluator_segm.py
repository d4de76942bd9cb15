"""Mask AP: ``CocoEvaluator(iou_type="segm")`` equals pycocotools' ``segm`` evaluation on a fixture with polygon and RLE
ground truth, and ``evaluate`` reports mask AP beside box AP (without and with NMS) for models that give masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import batched_nms

from e2edet.engine.coco_utils import encode_masks
from e2edet.engine.evaluator import (
    METRIC_NAMES,
    CocoEvaluator,
    evaluate,
    format_results_table,
)

pycocotools_mask = pytest.importorskip("pycocotools.mask")

H, W = 60, 80
CAT_IDS = [3, 7]


def _disk(cx, cy, r):
    yy, xx = np.mgrid[:H, :W]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


def _rle(mask):
    rle = pycocotools_mask.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _box(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _ann(ann_id, image_id, cat, segm, mask, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": segm, "bbox": _box(mask),
            "area": float(mask.sum()), "iscrowd": crowd}


@pytest.fixture
def gt_and_masks():
    """3 images, 2 categories: RLE disks of several sizes, a polygon square, a crowd RLE; image 3 has no object."""
    square = [[40.0, 5.0, 70.0, 5.0, 70.0, 35.0, 40.0, 35.0]]
    square_mask = pycocotools_mask.decode(pycocotools_mask.merge(pycocotools_mask.frPyObjects(square, H, W)))
    masks = {1: _disk(15, 20, 10), 2: square_mask, 3: _disk(20, 45, 4), 4: _disk(30, 30, 20), 5: _disk(65, 45, 8)}
    anns = [_ann(1, 1, 3, _rle(masks[1]), masks[1]), _ann(2, 1, 7, square, masks[2]),
            _ann(3, 1, 3, _rle(masks[3]), masks[3]), _ann(4, 2, 7, _rle(masks[4]), masks[4]),
            _ann(5, 2, 3, _rle(masks[5]), masks[5], crowd=1)]
    images = [{"id": i, "width": W, "height": H, "file_name": f"{i}.png"} for i in (1, 2, 3)]
    gt = {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    return gt, masks


def _predictions(masks):
    """Per image: masks (exact, shifted, shrunk, wrong class, false positive), scores, labels; boxes from the masks."""
    shifted = np.roll(masks[1], 3, axis=1)
    per_image = {
        1: [(masks[1], 0.9, 0), (shifted, 0.8, 0), (masks[2] * _disk(55, 20, 13), 0.7, 1), (masks[3], 0.3, 0),
            (_disk(70, 50, 6), 0.6, 1), (masks[3], 0.5, 1)],
        2: [(_disk(31, 29, 18), 0.95, 1), (_disk(64, 45, 7), 0.85, 0), (_disk(10, 10, 5), 0.2, 0)],
        3: [(_disk(40, 30, 9), 0.4, 1)],
    }
    out = {}
    for image_id, rows in per_image.items():
        m = torch.from_numpy(np.stack([r[0] for r in rows])).bool()
        boxes = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (_box(r[0]) for r in rows)])
        out[image_id] = {"boxes": boxes, "scores": torch.tensor([r[1] for r in rows]),
                         "labels": torch.tensor([r[2] for r in rows]), "masks": m}
    return out


def _pycocotools_segm(gt_dict, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = json.loads(json.dumps(gt_dict))
    gt.createIndex()
    dt = gt.loadRes(json.loads(json.dumps(dets)))
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.array(ev.stats)


def test_mask_ap_equals_pycocotools_segm(gt_and_masks, capsys):
    gt, masks = gt_and_masks
    ev = CocoEvaluator(gt, CAT_IDS, iou_type="segm")
    for image_id, pred in _predictions(masks).items():
        ev.update([image_id], [pred])
    dets = ev.detections()
    assert all("segmentation" in d and "bbox" not in d for d in dets)  # mask area decides small/medium/large
    ours = ev.summarize()
    ref = _pycocotools_segm(gt, dets)
    capsys.readouterr()
    assert list(ours) == list(METRIC_NAMES)
    got = np.array([v / 100.0 if v >= 0 else -1.0 for v in ours.values()])
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    assert 0 < ours["AP"] < 100 and ours["AP50"] > ours["AP75"] >= 0  # non-trivial numbers
    box = CocoEvaluator(gt, CAT_IDS)
    for image_id, pred in _predictions(masks).items():
        box.update([image_id], [pred])
    assert box.summarize()["AP"] != ours["AP"]  # masks, not boxes, were evaluated


def test_segm_update_needs_one_mask_per_detection(gt_and_masks):
    gt, masks = gt_and_masks
    pred = _predictions(masks)[1]
    ev = CocoEvaluator(gt, CAT_IDS, iou_type="segm")
    with pytest.raises(ValueError, match="needs masks"):
        ev.update([1], [{k: v for k, v in pred.items() if k != "masks"}])
    with pytest.raises(ValueError, match="needs masks"):
        ev.update([1], [{**pred, "masks": pred["masks"][:2]}])
    with pytest.raises(ValueError, match="iou_type"):
        CocoEvaluator(gt, CAT_IDS, iou_type="keypoints")


def test_encode_masks_round_trip():
    masks = torch.from_numpy(np.stack([_disk(10, 10, 4), np.zeros((H, W), np.uint8), _disk(70, 50, 20)]))
    rles = encode_masks(masks)
    assert [r["size"] for r in rles] == [[H, W]] * 3 and all(isinstance(r["counts"], str) for r in rles)
    back = np.stack([pycocotools_mask.decode({"size": r["size"], "counts": r["counts"].encode()}) for r in rles])
    np.testing.assert_array_equal(back, masks.numpy())
    assert encode_masks(torch.zeros(0, H, W)) == []


class _Outputs(nn.Module):
    """A stand-in model: returns the image ids it was given, for the stand-in post-processor."""

    def forward(self, images, sizes):
        return {"ids": images[:, 0, 0, 0].long()}


def test_evaluate_reports_mask_ap_beside_box_ap(gt_and_masks, capsys):
    gt, masks = gt_and_masks
    preds = _predictions(masks)

    def post(outputs, sizes, orig, nms_iou=None):
        out = []
        for image_id in outputs["ids"].tolist():
            p = preds[image_id]
            keep = (batched_nms(p["boxes"], p["scores"], p["labels"], nms_iou) if nms_iou is not None
                    else torch.argsort(p["scores"], descending=True))
            out.append({k: v[keep] for k, v in p.items()})
        return out

    def batch(ids):
        images = torch.zeros(len(ids), 3, 64, 96)
        images[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
        targets = [{"image_id": i, "size": torch.tensor([H, W]), "orig_size": torch.tensor([H, W])} for i in ids]
        return images, targets

    loader = [batch([1, 2]), batch([3])]
    res = evaluate(_Outputs(), post, loader, "cpu", gt, CAT_IDS, nms_iou=0.5, progress=False)
    capsys.readouterr()
    assert set(res["segm"]) == {"no_nms", "nms"}
    direct = {}
    for column, iou in (("no_nms", None), ("nms", 0.5)):
        ev = CocoEvaluator(gt, CAT_IDS, iou_type="segm")
        for image_id in (1, 2, 3):
            ev.update([image_id], post({"ids": torch.tensor([image_id])}, None, None, iou))
        direct[column] = ev.summarize()
    capsys.readouterr()
    assert res["segm"] == direct
    assert res["segm"]["nms"]["AP"] != res["segm"]["no_nms"]["AP"]  # NMS removed the shifted duplicate
    assert res["no_nms"]["AP"] != res["segm"]["no_nms"]["AP"]  # box AP stays under no_nms / nms
    rows = {line.split()[0]: line.split()[1:] for line in format_results_table(res, per_class=False).splitlines()[1:]}
    assert rows["maskAP"] == [f"{res['segm']['no_nms']['AP']:.1f}", f"{res['segm']['nms']['AP']:.1f}"]
    assert "maskAP50" in rows and "AP" in rows
    # a box-only post-processor: no mask metrics, no mask rows
    boxes_only = evaluate(_Outputs(), lambda o, s, g, nms_iou=None: [
        {k: v for k, v in d.items() if k != "masks"} for d in post(o, s, g, nms_iou)], loader, "cpu", gt, CAT_IDS,
        progress=False)
    capsys.readouterr()
    assert "segm" not in boxes_only and "maskAP" not in format_results_table(boxes_only)
