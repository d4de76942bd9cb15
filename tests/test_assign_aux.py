"""DeFCN auxiliary one-to-many assignment (specs/dense.md 2.3 Aux, 2.8.14, 2.9 empty images)."""

import pytest
import torch

from e2edet.assign.auxiliary import AuxAssigner
from e2edet.assign.prior import inside_box, quality_matrix
from e2edet.models.dense.points import anchor_points


def _pyramid(size=64, strides=(8, 16, 32)):
    """Anchor points of a small square pyramid (the model's own point generator)."""
    points, _, levels, counts = anchor_points([(size // s, size // s) for s in strides], list(strides))
    return points, levels, counts


def test_hand_threshold_mean_plus_unbiased_std():
    # One level of 4 points, every prediction equals the GT box (IoU 1), so Q = p^0.2. With top-3 candidates
    # Q = (0.9, 0.5, 0.4): thr = 0.6 + 0.2646 = 0.8646, only the best point passes.
    points = torch.tensor([[5.0, 5.0], [6.0, 6.0], [7.0, 7.0], [8.0, 8.0]])
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    q = torch.tensor([0.9, 0.5, 0.4, 0.2])
    cls_prob = (q**5).reshape(1, 4, 1)
    boxes = gt.expand(1, 4, 4)
    target = {"boxes": gt, "labels": torch.tensor([0])}
    out = AuxAssigner(topk=3)(cls_prob, boxes, points, [4], [target], num_classes=1)
    assert out.pos_mask[0].tolist() == [True, False, False, False]
    # Same, but the best point lies outside the GT box: the GT ends with no positive.
    outside = points.clone()
    outside[0] = torch.tensor([25.0, 5.0])
    out2 = AuxAssigner(topk=3)(cls_prob, boxes, outside, [4], [target], num_classes=1)
    assert not out2.pos_mask.any()
    # topk=1 on one level: a single candidate, std taken as 0, the candidate is its own threshold.
    out3 = AuxAssigner(topk=1)(cls_prob, boxes, points, [4], [target], num_classes=1)
    assert out3.pos_mask[0].tolist() == [True, False, False, False]


def test_aux_properties_on_random_predictions():
    gen = torch.Generator().manual_seed(0)
    points, levels, counts = _pyramid()
    r, k = points.shape[0], 3
    gts = torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 8.0, 34.0, 28.0], [30.0, 20.0, 62.0, 60.0], [45.0, 1, 51, 7]])
    labels = torch.tensor([0, 1, 2, 0])
    ltrb = 2 + torch.rand(2, r, 4, generator=gen) * 24
    boxes = torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), -1)
    cls_prob = torch.rand(2, r, k, generator=gen)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    targets = [{"boxes": gts, "labels": labels}, empty]
    topk = 9
    out = AuxAssigner(topk=topk)(cls_prob, boxes, points, counts, targets, num_classes=k)

    q = quality_matrix(cls_prob[0], boxes[0], gts, labels, 0.8)
    inside = inside_box(points, gts)
    for i in range(gts.shape[0]):
        cand = []
        start = 0
        for n in counts:
            cand += (q[i, start : start + n].topk(min(topk, n)).indices + start).tolist()
            start += n
        assert len(cand) <= topk * len(counts)
        thr = q[i, cand].mean() + q[i, cand].std()
        mine = torch.nonzero(out.gt_index[0] == i).flatten().tolist()
        assert set(mine) <= set(cand)
        assert all(inside[i, j] and q[i, j] >= thr for j in mine)
        # every candidate that passes both tests is positive for some GT with at least its quality
        for j in cand:
            if inside[i, j] and q[i, j] >= thr:
                w = out.gt_index[0, j]
                assert w >= 0 and q[w, j] >= q[i, j]
    assert not (out.gt_index[0] == 3).any()  # tiny GT: no point inside its box -> zero positives
    assert out.pos_mask[0].sum() > 0
    assert not out.pos_mask[1].any() and torch.all(out.labels[1] == k)
    pos = out.pos_mask[0]
    assert torch.equal(out.labels[0][pos], labels[out.gt_index[0][pos]])
    assert torch.equal(out.box_targets[0][pos], gts[out.gt_index[0][pos]])


def test_conflict_goes_to_highest_quality():
    # Two identical-centre GTs over the same points; predictions equal box B, so B has higher IoU everywhere.
    points = torch.tensor([[20.0, 20.0], [22.0, 22.0], [26.0, 26.0], [28.0, 28.0]])
    gts = torch.tensor([[8.0, 8.0, 40.0, 40.0], [16.0, 16.0, 32.0, 32.0]])
    boxes = gts[1].expand(1, 4, 4)
    cls_prob = torch.tensor([0.9, 0.1, 0.1, 0.1]).reshape(1, 4, 1).expand(1, 4, 2).contiguous()
    target = {"boxes": gts, "labels": torch.tensor([0, 1])}
    out = AuxAssigner(topk=4)(cls_prob, boxes, points, [4], [target], 2)
    q = quality_matrix(cls_prob[0], boxes[0], gts, target["labels"], 0.8)
    both = AuxAssigner(topk=4).positives(q, points, gts, [4])
    assert both[:, 0].all()  # point 0 is positive for both GTs
    assert out.gt_index[0, 0].item() == 1 and out.labels[0, 0].item() == 1


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        AuxAssigner()(torch.rand(1, 4, 1), torch.rand(1, 4, 4), torch.rand(4, 2), [3], [{}], 1)
    with pytest.raises(ValueError):
        AuxAssigner(topk=0)
