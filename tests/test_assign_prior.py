"""Shared assignment primitives: center prior, inside-box test, POTO quality (specs/dense.md 1.8.2, 2.8.4, 2.8.5)."""

import pytest
import torch

from e2edet.assign.prior import center_prior, inside_box, pairwise_ltrb, poto_quality, quality_matrix


def test_pairwise_ltrb_values():
    points = torch.tensor([[10.0, 20.0], [0.0, 0.0]])
    boxes = torch.tensor([[4.0, 6.0, 30.0, 50.0]])
    d = pairwise_ltrb(points, boxes)
    assert d.shape == (1, 2, 4)
    assert torch.equal(d[0, 0], torch.tensor([6.0, 14.0, 20.0, 30.0]))
    assert torch.equal(d[0, 1], torch.tensor([-4.0, -6.0, 30.0, 50.0]))


def test_inside_box_is_strict():
    box = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    points = torch.tensor([[15.0, 15.0], [10.0, 15.0], [20.0, 15.0], [15.0, 10.0], [15.0, 20.0], [10.01, 19.99]])
    assert inside_box(points, box).tolist() == [[True, False, False, False, False, True]]


def test_radius_zero_means_strictly_inside_box():
    torch.manual_seed(0)
    points = torch.rand(50, 2) * 64
    strides = torch.full((50,), 8.0)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 30.0], [12.0, 0.0, 20.0, 64.0]])
    assert torch.equal(center_prior(points, strides, boxes, radius=0.0), inside_box(points, boxes))
    on_edge = torch.tensor([[5.0, 10.0], [40.0, 10.0]])
    assert not center_prior(on_edge, strides[:2], boxes[:1], radius=0.0).any()


def test_center_prior_boundary_is_out():
    # GT centre (24, 24); stride 8, radius 1.5 -> region [12, 36] (inside the box [8, 40]).
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    points = torch.tensor([[12.0, 24.0], [36.0, 24.0], [24.0, 12.0], [24.0, 36.0], [12.001, 24.0], [35.999, 35.999]])
    strides = torch.full((6,), 8.0)
    assert center_prior(points, strides, box, 1.5).tolist() == [[False, False, False, False, True, True]]


def test_center_prior_is_clipped_to_the_box():
    # Thin box: the 1.5-stride square is larger than the box in x, so the box edge is the limit.
    box = torch.tensor([[20.0, 0.0, 28.0, 64.0]])
    points = torch.tensor([[20.0, 32.0], [21.0, 32.0], [27.0, 32.0], [28.0, 32.0]])
    strides = torch.full((4,), 16.0)
    assert center_prior(points, strides, box, 1.5).tolist() == [[False, True, True, False]]


def test_center_prior_several_levels_use_their_own_stride():
    # Property 2.8.5: max(cx - 1.5 s, x1) < x < min(cx + 1.5 s, x2); a point at distance 12 from the centre is
    # on the boundary for s = 8 but inside for s = 16; one GT has in-region points on both levels.
    box = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    points = torch.tensor([[20.0, 32.0], [20.0, 32.0], [44.0, 44.0], [44.0, 44.0], [8.0, 32.0], [8.0, 32.0]])
    strides = torch.tensor([8.0, 16.0, 8.0, 16.0, 8.0, 16.0])
    assert center_prior(points, strides, box, 1.5).tolist() == [[False, True, False, True, False, False]]


def test_center_prior_matches_explicit_formula():
    torch.manual_seed(1)
    points = torch.randint(0, 64, (200, 2)).float()
    strides = torch.tensor([8.0, 16.0, 32.0])[torch.randint(0, 3, (200,))]
    xy = torch.randint(0, 40, (5, 2)).float()
    boxes = torch.cat((xy, xy + torch.randint(1, 30, (5, 2)).float()), 1)
    got = center_prior(points, strides, boxes, 1.5)
    for g in range(5):
        cx, cy = (boxes[g, 0] + boxes[g, 2]) / 2, (boxes[g, 1] + boxes[g, 3]) / 2
        for r in range(200):
            s = 1.5 * strides[r]
            x, y = points[r]
            inside = (max(cx - s, boxes[g, 0]) < x < min(cx + s, boxes[g, 2])) and (
                max(cy - s, boxes[g, 1]) < y < min(cy + s, boxes[g, 3])
            )
            assert bool(got[g, r]) == bool(inside)


def test_center_prior_custom_centers():
    box = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    points = torch.tensor([[10.0, 10.0], [32.0, 32.0]])
    strides = torch.full((2,), 8.0)
    assert center_prior(points, strides, box, 1.5).tolist() == [[False, True]]
    centers = torch.tensor([[8.0, 8.0]])
    assert center_prior(points, strides, box, 1.5, centers=centers).tolist() == [[True, False]]


@pytest.mark.parametrize(
    "p, iou, expected",
    [(0.5, 0.5, 0.5), (1.0, 0.5, 0.5743), (0.01, 0.9, 0.3659), (0.25, 0.64, 0.5303)],
)
def test_poto_quality_values(p, iou, expected):
    q = poto_quality(torch.tensor([[p]]), torch.tensor([[iou]]), alpha=0.8)
    assert q.item() == pytest.approx(expected, abs=1e-4)


def test_poto_quality_alpha_extremes_and_zeros():
    prob = torch.tensor([[0.0, 0.3, 0.9, 1.0]])
    iou = torch.tensor([[0.7, 0.0, 0.2, 1.0]])
    assert torch.allclose(poto_quality(prob, iou, alpha=1.0), iou)
    assert torch.allclose(poto_quality(prob, iou, alpha=0.0), prob)
    q = poto_quality(prob, iou, alpha=0.8)
    assert q[0, 0] == 0 and q[0, 1] == 0 and q[0, 3] == 1
    nan_q = poto_quality(torch.tensor([[0.5]]), torch.tensor([[float("nan")]]))
    assert nan_q.item() == 0.0


def test_quality_matrix_uses_gt_class_and_plain_iou():
    scores = torch.tensor([[0.2, 0.8], [0.5, 0.1]])
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 10.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    labels = torch.tensor([1, 0])
    q = quality_matrix(scores, pred, gt, labels, alpha=0.8)
    assert q.shape == (2, 2) and q.dtype == torch.float32
    assert q[0, 0].item() == pytest.approx(0.8**0.2)
    assert q[0, 1].item() == pytest.approx(0.1**0.2 * 0.5**0.8)
    assert torch.all(q[1] == 0)  # disjoint boxes: IoU 0 (GIoU would be negative)
