"""Query post-processor (spec query.md 1.5, 1.8 #7, 2.5, 3.5, 3.8 #16)."""

import pytest
import torch

from e2edet.models.query.postprocess import QueryPostProcessor


def _boxes(num_queries, gen):
    xy = torch.rand(num_queries, 2, generator=gen) * 100
    return torch.cat([xy, xy + 5 + torch.rand(num_queries, 2, generator=gen) * 20], dim=1)


def _query_of(box, boxes):
    (idx,) = torch.nonzero(torch.all(boxes == box, dim=1), as_tuple=True)
    assert len(idx) == 1
    return int(idx)


@pytest.mark.parametrize("num_queries,num_classes,expected", [(30, 5, 100), (10, 5, 50), (300, 80, 100)])
def test_exactly_min_max_detections_and_query_entries(num_queries, num_classes, expected):
    gen = torch.Generator().manual_seed(num_queries)
    logits = torch.randn(2, num_queries, num_classes, generator=gen)
    boxes = torch.stack([_boxes(num_queries, gen) for _ in range(2)])
    results = QueryPostProcessor()({"pred_logits": logits, "pred_boxes": boxes}, [[128, 128]] * 2, [[128, 128]] * 2)
    for b, res in enumerate(results):
        prob = logits[b].sigmoid()
        assert len(res["scores"]) == expected and res["labels"].dtype == torch.int64
        assert res["boxes"].dtype == res["scores"].dtype == torch.float32
        # the kept scores are the global top-k of all N x K entries, descending, no threshold
        ref = sorted(prob.flatten().tolist(), reverse=True)[:expected]
        assert res["scores"].tolist() == pytest.approx(ref, rel=1e-6)
        for box, score, label in zip(res["boxes"], res["scores"], res["labels"]):
            assert float(prob[_query_of(box, boxes[b]), label]) == pytest.approx(float(score), rel=1e-6)


def test_one_query_can_emit_several_labels_and_labels_are_idx_mod_k():
    logits = torch.full((1, 3, 4), -8.0)
    logits[0, 1, 0], logits[0, 1, 3], logits[0, 2, 2] = 3.0, 2.0, 1.0
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 30]]])
    (res,) = QueryPostProcessor(max_detections=3)({"pred_logits": logits, "pred_boxes": boxes}, [[64, 64]], [[64, 64]])
    # flat indices 1*4+0 = 4, 1*4+3 = 7, 2*4+2 = 10: labels = idx mod 4, queries = idx div 4
    assert res["labels"].tolist() == [0, 3, 2]
    assert res["boxes"].tolist() == [[20, 20, 40, 40], [20, 20, 40, 40], [50, 0, 60, 30]]


def test_drmm_score_is_prob_times_fg_not_prob_times_pi():
    gen = torch.Generator().manual_seed(0)
    logits, fg = torch.randn(1, 6, 3, generator=gen), torch.randn(1, 6, generator=gen)
    out = {"pred_logits": logits, "pred_boxes": _boxes(6, gen)[None], "pred_fg": fg}
    (res,) = QueryPostProcessor("drmm", max_detections=18)(out, [[128, 128]], [[128, 128]])
    expected = logits[0].softmax(-1) * fg[0].sigmoid()[:, None]
    pi = fg[0].sigmoid() / fg[0].sigmoid().sum()
    with_pi = logits[0].softmax(-1) * pi[:, None]
    assert res["scores"].tolist() == pytest.approx(sorted(expected.flatten().tolist(), reverse=True), rel=1e-6)
    assert not torch.allclose(res["scores"], with_pi.flatten().sort(descending=True).values)
    with pytest.raises(ValueError, match="pred_fg"):
        QueryPostProcessor("drmm")({"pred_logits": logits, "pred_boxes": out["pred_boxes"]}, [[8, 8]], [[8, 8]])


def test_rescale_per_axis_without_clipping():
    logits = torch.tensor([[[2.0], [1.0]]])
    boxes = torch.tensor([[[10.0, 20.0, 50.0, 40.0], [-10.0, -5.0, 250.0, 120.0]]])  # second box leaves the image
    image_sizes = [torch.tensor([100, 200])]  # (h, w) of the network input, list-of-tensors form
    orig = torch.tensor([[50, 800]])
    (res,) = QueryPostProcessor()({"pred_logits": logits, "pred_boxes": boxes}, image_sizes, orig)
    assert res["boxes"].tolist() == [[40.0, 10.0, 200.0, 20.0], [-40.0, -2.5, 1000.0, 60.0]]


def test_nms_path_is_class_aware_and_capped():
    logits = torch.full((1, 3, 2), -9.0)
    logits[0, 0, 0], logits[0, 1, 0], logits[0, 1, 1], logits[0, 2, 0] = 3.0, 2.0, 1.0, 0.0
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 9], [30, 30, 40, 40]]])  # q0, q1 overlap (IoU 0.9)
    out = {"pred_logits": logits, "pred_boxes": boxes}
    (res,) = QueryPostProcessor(max_detections=4)(out, [[64, 64]], [[64, 64]], nms_iou=0.5)
    # class 0: q0 suppresses q1, q2 does not overlap; class 1: q1 (logit 1) suppresses q0 (-9), q2 (-9) is kept
    assert res["labels"].tolist() == [0, 1, 0, 1]
    assert res["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 9], [30, 30, 40, 40], [30, 30, 40, 40]]
    assert torch.all(res["scores"][:-1] >= res["scores"][1:])
    (res,) = QueryPostProcessor(max_detections=1)(out, [[64, 64]], [[64, 64]], nms_iou=0.5)
    assert res["labels"].tolist() == [0] and res["boxes"].tolist() == [[0, 0, 10, 10]]
    # nms_candidates limits the entries that reach NMS: the top 2 are q0/class 0 and q1/class 0, then NMS keeps one
    (res,) = QueryPostProcessor(max_detections=1, nms_candidates=2)(out, [[64, 64]], [[64, 64]], nms_iou=0.5)
    assert len(res["scores"]) == 1
    (res,) = QueryPostProcessor(max_detections=2, nms_candidates=2)(out, [[64, 64]], [[64, 64]], nms_iou=0.5)
    assert res["labels"].tolist() == [0]  # max(max_detections, nms_candidates) = 2 candidates, one suppressed


def test_bad_arguments_raise():
    out = {"pred_logits": torch.zeros(2, 3, 2), "pred_boxes": torch.zeros(2, 3, 4)}
    with pytest.raises(ValueError, match="score mode"):
        QueryPostProcessor("softmax")
    with pytest.raises(ValueError, match="image_sizes"):
        QueryPostProcessor()(out, [[8, 8]], [[8, 8], [8, 8]])
    with pytest.raises(ValueError, match="pred_boxes"):
        QueryPostProcessor()({**out, "pred_boxes": torch.zeros(2, 4, 4)}, [[8, 8]] * 2, [[8, 8]] * 2)
