"""DeFCN's one-to-one baselines (specs/dense.md 2.3): Anchor, Center and Foreground-loss assignment, against
hand-built cases and against the official ``get_ground_truth`` (``tests/fixtures/defcn_o2o_assign.json``, written by
``tests/fixtures/make_defcn_o2o_fixture.py`` from the DeFCN and cvpods checkouts it names; shared with
``tests/test_assign_atss.py``)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from e2edet.assign.anchor import AnchorAssigner
from e2edet.assign.center import CenterAssigner
from e2edet.assign.fg_loss import (
    INFEASIBLE_COST,
    ForegroundLossAssigner,
    foreground_loss_cost,
)
from e2edet.models.dense.points import anchor_points
from e2edet.ops.boxes import decode_ltrb, square_boxes

FIXTURE = Path(__file__).parent / "fixtures" / "defcn_o2o_assign.json"
STRIDES = (8, 16, 32, 64, 128)


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _pyramid(h, w, strides=STRIDES):
    """e2edet's anchor points for an ``h x w`` input (grid ``ceil(size / stride)`` per level, as the FPN's)."""
    return anchor_points([(math.ceil(h / s), math.ceil(w / s)) for s in strides], list(strides))


def fixture_cases(name):
    cases = [c for c in json.loads(FIXTURE.read_text())["cases"] if c["name"] == name]
    for case in cases:
        case["targets"] = [_target(t["boxes"], t["labels"]) for t in case["targets"]]
    return cases


def assert_matches_official(out, case):
    """Same positive points with the same labels as the official code, and the same regression target boxes."""
    for b, expected in enumerate(case["positives"]):
        pos = out.pos_mask[b].nonzero().flatten()
        got = [[int(r), int(out.labels[b, r])] for r in pos]
        assert got == [row[:2] for row in expected], f"image {b}"
        want = torch.tensor([row[2:] for row in expected]).reshape(-1, 4)
        torch.testing.assert_close(out.box_targets[b][pos], want, atol=2e-3, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ Anchor
def test_anchor_conflict_goes_to_the_higher_iou_and_the_loser_gets_nothing():
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 0.0, 48.0, 32.0], [64.0, 64.0, 96.0, 96.0]])
    # Both GTs' best anchor is 0: IoU 900/1024 = 0.879 for A, 960/1088 = 0.882 for B; B keeps it and A, whose only
    # claim is top-1, has no positive (its second-best anchor 1 stays background).
    a, b = [0.0, 0.0, 30.0, 30.0], [2.0, 0.0, 34.0, 32.0]
    out = AnchorAssigner()(anchors, [_target([a, b], [0, 1])], num_classes=2)
    assert out.gt_index[0].tolist() == [1, -1, -1] and out.labels[0].tolist() == [1, 2, 2]
    assert out.box_targets[0, 0].tolist() == b
    swapped = AnchorAssigner()(anchors, [_target([b, a], [1, 0])], num_classes=2)
    assert swapped.gt_index[0].tolist() == [0, -1, -1] and swapped.labels[0].tolist() == [1, 2, 2]


def test_anchor_has_no_iou_threshold_and_ties_take_the_first_anchor():
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 0.0, 48.0, 32.0], [64.0, 64.0, 96.0, 96.0]])
    far = AnchorAssigner()(anchors, [_target([[200.0, 200.0, 210.0, 210.0]], [0])], num_classes=1)
    assert far.gt_index[0].tolist() == [0, -1, -1]  # IoU 0 everywhere: still one positive, the first anchor
    tie = AnchorAssigner()(anchors, [_target([[16.0, 8.0, 32.0, 24.0]], [0])], num_classes=1)
    assert tie.gt_index[0].tolist() == [0, -1, -1]  # equal IoU 0.25 with anchors 0 and 1
    empty = AnchorAssigner()(anchors, [_target([], [])], num_classes=1)
    assert not empty.pos_mask.any() and empty.labels.tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("case", fixture_cases("anchor"), ids=lambda c: f"{c['size']}")
def test_anchor_matches_the_official_code(case):
    points, strides, _, _ = _pyramid(*case["size"])
    anchors = square_boxes(points, strides * 4.0)  # DefaultAnchorGenerator sizes 32..512, offset 0.5
    out = AnchorAssigner()(anchors, case["targets"], case["num_classes"])
    assert_matches_official(out, case)


# ------------------------------------------------------------------------------------------------------ Center
def _center(boxes, labels=None, size=160):
    points, _, levels, counts = _pyramid(size, size, strides=(8, 16))  # ranges [-1, 64], [64, 128]
    labels = labels if labels is not None else [0] * len(boxes)
    out = CenterAssigner()(points, levels, counts, [_target(boxes, labels)], num_classes=2)
    pos = out.pos_mask[0]
    return [tuple(p) for p in points[pos].tolist()], out.gt_index[0][pos].tolist(), levels[pos].tolist()


def test_center_scale_range_moves_the_positive_to_the_level_whose_range_holds():
    # GT [0, 0, 140, 140], centre 70: the nearest P3 point (68, 68) has max(l, t, r, b) = 72 > 64 (dropped); the
    # nearest P4 point (72, 72) has 72 in [64, 128] (kept).
    assert _center([[0.0, 0.0, 140.0, 140.0]]) == ([(72.0, 72.0)], [0], [1])
    # Both bounds are inclusive: GT [0, 0, 120, 120] keeps P3 (60, 60) with m = 60 and P4 (56, 56) with m = 64 = lo;
    # GT [0, 0, 124, 124] keeps P3 (60, 60) with m = 64 = hi.
    assert _center([[0.0, 0.0, 120.0, 120.0]])[0] == [(60.0, 60.0), (56.0, 56.0)]
    assert _center([[0.0, 0.0, 124.0, 124.0]])[0] == [(60.0, 60.0), (56.0, 56.0)]
    # A box too large for both levels gets nothing: GT [0, 0, 300, 300], centre 150, nearest P3 point 148 and P4
    # point 152 both have m = 152 (> 64 and > 128).
    assert _center([[0.0, 0.0, 300.0, 300.0]], size=320) == ([], [], [])


def test_center_ties_go_to_the_first_point_and_conflicts_to_the_smaller_gt():
    # GT [0, 0, 128, 128], centre 64 is equidistant from P3 points 60 and 68 and from P4 points 56 and 72: the
    # first (row-major lowest) point wins the tie. P3 (60, 60) has m = 68 > 64; P4 (56, 56) has m = 72, kept.
    assert _center([[0.0, 0.0, 128.0, 128.0]]) == ([(56.0, 56.0)], [0], [1])
    # Concentric GTs with the same nearest P3 point (36, 36) (tie with (44, 44)), both in range: the smaller area
    # wins whatever the order; the larger one has no positive.
    big, small = [20.0, 20.0, 60.0, 60.0], [24.0, 24.0, 56.0, 56.0]
    assert _center([big, small]) == ([(36.0, 36.0)], [1], [0])
    assert _center([small, big]) == ([(36.0, 36.0)], [0], [0])
    # Equal areas, same nearest point (36, 36), both in range (m = 24 and 21): the first GT.
    assert _center([[20.0, 20.0, 60.0, 60.0], [17.0, 17.0, 57.0, 57.0]]) == ([(36.0, 36.0)], [0], [0])


def test_center_keeps_a_nearest_point_outside_a_tiny_box_like_the_official_code():
    # GT [10, 10, 11, 11]: the nearest P3 point (12, 12) lies outside (r = b = -1) but m = 2 is in P3's range.
    assert _center([[10.0, 10.0, 11.0, 11.0]]) == ([(12.0, 12.0)], [0], [0])


@pytest.mark.parametrize("case", fixture_cases("center"), ids=lambda c: f"{c['size']}")
def test_center_matches_the_official_code(case):
    points, _, levels, counts = _pyramid(*case["size"])
    out = CenterAssigner()(points, levels, counts, case["targets"], case["num_classes"])
    assert_matches_official(out, case)


# --------------------------------------------------------------------------------------------- Foreground loss
def test_foreground_loss_cost_is_the_focal_sum_plus_two_giou_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=gen) * 3
    xy = torch.rand(7, 2, generator=gen) * 50
    pred = torch.cat([xy, xy + 5 + torch.rand(7, 2, generator=gen) * 30], 1)
    gt = torch.tensor([[10.0, 12.0, 40.0, 50.0], [0.0, 5.0, 20.0, 15.0], [30.0, 30.0, 70.0, 60.0]])
    labels = torch.tensor([2, 0, 2])
    cost = foreground_loss_cost(logits, pred, gt, labels)
    for i, j in itertools.product(range(3), range(7)):
        onehot = torch.zeros(4)
        onehot[labels[i]] = 1
        focal = sigmoid_focal_loss(logits[j], onehot, alpha=0.25, gamma=2.0, reduction="sum")
        giou = generalized_box_iou(pred[j : j + 1], gt[i : i + 1])[0, 0]
        assert cost[i, j].item() == pytest.approx((focal + 2.0 * (1.0 - giou)).item(), rel=1e-5, abs=1e-6)


def _line_outputs():
    """Six points on one stride-8 row, random logits (K = 2), predicted boxes around each point."""
    points = torch.tensor([[4.0 + 8 * i, 12.0] for i in range(6)])
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 6, 2, generator=gen) * 2
    ltrb = 2 + torch.rand(1, 6, 4, generator=gen) * 14
    return logits, decode_ltrb(points[None], ltrb), points, torch.full((6,), 8.0)


def test_foreground_loss_outside_the_prior_costs_1e8_and_the_match_is_the_minimum():
    logits, boxes, points, strides = _line_outputs()
    # GT 0, x in [0, 30]: the 1.5-stride region around x = 15, [3, 27], holds points 4, 12, 20 (y = 12 inside);
    # GT 1, x in [14, 46]: [18, 42] around x = 30 holds 20, 28, 36.
    tgt = _target([[0.0, 4.0, 30.0, 20.0], [14.0, 6.0, 46.0, 18.0]], [1, 0])
    assigner = ForegroundLossAssigner()
    cost, in_prior = assigner.cost(logits[0], boxes[0], points, strides, tgt["boxes"], tgt["labels"])
    assert in_prior.tolist() == [[True, True, True, False, False, False], [False, False, True, True, True, False]]
    assert torch.all(cost[~in_prior] == INFEASIBLE_COST)
    torch.testing.assert_close(cost[in_prior], foreground_loss_cost(logits[0], boxes[0], tgt["boxes"],
                                                                    tgt["labels"])[in_prior])
    best = min(((cost[0, a] + cost[1, b]).item(), a, b) for a in range(6) for b in range(6) if a != b)
    out = assigner(logits, boxes, points, strides, [tgt], num_classes=2)
    assert out.gt_index[0].tolist() == [{best[1]: 0, best[2]: 1}.get(r, -1) for r in range(6)]


def test_foreground_loss_drops_a_gt_without_prior_points_unless_keep_infeasible():
    logits, boxes, points, strides = _line_outputs()
    # GT 1 [40, 20, 43, 30] contains no point strictly (y = 12 is outside): its whole row costs 1e8.
    tgt = _target([[0.0, 4.0, 30.0, 20.0], [40.0, 20.0, 43.0, 30.0]], [1, 0])
    dropped = ForegroundLossAssigner()(logits, boxes, points, strides, [tgt], num_classes=2)
    assert dropped.num_pos.item() == 1 and set(dropped.gt_index[0].tolist()) == {-1, 0}
    kept = ForegroundLossAssigner(keep_infeasible=True)(logits, boxes, points, strides, [tgt], num_classes=2)
    assert kept.num_pos.item() == 2 and set(kept.gt_index[0].tolist()) == {-1, 0, 1}


@pytest.mark.parametrize("case", fixture_cases("loss"), ids=lambda c: f"{c['size']}")
def test_foreground_loss_matches_the_official_code(case):
    points, strides, _, _ = _pyramid(*case["size"])
    logits = torch.tensor(case["logits"])
    boxes = decode_ltrb(points[None], torch.tensor(case["ltrb"]))
    for keep in (True, False):  # every GT of the fixture has prior points: nothing is infeasible
        out = ForegroundLossAssigner(keep_infeasible=keep)(logits, boxes, points, strides, case["targets"],
                                                          case["num_classes"])
        assert_matches_official(out, case)
