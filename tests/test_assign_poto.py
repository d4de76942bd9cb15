"""POTO one-to-one assignment, Hungarian and argmax (specs/dense.md 2.3, 2.8.1-2.8.3, 2.8.6-2.8.8, 2.9).

Hand-made fixture ("Design notes for one codebase"): a 2-level pyramid (strides 8, 16) on a 64x64 image,
R = 64 + 16 = 80 points, with GT A = [8, 8, 40, 40] (class 0) and GT B = [16, 16, 32, 32] (class 1) sharing the
centre (24, 24), and a tiny 6x6 GT C = [45, 1, 51, 7] (class 2) with no anchor point inside its box. A and B have
the same 5 in-prior points: P3 (20, 20), (28, 20), (20, 28), (28, 28) = indices 18, 19, 26, 27 and P4 (24, 24) =
index 69. All scores are 0.5; every point predicts a 2x2 box around itself except point 69 ([10, 10, 38, 38]:
IoU 0.766 with A, 0.327 with B) and point 27 ([22, 22, 30, 30]: IoU 0.0625 with A, 0.25 with B).
"""

import itertools

import pytest
import torch

from e2edet.assign.poto import POTOAssigner

A, B, C = [8.0, 8.0, 40.0, 40.0], [16.0, 16.0, 32.0, 32.0], [45.0, 1.0, 51.0, 7.0]
IN_PRIOR_AB = {18, 19, 26, 27, 69}


