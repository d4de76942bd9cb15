"""ATSS assignment on anchor points (DeFCN ``crowdhuman/atss.res50.fpn.crowdhuman.800size.30k/atss.py``): hand-built
cases, the rule's properties on random boxes, and the official ``get_ground_truth`` (fixture shared with
``tests/test_assign_o2o_baselines.py``)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from e2edet.assign.atss import ATSSAssigner
from e2edet.assign.prior import nearest_points_per_level
from e2edet.models.dense.points import anchor_points
from e2edet.ops.boxes import square_boxes
from tests.test_assign_o2o_baselines import (
    _pyramid,
    _target,
    assert_matches_official,
    fixture_cases,
)


def _one_level(boxes, topk=3):
    points, strides, _, counts = anchor_points([(8, 8)], [8])  # 64 x 64, stride 8
    out = ATSSAssigner(topk=topk)(points, strides, counts, [_target(boxes, [0] * len(boxes))], num_classes=1)
    pos = out.pos_mask[0]
    return [tuple(p) for p in points[pos].tolist()], out.gt_index[0][pos].tolist()


def test_candidates_outside_the_box_are_never_positive():
    # GT [22, 14, 34, 26], centre (28, 20): candidates (28, 20) (distance 0), then of the four points at distance 8
    # the first two in point order, (28, 12) and (20, 20). Their 64-px anchors all contain the 12 x 12 box, so the
    # IoUs are equal, std 0 and every candidate reaches thr = mean (>=); only (28, 20) is strictly inside.
    assert _one_level([[22.0, 14.0, 34.0, 26.0]]) == ([(28.0, 20.0)], [0])


def test_a_point_of_two_gts_goes_to_the_higher_anchor_iou():
    # (28, 20) is the only positive of both GTs (B's other candidates (28, 12) and (20, 20) lie on its edges: the
    # inside test is strict); anchor IoU 144/4096 for A, 256/4096 for B: B wins whatever the order.
    a, b = [22.0, 14.0, 34.0, 26.0], [20.0, 12.0, 36.0, 28.0]
    assert _one_level([a, b]) == ([(28.0, 20.0)], [1])
    assert _one_level([b, a]) == ([(28.0, 20.0)], [0])


def test_positives_follow_the_rule_on_random_boxes():
    points, strides, _, counts = _pyramid(256, 320)
    gen = torch.Generator().manual_seed(5)
    xy = torch.rand(8, 2, generator=gen) * 200
    boxes = torch.cat([xy, xy + 8 + torch.rand(8, 2, generator=gen) * 120], 1)
    out = ATSSAssigner()(points, strides, counts, [{"boxes": boxes, "labels": torch.zeros(8, dtype=torch.long)}], 1)
    iou = box_iou(boxes, square_boxes(points, strides * 8.0))
    cand = nearest_points_per_level((boxes[:, :2] + boxes[:, 2:]) / 2, points, counts, 9)
    assert cand.shape == (8, 4 * 9 + 6)  # P7 of a 256 x 320 input has 2 x 3 points
    for r in out.pos_mask[0].nonzero().flatten().tolist():
        g = int(out.gt_index[0, r])
        values = iou[g, cand[g]]
        assert r in cand[g].tolist() and iou[g, r] >= values.mean() + values.std()
        x, y = points[r].tolist()
        assert boxes[g, 0] < x < boxes[g, 2] and boxes[g, 1] < y < boxes[g, 3]
    assert out.num_pos.item() >= 8  # one-to-many


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ATSSAssigner(topk=0)
    with pytest.raises(ValueError):
        ATSSAssigner(anchor_scale=0.0)
    points, strides, _, _ = _pyramid(64, 64)
    with pytest.raises(ValueError, match="sums to"):
        ATSSAssigner()(points, strides, [1], [_target([[0.0, 0.0, 10.0, 10.0]], [0])], 1)


@pytest.mark.parametrize("case", fixture_cases("atss"), ids=lambda c: f"{c['size']}")
def test_atss_matches_the_official_code(case):
    points, strides, _, counts = _pyramid(*case["size"])
    out = ATSSAssigner(topk=9, anchor_scale=8.0)(points, strides, counts, case["targets"], case["num_classes"])
    assert_matches_official(out, case)
