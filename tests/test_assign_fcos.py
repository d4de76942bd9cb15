"""FCOS one-to-many assignment (specs/dense.md 1.3, 1.8.2-1.8.5)."""

import math

import pytest
import torch

from e2edet.assign.base import DenseAssignment, assignment_from_gt_index
from e2edet.assign.fcos import FCOSAssigner
from e2edet.ops.boxes import centerness_target, encode_ltrb
from e2edet.models.dense.points import anchor_points


def _pyramid(size=64, strides=(8, 16)):
    """Anchor points of a small square pyramid (the model's own point generator, tested in test_models_points_box)."""
    points, stride, level, counts = anchor_points([(size // s, size // s) for s in strides], list(strides))
    return points, stride, level


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def test_scale_bounds_are_inclusive():
    # The same point on P3 and P4 with m = max(l, t, r, b) = 64 passes both ranges; m = 64.5 only P4.
    points = torch.tensor([[64.0, 64.0], [64.0, 64.0], [63.5, 64.0], [63.5, 64.0]])
    strides = torch.tensor([8.0, 16.0, 8.0, 16.0])
    levels = torch.tensor([0, 1, 0, 1])
    tgt = _target([[0.0, 0.0, 128.0, 128.0]], [2])
    out = FCOSAssigner(center_radius=0.0)(points, strides, levels, [tgt], num_classes=3)
    assert out.pos_mask[0].tolist() == [True, True, False, True]
    assert out.labels[0].tolist() == [2, 2, 3, 2]


def test_smaller_area_wins():
    points = torch.tensor([[20.0, 20.0], [4.0, 4.0]])
    strides = torch.tensor([8.0, 8.0])
    levels = torch.tensor([0, 0])
    tgt = _target([[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 30.0, 30.0]], [0, 1])
    out = FCOSAssigner(center_radius=0.0)(points, strides, levels, [tgt], num_classes=2)
    assert out.gt_index[0].tolist() == [1, 0]
    assert out.labels[0].tolist() == [1, 0]
    # Swapping the GT order does not change the winner.
    tgt2 = _target([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 40.0, 40.0]], [1, 0])
    out2 = FCOSAssigner(center_radius=0.0)(points, strides, levels, [tgt2], num_classes=2)
    assert out2.gt_index[0].tolist() == [0, 1] and out2.labels[0].tolist() == [1, 0]


def test_hand_case_on_two_level_pyramid():
    # GT [0, 0, 32, 32]: centre (16, 16). P3 region [4, 28] -> x, y in {12, 20} (4 and 28 lie on the boundary).
    # P4 region [-8, 40] clipped to the box -> x, y in {8, 24}, but m = 24 is outside P4's range [64, 128].
    points, strides, levels = _pyramid()
    tgt = _target([[0.0, 0.0, 32.0, 32.0]], [0])
    out = FCOSAssigner()(points, strides, levels, [tgt], num_classes=1)
    pos_points = points[out.pos_mask[0]].tolist()
    assert sorted(map(tuple, pos_points)) == [(12.0, 12.0), (12.0, 20.0), (20.0, 12.0), (20.0, 20.0)]
    assert out.labels.shape == (1, points.shape[0]) and out.labels.dtype == torch.int64
    assert torch.all(out.labels[0][~out.pos_mask[0]] == 1)
    ctr = centerness_target(encode_ltrb(points[out.pos_mask[0]], out.box_targets[0][out.pos_mask[0]]))
    assert torch.allclose(ctr, torch.full((4,), 0.6))


def test_targets_on_positives_only():
    points, strides, levels = _pyramid()
    tgts = [
        _target([[4.0, 6.0, 50.0, 40.0], [30.0, 30.0, 60.0, 62.0]], [1, 0]),
        _target([], []),
    ]
    out = FCOSAssigner()(points, strides, levels, tgts, num_classes=2)
    assert isinstance(out, DenseAssignment)
    assert out.box_targets.shape == (2, points.shape[0], 4) and out.box_targets.dtype == torch.float32
    for b, tgt in enumerate(tgts):
        pos = out.pos_mask[b]
        assert torch.equal(pos, out.labels[b] != 2)
        assert torch.equal(pos, out.gt_index[b] >= 0)
        assert torch.all(out.box_targets[b][~pos] == 0)
        if pos.any():
            matched = tgt["boxes"][out.gt_index[b][pos]]
            assert torch.equal(out.box_targets[b][pos], matched)
            x, y = points[pos, 0], points[pos, 1]
            ltrb = torch.stack((x - matched[:, 0], y - matched[:, 1], matched[:, 2] - x, matched[:, 3] - y), 1)
            assert torch.all(ltrb > 0)
    assert out.pos_mask[0].sum() > 0 and not out.pos_mask[1].any()


def test_centerness_target_center_and_edge():
    box = torch.tensor([[0.0, 0.0, 20.0, 10.0]])
    pts = torch.tensor([[10.0, 5.0], [0.0, 5.0], [10.0, 10.0], [5.0, 5.0], [-3.0, 5.0]])
    ctr = centerness_target(encode_ltrb(pts, box.expand(5, 4)))
    assert ctr[0].item() == pytest.approx(1.0)
    assert ctr[1].item() == 0.0 and ctr[2].item() == 0.0
    assert ctr[3].item() == pytest.approx(math.sqrt(5.0 / 15.0))
    assert ctr[4].item() == 0.0


def test_unknown_level_raises():
    with pytest.raises(ValueError):
        FCOSAssigner(scale_ranges=((-1, 64),))(
            torch.tensor([[4.0, 4.0]]), torch.tensor([16.0]), torch.tensor([1]), [_target([], [])], 1
        )


def test_assignment_from_gt_index_and_one_hot():
    tgt = _target([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 9.0, 9.0]], [2, 0])
    gt_index = torch.tensor([[0, -1, -1, 1, -1], [-1] * 5])
    out = assignment_from_gt_index(gt_index, [tgt, _target([], [])], num_classes=3)
    assert out.labels.tolist() == [[2, 3, 3, 0, 3], [3] * 5]
    assert out.gt_index.tolist() == [[0, -1, -1, 1, -1], [-1] * 5]
    assert out.box_targets[0, 3].tolist() == [1.0, 1.0, 9.0, 9.0]
    assert out.num_pos.item() == 2
    onehot = out.one_hot(3)
    assert onehot.shape == (2, 5, 3) and onehot.sum().item() == 2 and onehot[0, 0, 2] == 1 and onehot[0, 3, 0] == 1