def _pyramid(size=64, strides=(8, 16)):
    points, stride = [], []
    for s in strides:
        n = size // s
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        points.append(torch.stack(((xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s), 1).float())
        stride.append(torch.full((n * n,), float(s)))
    return torch.cat(points), torch.cat(stride)


def _fixture(with_tiny=True):
    points, strides = _pyramid()
    boxes = torch.cat((points - 1, points + 1), 1)
    boxes[69] = torch.tensor([10.0, 10.0, 38.0, 38.0])
    boxes[27] = torch.tensor([22.0, 22.0, 30.0, 30.0])
    scores = torch.full((1, points.shape[0], 3), 0.5)
    gts = [A, B, C] if with_tiny else [A, B]
    target = {"boxes": torch.tensor(gts), "labels": torch.tensor([0, 1, 2][: len(gts)])}
    return scores, boxes[None], points, strides, target


def _random_case(gen, num_gt, size=64):
    points, strides = _pyramid(size)
    r = points.shape[0]
    centre = 16 + torch.rand(num_gt, 2, generator=gen) * (size - 32)
    half = 8 + torch.rand(num_gt, 2, generator=gen) * 8
    gt = torch.cat((centre - half, centre + half), 1)
    ltrb = 2 + torch.rand(r, 4, generator=gen) * 20
    boxes = torch.cat((points - ltrb[:, :2], points + ltrb[:, 2:]), 1)
    scores = torch.rand(1, r, 4, generator=gen)
    target = {"boxes": gt, "labels": torch.randint(0, 4, (num_gt,), generator=gen)}
    return scores, boxes[None], points, strides, target


def test_fixture_quality_by_hand():
    scores, boxes, points, strides, target = _fixture()
    q, in_prior = POTOAssigner().quality(scores[0], boxes[0], points, strides, target["boxes"], target["labels"])
    assert q.shape == (3, 80)
    assert set(torch.nonzero(in_prior[0]).flatten().tolist()) == IN_PRIOR_AB
    assert set(torch.nonzero(in_prior[1]).flatten().tolist()) == IN_PRIOR_AB
    assert not in_prior[2].any()  # tiny GT: empty prior
    assert torch.all(q[~in_prior] == -1)
    assert q[0, 69].item() == pytest.approx(0.5**0.2 * (784 / 1024) ** 0.8, rel=1e-5)
    assert q[1, 69].item() == pytest.approx(0.5**0.2 * (256 / 784) ** 0.8, rel=1e-5)
    assert q[1, 27].item() == pytest.approx(0.5**0.2 * 0.25**0.8, rel=1e-5)


def test_fixture_hungarian_vs_argmax():
    scores, boxes, points, strides, target = _fixture()
    hun = POTOAssigner(mode="hungarian")(scores, boxes, points, strides, [target], num_classes=3)
    arg = POTOAssigner(mode="argmax")(scores, boxes, points, strides, [target], num_classes=3)
    # Hungarian: A keeps point 69, B moves to its next best point 27; the tiny GT C is dropped.
    assert torch.nonzero(hun.pos_mask[0]).flatten().tolist() == [27, 69]
    assert hun.gt_index[0, 69].item() == 0 and hun.gt_index[0, 27].item() == 1
    assert hun.labels[0, 69].item() == 0 and hun.labels[0, 27].item() == 1
    # Argmax: A and B both pick 69; A has the higher quality and keeps it; B and C get nothing.
    assert torch.nonzero(arg.pos_mask[0]).flatten().tolist() == [69]
    assert arg.gt_index[0, 69].item() == 0


def test_infeasible_hungarian_matches_dropped_by_default_kept_on_request():
    scores, boxes, points, strides, target = _fixture()
    dropped = POTOAssigner()(scores, boxes, points, strides, [target], num_classes=3)
    assert not (dropped.gt_index == 2).any() and dropped.num_pos.item() == 2
    kept = POTOAssigner(keep_infeasible=True)(scores, boxes, points, strides, [target], num_classes=3)
    assert kept.num_pos.item() == 3  # official DeFCN: every GT gets a point
    j = torch.nonzero(kept.gt_index[0] == 2).flatten()
    assert j.numel() == 1
    x, y = points[j[0]].tolist()
    assert not (45 < x < 51 and 1 < y < 7)  # the forced point is not even inside the GT box
    assert kept.labels[0, j[0]].item() == 2 and kept.box_targets[0, j[0]].tolist() == C


def test_competition_for_a_single_point():
    # Only one in-prior point shared by two GTs: Hungarian gives it to one GT and drops the other's forced match.
    points = torch.tensor([[24.0, 24.0], [4.0, 4.0], [60.0, 60.0]])
    strides = torch.tensor([16.0, 8.0, 8.0])
    boxes = torch.tensor([[[10.0, 10.0, 38.0, 38.0], [3.0, 3.0, 5.0, 5.0], [59.0, 59.0, 61.0, 61.0]]])
    scores = torch.full((1, 3, 2), 0.5)
    target = {"boxes": torch.tensor([A, B]), "labels": torch.tensor([0, 1])}
    out = POTOAssigner()(scores, boxes, points, strides, [target], num_classes=2)
    assert out.gt_index[0].tolist() == [0, -1, -1]
    kept = POTOAssigner(keep_infeasible=True)(scores, boxes, points, strides, [target], num_classes=2)
    assert kept.num_pos.item() == 2 and kept.gt_index[0, 0].item() == 0


def test_hungarian_exactly_one_point_per_gt():
    gen = torch.Generator().manual_seed(0)
    for num_gt in (1, 3, 6):
        scores, boxes, points, strides, target = _random_case(gen, num_gt)
        for keep in (False, True):
            out = POTOAssigner(keep_infeasible=keep)(scores, boxes, points, strides, [target], num_classes=4)
            idx = out.gt_index[0][out.pos_mask[0]]
            assert sorted(idx.tolist()) == list(range(num_gt))  # G distinct points, each GT once


@pytest.mark.parametrize("seed", range(16))
def test_hungarian_optimum_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    num_points = int(torch.randint(3, 8, (1,), generator=gen))
    num_gt = int(torch.randint(1, 4, (1,), generator=gen))
    points = torch.rand(num_points, 2, generator=gen) * 32
    strides = torch.tensor([8.0, 16.0])[torch.randint(0, 2, (num_points,), generator=gen)]
    xy = torch.rand(num_gt, 2, generator=gen) * 16
    gt = torch.cat((xy, xy + 8 + torch.rand(num_gt, 2, generator=gen) * 16), 1)
    ltrb = 1 + torch.rand(num_points, 4, generator=gen) * 12
    boxes = torch.cat((points - ltrb[:, :2], points + ltrb[:, 2:]), 1)[None]
    scores = torch.rand(1, num_points, 2, generator=gen)
    target = {"boxes": gt, "labels": torch.randint(0, 2, (num_gt,), generator=gen)}
    poto = POTOAssigner(keep_infeasible=True)
    q, in_prior = poto.quality(scores[0], boxes[0], points, strides, gt, target["labels"])
    out = poto(scores, boxes, points, strides, [target], num_classes=2)
    pos = torch.nonzero(out.pos_mask[0]).flatten()
    total = q[out.gt_index[0, pos], pos].sum().item()
    perms = list(itertools.permutations(range(num_points), num_gt))
    best = max(sum(q[i, p[i]].item() for i in range(num_gt)) for p in perms)
    assert total == pytest.approx(best, abs=1e-5)
    # 2.8.3: when a perfect matching of in-prior points exists, the solver never uses a Q = -1 entry.
    if any(all(in_prior[i, p[i]] for i in range(num_gt)) for p in perms):
        assert torch.all(in_prior[out.gt_index[0, pos], pos])


def test_only_positives_get_targets():
    gen = torch.Generator().manual_seed(3)
    cases = [_random_case(gen, 4), _random_case(gen, 2)]
    scores = torch.cat([c[0] for c in cases])
    boxes = torch.cat([c[1] for c in cases])
    points, strides = cases[0][2], cases[0][3]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    targets = [cases[0][4], cases[1][4]]
    for mode in ("hungarian", "argmax"):
        out = POTOAssigner(mode=mode)(scores, boxes, points, strides, targets, num_classes=4)
        for b, tgt in enumerate(targets):
            pos = out.pos_mask[b]
            assert torch.all(out.labels[b][~pos] == 4) and torch.all(out.box_targets[b][~pos] == 0)
            matched = tgt["boxes"][out.gt_index[b][pos]]
            assert torch.equal(out.box_targets[b][pos], matched)
            assert torch.equal(out.labels[b][pos], tgt["labels"][out.gt_index[b][pos]])
            x, y = points[pos, 0], points[pos, 1]
            ltrb = torch.stack((x - matched[:, 0], y - matched[:, 1], matched[:, 2] - x, matched[:, 3] - y), 1)
            assert torch.all(ltrb > 0)  # inside the prior, hence inside the box
        none = POTOAssigner(mode=mode)(scores[:1], boxes[:1], points, strides, [empty], num_classes=4)
        assert not none.pos_mask.any() and torch.all(none.labels == 4) and torch.all(none.gt_index == -1)


def test_argmax_properties():
    gen = torch.Generator().manual_seed(5)
    for num_gt in (2, 5, 8):
        scores, boxes, points, strides, target = _random_case(gen, num_gt)
        poto = POTOAssigner(mode="argmax")
        out = poto(scores, boxes, points, strides, [target], num_classes=4)
        q, _ = poto.quality(scores[0], boxes[0], points, strides, target["boxes"], target["labels"])
        pos = torch.nonzero(out.pos_mask[0]).flatten()
        assert pos.numel() <= num_gt
        gts = out.gt_index[0, pos]
        assert len(set(gts.tolist())) == pos.numel()  # one point per GT and one GT per point
        assert torch.equal(q[gts].argmax(dim=1), pos)  # each positive is its GT's argmax
        for i in set(range(num_gt)) - set(gts.tolist()):  # a GT without positive lost its argmax point
            j = q[i].argmax()
            assert q[i, j] == -1 or (out.pos_mask[0, j] and q[out.gt_index[0, j], j] >= q[i, j])


@pytest.mark.parametrize("mode", ["hungarian", "argmax"])
def test_constant_filter_does_not_change_the_assignment(mode):
    gen = torch.Generator().manual_seed(11)
    scores, boxes, points, strides, target = _random_case(gen, 4)
    poto = POTOAssigner(mode=mode)
    ref = poto(scores, boxes, points, strides, [target], num_classes=4)
    scaled = poto(scores * torch.sigmoid(torch.tensor(-1.3)), boxes, points, strides, [target], num_classes=4)
    assert torch.equal(ref.gt_index, scaled.gt_index)
    # on the hand fixture too (with the infeasible tiny GT)
    f_scores, f_boxes, f_points, f_strides, f_target = _fixture()
    a = poto(f_scores, f_boxes, f_points, f_strides, [f_target], num_classes=3)
    b = poto(f_scores * 0.3, f_boxes, f_points, f_strides, [f_target], num_classes=3)
    assert torch.equal(a.gt_index, b.gt_index)


def test_unknown_mode_raises():
    with pytest.raises(ValueError):
        POTOAssigner(mode="greedy")
