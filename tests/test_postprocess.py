"""Dense post-processing (spec dense.md 1.5, 1.8.8, 2.5, 2.8.18)."""

import pytest
import torch
import torchvision

from e2edet.models.dense.postprocess import DensePostProcessor


def _outputs(prob, boxes, counts=None, filter_prob=None, ctr_prob=None):
    """Model-like outputs for one image from probabilities [R, K] and boxes [R, 4]."""
    out = {
        "pred_logits": torch.logit(torch.as_tensor(prob, dtype=torch.float32))[None],
        "pred_boxes": torch.as_tensor(boxes, dtype=torch.float32)[None],
        "num_points_per_level": counts or [len(prob)],
    }
    if filter_prob is not None:
        out["pred_filter"] = torch.logit(torch.as_tensor(filter_prob, dtype=torch.float32))[None]
    if ctr_prob is not None:
        out["pred_ctr"] = torch.logit(torch.as_tensor(ctr_prob, dtype=torch.float32))[None]
    return out


def _box(i):
    return [10.0 * i, 0.0, 10.0 * i + 8.0, 8.0]


SIZE = [[64, 64]]


def test_fcos_threshold_acts_on_cls_probability_before_centerness():
    # A: p=0.06, ctr=0.01 -> ranked sqrt(0.0006)=0.0245 < 0.05 but kept; B: p=0.04, ctr=1 -> 0.2 but dropped
    out = _outputs([[0.06], [0.04]], [_box(0), _box(1)], ctr_prob=[0.01, 0.999999])
    (res,) = DensePostProcessor("cls_ctr_sqrt")(out, SIZE, SIZE)
    assert res["scores"].tolist() == pytest.approx([(0.06 * 0.01) ** 0.5], rel=1e-4)
    assert res["boxes"].tolist() == [_box(0)]


def test_cls_filter_thresholds_the_product():
    out = _outputs([[0.08], [0.2]], [_box(0), _box(1)], filter_prob=[0.5, 0.5])
    (res,) = DensePostProcessor("cls_filter")(out, SIZE, SIZE)
    assert res["scores"].tolist() == pytest.approx([0.1], rel=1e-4) and res["boxes"].tolist() == [_box(1)]


def test_cls_ctr_product_mode_and_missing_inputs():
    out = _outputs([[0.3], [0.9]], [_box(0), _box(1)], ctr_prob=[0.5, 0.1])
    (res,) = DensePostProcessor("cls_ctr")(out, SIZE, SIZE)
    assert res["scores"].tolist() == pytest.approx([0.15, 0.09], rel=1e-4)
    with pytest.raises(ValueError, match="pred_filter"):
        DensePostProcessor("cls_filter")(out, SIZE, SIZE)
    with pytest.raises(ValueError):
        DensePostProcessor("nms")


def test_at_most_max_detections_sorted_above_threshold_and_multi_class():
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(300, 4, generator=g)
    xy = torch.rand(300, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10], dim=1)
    post = DensePostProcessor("cls", max_detections=100)
    (res,) = post(_outputs(prob, boxes, counts=[200, 100]), [[64, 64]], [[64, 64]])
    scores = res["scores"]
    assert len(scores) == 100 and torch.all(scores[:-1] >= scores[1:]) and torch.all(scores > 0.05)
    assert res["labels"].dtype == torch.int64 and res["labels"].max() < 4
    # the kept entries are exactly the global top 100 of the per-level top-min(1000, points) candidates
    level0 = prob[:200].flatten().topk(200).values
    level1 = prob[200:].flatten().topk(100).values
    expected = torch.cat([level0, level1]).sort(descending=True).values[:100]
    torch.testing.assert_close(scores, expected)


def test_per_level_topk_is_capped_by_points_in_level():
    prob = torch.full((6, 3), 0.9)
    boxes = torch.tensor([_box(i) for i in range(6)])
    out = _outputs(prob, boxes, counts=[4, 2])
    (res,) = DensePostProcessor("cls")(out, [[64, 64]], [[64, 64]])
    assert len(res["scores"]) == 4 + 2  # min(1000, #points) per level, not #points * K
    (res,) = DensePostProcessor("cls", topk_candidates=3)(out, [[64, 64]], [[64, 64]])
    assert len(res["scores"]) == 3 + 2


def test_never_calls_nms_unless_asked(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("NMS must not run")

    monkeypatch.setattr(torchvision.ops, "batched_nms", forbidden)
    for mode in ("cls", "cls_filter", "cls_ctr_sqrt"):
        extra = {"cls_filter": {"filter_prob": [0.9, 0.9]}, "cls_ctr_sqrt": {"ctr_prob": [0.9, 0.9]}}.get(mode, {})
        out = _outputs([[0.9], [0.8]], [_box(0), _box(0)], **extra)
        (res,) = DensePostProcessor(mode)(out, SIZE, SIZE)
        assert len(res["scores"]) == 2


def test_nms_removes_a_duplicate_only_when_asked():
    # two near-identical boxes of class 0, one box of class 1 at the same place (class-aware NMS keeps it)
    out = _outputs([[0.9, 0.01], [0.8, 0.01], [0.01, 0.7]], [_box(0), [0.5, 0.0, 8.0, 8.0], _box(0)])
    post = DensePostProcessor("cls")
    (plain,) = post(out, SIZE, SIZE)
    (nms,) = post(out, SIZE, SIZE, nms_iou=0.6)
    assert plain["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7], rel=1e-4)
    assert nms["scores"].tolist() == pytest.approx([0.9, 0.7], rel=1e-4) and nms["labels"].tolist() == [0, 1]


def test_rescale_to_original_clip_and_drop_empty():
    boxes = [[10.0, 10.0, 50.0, 30.0], [50.0, 30.0, 70.0, 45.0], [61.0, 0.0, 70.0, 10.0]]
    out = _outputs([[0.9], [0.8], [0.7]], boxes)
    # network input (h, w) = (40, 60), padded to 64x64; original image (80, 120): factor 2 on both axes
    (res,) = DensePostProcessor("cls")(out, torch.tensor([[40, 60]]), torch.tensor([[80, 120]]))
    assert res["boxes"].tolist() == [[20.0, 20.0, 100.0, 60.0], [100.0, 60.0, 120.0, 80.0]]  # third box: empty
    # different factors per axis: (h, w) 40x60 -> 20x90 gives y x0.5, x x1.5
    (res,) = DensePostProcessor("cls")(out, [[40, 60]], [[20, 90]])
    assert res["boxes"][0].tolist() == [15.0, 5.0, 75.0, 15.0]


def test_batch_and_size_validation():
    out = _outputs([[0.9]], [_box(0)])
    out = {k: (torch.cat([v, v]) if torch.is_tensor(v) else v) for k, v in out.items()}
    sizes = [torch.tensor([64, 64]), torch.tensor([32, 32])]  # list of target["size"] tensors
    res = DensePostProcessor("cls")(out, sizes, torch.tensor([[64, 64], [64, 64]]))
    assert res[0]["boxes"].tolist() == [_box(0)] and res[1]["boxes"].tolist() == [[0.0, 0.0, 16.0, 16.0]]
    with pytest.raises(ValueError):
        DensePostProcessor("cls")(out, [[64, 64]], [[64, 64]])
