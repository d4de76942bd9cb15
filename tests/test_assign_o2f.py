"""O2F one-to-few assignment (specs/dense.md 3.3, 3.8.1-3.8.6, 3.8.10, 3.9).

Hand-made fixture (spec "Design notes for one codebase"): 2-level pyramid (strides 8, 16) on a 64x64 image,
R = 64 + 16 = 80 points (P3 index 8·row + col at ((col+.5)·8, (row+.5)·8); P4 index 64 + 4·row + col),
K = 4 classes.
GTs: A = [8, 8, 40, 40] (class 0) and B = [16, 16, 32, 32] (class 1) share the centre (24, 24) and the 5 in-prior
points 18, 19, 26, 27 (P3) and 69 (P4); C = [45, 1, 51, 7] (class 2) is a 6x6 box whose 1.5-stride center region holds
no point; D = [0, 40, 64, 64] (class 3) has 8 in-prior points 43, 44, 51, 52, 59, 60 (P3), 77, 78 (P4). The joint
probability p = sigmoid(cls)·sigmoid(ctr) is 0.9 everywhere except at the points below; predicted boxes are 2x2 around
their point except:

  point  box                 IoU(A)   IoU(B)   p(A)  p(B)   Q(A)    Q(B)   -> owner
  69     [10, 10, 38, 38]    .7656    .3265    .5    .5     .7031   .3556  A (certain of A)
  18     [8, 8, 32, 32]      .5625    .4444    .4    .4     .5254   .4352  A (soft)
  19     [16, 16, 40, 40]    .5625    .4444    .2    .6     .4574   .4719  B (certain of B: p matters)
  26     [22, 22, 30, 30]    .0625    .25      .3    .3     .0855   .2593  B (soft, s = t)
  27     [20, 20, 28, 28]    .0625    .25      .3    .1     .0855   .2081  B (soft, s = t·0.1/0.3)

D: boxes [0, 40, 64, 64 - h] (IoU (24 - h)/24) at 43 (h 0, p .2), 44 (3, .5), 51 (6, .8), 52 (9, .4), 59 (12, .6),
77 (18, .7); points 60 (p .9) and 78 (p .85) predict boxes far away (IoU 0), so k_D = min(7, 6) = 6.
Q order: 44 (.7823), 51 (.7597), 43 (.7248), 52 (.5716), 59 (.5186), 77 (.3072). Certain = 44 (neither the
highest IoU, 43, nor the highest p, 51); soft targets t·p/0.8 (51 has the largest soft p): 51 t, 43 t/4,
52 t/2, 59 3t/4, 77 7t/8.
"""

from __future__ import annotations

import math

import pytest
import torch

from e2edet.assign.o2f import O2FAssigner, soft_target_scale
from e2edet.assign.poto import POTOAssigner
from e2edet.models.dense.points import anchor_points

A, B, C, D = [8.0, 8.0, 40.0, 40.0], [16.0, 16.0, 32.0, 32.0], [45.0, 1.0, 51.0, 7.0], [0.0, 40.0, 64.0, 64.0]
PRIOR_AB, PRIOR_D = {18, 19, 26, 27, 69}, {43, 44, 51, 52, 59, 60, 77, 78}
D_POINTS = [(43, 0, 0.2), (44, 3, 0.5), (51, 6, 0.8), (52, 9, 0.4), (59, 12, 0.6), (77, 18, 0.7)]


def expected_fixture(t: float) -> dict[int, tuple[int, float, float]]:
    """Hand-derived O2F result of the fixture with topk 7: point -> (GT index, soft target, weight)."""
    return {69: (0, 1.0, 1.0), 18: (0, t, 0.4),
            19: (1, 1.0, 1.0), 26: (1, t, 0.4), 27: (1, t / 3, 0.4),
            44: (3, 1.0, 1.0), 51: (3, t, 0.4), 43: (3, t / 4, 0.4), 52: (3, t / 2, 0.4), 59: (3, 0.75 * t, 0.4),
            77: (3, 0.875 * t, 0.4)}


def pyramid():
    points, strides, _, _ = anchor_points([(8, 8), (4, 4)], [8, 16])
    return points, strides


def fixture(gts: str = "ABCD"):
    """(prob [1, 80, 4], pred_boxes [1, 80, 4], points, strides, target) of the fixture restricted to ``gts``."""
    points, strides = pyramid()
    boxes = torch.cat((points - 1, points + 1), 1)
    prob = torch.full((80, 4), 0.9)
    for j, box, pa, pb in [(69, [10, 10, 38, 38], .5, .5), (18, [8, 8, 32, 32], .4, .4),
                           (19, [16, 16, 40, 40], .2, .6), (26, [22, 22, 30, 30], .3, .3),
                           (27, [20, 20, 28, 28], .3, .1)]:
        boxes[j] = torch.tensor(box, dtype=torch.float32)
        prob[j, 0], prob[j, 1] = pa, pb
    for j, h, p in D_POINTS:
        boxes[j] = torch.tensor([0.0, 40.0, 64.0, 64.0 - h])
        prob[j, 3] = p
    boxes[60], boxes[78] = torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([60.0, 0.0, 62.0, 2.0])
    prob[78, 3] = 0.85
    all_boxes = dict(zip("ABCD", (A, B, C, D)))
    target = {"boxes": torch.tensor([all_boxes[g] for g in gts]).reshape(-1, 4),
              "labels": torch.tensor(["ABCD".index(g) for g in gts], dtype=torch.int64)}
    return prob[None], boxes[None], points, strides, target


def as_dict(out, b=0) -> dict[int, tuple[int, float, float]]:
    pos = torch.nonzero(out.pos_mask[b]).flatten().tolist()
    return {j: (out.gt_index[b, j].item(), out.soft_targets[b, j].item(), out.weights[b, j].item()) for j in pos}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for j, (g, s, w) in want.items():
        assert got[j][0] == g, j
        assert got[j][1] == pytest.approx(s, rel=1e-5, abs=1e-6), j
        assert got[j][2] == pytest.approx(w, rel=1e-6), j


def q_by_hand(p: float, iou: float) -> float:
    return p ** 0.2 * iou ** 0.8


# --------------------------------------------------------------------------- hand-built fixture


def test_fixture_quality_table_by_hand():
    # the table of the module docstring, recomputed from the areas, so the expected owners below are justified
    iou = {69: (784 / 1024, 256 / 784), 18: (576 / 1024, 256 / 576), 19: (576 / 1024, 256 / 576),
           26: (64 / 1024, 64 / 256), 27: (64 / 1024, 64 / 256)}
    p = {69: (.5, .5), 18: (.4, .4), 19: (.2, .6), 26: (.3, .3), 27: (.3, .1)}
    q = {j: (q_by_hand(p[j][0], iou[j][0]), q_by_hand(p[j][1], iou[j][1])) for j in iou}
    assert [j for j in q if q[j][0] > q[j][1]] == [69, 18]  # A wins 69 and 18, B wins the rest
    assert max(q, key=lambda j: q[j][0]) == 69 and max(q, key=lambda j: q[j][1]) == 19
    qd = {j: q_by_hand(pd, (24 - h) / 24) for j, h, pd in D_POINTS}
    assert sorted(qd, key=qd.get, reverse=True) == [44, 51, 43, 52, 59, 77]


def test_fixture_assignment_by_hand():
    prob, boxes, points, strides, target = fixture()
    out = O2FAssigner()(prob, boxes, points, strides, [target], num_classes=4, epoch=0, max_epoch=12)
    assert_same(as_dict(out), expected_fixture(0.6))
    # labels and full box targets for certain and soft points alike; everything else background
    gt_boxes = [A, B, C, D]
    for j, (g, _, _) in expected_fixture(0.6).items():
        assert out.labels[0, j].item() == g and out.box_targets[0, j].tolist() == gt_boxes[g]
    bg = ~out.pos_mask[0]
    assert torch.all(out.labels[0, bg] == 4) and torch.all(out.box_targets[0, bg] == 0)
    assert torch.all(out.soft_targets[0, bg] == 0) and torch.all(out.weights[0, bg] == 0)


def test_k_is_min_of_topk_and_in_prior_points_with_positive_iou():
    prob, boxes, points, strides, target = fixture("D")
    # 8 in-prior points, 2 of them with IoU 0: k = min(7, 6) = 6
    got = as_dict(O2FAssigner(topk=7)(prob, boxes, points, strides, [target], 4, epoch=0, max_epoch=12))
    assert set(got) == {43, 44, 51, 52, 59, 77}
    got = as_dict(O2FAssigner(topk=20)(prob, boxes, points, strides, [target], 4, epoch=0, max_epoch=12))
    assert set(got) == {43, 44, 51, 52, 59, 77}  # 60 and 78 (IoU 0) never enter, even with a large topk
    # topk 4: the 4 best by Q (not by IoU or p); soft targets renormalised over the remaining soft anchors
    got = as_dict(O2FAssigner(topk=4)(prob, boxes, points, strides, [target], 4, epoch=0, max_epoch=12))
    assert_same(got, {44: (0, 1.0, 1.0), 51: (0, 0.6, 0.4), 43: (0, 0.15, 0.4), 52: (0, 0.3, 0.4)})
    # k counts IoU > 0 but the ranking is by Q: with alpha = 0 (Q = p) the IoU-0 points 60 and 78 have the highest
    # Q and are taken, yet only k = 6 points enter (not 7; 52 and 43 have the lowest p)
    got = as_dict(O2FAssigner(alpha=0.0, topk=7)(prob, boxes, points, strides, [target], 4, epoch=0, max_epoch=12))
    assert_same(got, {60: (0, 1.0, 1.0), 78: (0, 0.6, 0.4), 51: (0, 0.6 * 0.8 / 0.85, 0.4),
                      77: (0, 0.6 * 0.7 / 0.85, 0.4), 59: (0, 0.6 * 0.6 / 0.85, 0.4), 44: (0, 0.6 * 0.5 / 0.85, 0.4)})
    # A alone: the 2x2 boxes of the out-of-prior points inside A overlap A (IoU > 0) but are not counted
    prob, boxes, points, strides, target = fixture("A")
    got = as_dict(O2FAssigner(topk=20)(prob, boxes, points, strides, [target], 4))
    assert set(got) == PRIOR_AB


def test_tiny_gt_without_in_prior_point_gets_no_positive():
    # property 10: no forced match, unlike Hungarian POTO with keep_infeasible
    prob, boxes, points, strides, target = fixture("C")
    out = O2FAssigner()(prob, boxes, points, strides, [target], num_classes=4)
    assert out.num_pos.item() == 0 and torch.all(out.labels == 4)
    forced = POTOAssigner(keep_infeasible=True)(prob, boxes, points, strides, [target], num_classes=4)
    assert forced.num_pos.item() == 1


def test_conflicts_go_to_the_higher_quality_gt():
    prob, boxes, points, strides, target = fixture("AB")
    alone_a = as_dict(O2FAssigner()(*fixture("A")[:4], [fixture("A")[4]], 4))
    alone_b = as_dict(O2FAssigner()(*fixture("B")[:4], [fixture("B")[4]], 4))
    assert set(alone_a) == set(alone_b) == PRIOR_AB  # each alone would take all 5 shared points
    got = as_dict(O2FAssigner()(prob, boxes, points, strides, [target], 4))
    assert {j: g for j, (g, _, _) in got.items()} == {69: 0, 18: 0, 19: 1, 26: 1, 27: 1}
    # A alone: its certain positive is 69 and B's is 19, the argmax of each row (no conflict on the argmax)
    assert [j for j, v in alone_a.items() if v[1] == 1.0] == [69]
    assert [j for j, v in alone_b.items() if v[1] == 1.0] == [19]


def test_a_gt_can_lose_all_its_points():
    # POTO fixture (all p 0.5, 2x2 boxes except 69 and 27): both GTs rank 69 first; with topk 1 A keeps it and B
    # ends with nothing; with topk 2 B keeps its second choice 27 (certain, no soft anchor).
    prob, boxes, points, strides, target = fixture("AB")
    prob = torch.full_like(prob, 0.5)
    boxes[0, [18, 19, 26]] = torch.cat((points[[18, 19, 26]] - 1, points[[18, 19, 26]] + 1), 1)
    boxes[0, 27] = torch.tensor([22.0, 22.0, 30.0, 30.0])
    assert_same(as_dict(O2FAssigner(topk=1)(prob, boxes, points, strides, [target], 4)), {69: (0, 1.0, 1.0)})
    got = as_dict(O2FAssigner(topk=2)(prob, boxes, points, strides, [target], 4))
    assert {j: v[0] for j, v in got.items()} == {69: 0, 27: 1} and got[27][1] == 1.0


def test_soft_targets_use_prob_not_q_and_exclude_the_certain_point():
    prob, boxes, points, strides, target = fixture("AB")
    t = soft_target_scale(6, 12)
    got = as_dict(O2FAssigner()(prob, boxes, points, strides, [target], 4, epoch=6, max_epoch=12))
    # B: certain 19 (p 0.6), soft 26 (p 0.3) and 27 (p 0.1)
    assert got[26][1] == pytest.approx(t, rel=1e-6)
    assert got[27][1] == pytest.approx(t / 3, rel=1e-5)
    assert got[27][1] != pytest.approx(t * 0.1 / 0.6, rel=1e-3)  # max over all kept points (certain included)
    q26, q27 = q_by_hand(0.3, 0.25), q_by_hand(0.1, 0.25)
    assert got[27][1] != pytest.approx(t * q27 / q26, rel=1e-3)  # ratio of Q instead of p


@pytest.mark.parametrize("epoch", [0, 6, 11])
def test_fixture_follows_the_schedule(epoch):
    prob, boxes, points, strides, target = fixture()
    out = O2FAssigner()(prob, boxes, points, strides, [target], 4, epoch=epoch, max_epoch=12)
    assert_same(as_dict(out), expected_fixture(soft_target_scale(epoch, 12)))


def test_topk_one_on_fixture_is_argmax_poto():
    prob, boxes, points, strides, target = fixture()
    out = O2FAssigner(topk=1)(prob, boxes, points, strides, [target], 4, epoch=3, max_epoch=12)
    ref = POTOAssigner(mode="argmax")(prob, boxes, points, strides, [target], 4)
    assert_same(as_dict(out), {69: (0, 1.0, 1.0), 19: (1, 1.0, 1.0), 44: (3, 1.0, 1.0)})
    assert torch.equal(out.gt_index, ref.gt_index) and torch.equal(out.labels, ref.labels)
    assert torch.equal(out.box_targets, ref.box_targets)


# --------------------------------------------------------------------------- random cases vs a loop reference


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _in_region(point, stride, box, radius=1.5) -> bool:
    """Strictly inside the radius-stride square around the box centre, clipped to the box (spec 2.8.5)."""
    x, y = point
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return (max(cx - radius * stride, box[0]) < x < min(cx + radius * stride, box[2])
            and max(cy - radius * stride, box[1]) < y < min(cy + radius * stride, box[3]))


def reference_o2f(prob, boxes, points, strides, target, topk, t):
    """Plain-Python O2F of spec 3.3 (float64): point -> (GT, soft target, weight); also the Q table."""
    prob, boxes, pts = prob.double().tolist(), boxes.double().tolist(), points.tolist()
    strides, gts, labels = strides.tolist(), target["boxes"].tolist(), target["labels"].tolist()
    num_points = len(pts)
    q = [[0.0] * num_points for _ in gts]
    iou = [[0.0] * num_points for _ in gts]
    for i, (gt, c) in enumerate(zip(gts, labels)):
        for j in range(num_points):
            if _in_region(pts[j], strides[j], gt):
                iou[i][j] = _iou(gt, boxes[j])
                q[i][j] = prob[j][c] ** 0.2 * iou[i][j] ** 0.8
    matching = {}  # point -> list of (Q, GT) for the GTs whose top-k holds it
    for i in range(len(gts)):
        k = min(topk, sum(v > 0 for v in iou[i]))
        for j in sorted(range(num_points), key=lambda j: -q[i][j])[:k]:
            matching.setdefault(j, []).append((q[i][j], i))
    owner = {}
    for j, cands in matching.items():
        best = max(v for v, _ in cands)
        if best > 0:
            owner[j] = min(i for v, i in cands if v == best)
    result = {}
    for i, c in enumerate(labels):
        kept = sorted((j for j in owner if owner[j] == i), key=lambda j: -q[i][j])
        if not kept:
            continue
        result[kept[0]] = (i, 1.0, 1.0)
        p_max = max((prob[j][c] for j in kept[1:]), default=1.0)
        for j in kept[1:]:
            result[j] = (i, t * prob[j][c] / p_max, 0.4)
    return result, q


def random_case(seed, num_gt=4, num_classes=3):
    """GTs with nearby centres (many conflicts), random joint probabilities and predicted boxes."""
    gen = torch.Generator().manual_seed(seed)
    points, strides = pyramid()
    centre = 20 + torch.rand(num_gt, 2, generator=gen) * 24
    half = 5 + torch.rand(num_gt, 2, generator=gen) * 15
    gt = torch.cat((centre - half, centre + half), 1).clamp(0, 64)
    ltrb = 2 + torch.rand(80, 4, generator=gen) * 20
    boxes = torch.cat((points - ltrb[:, :2], points + ltrb[:, 2:]), 1)
    prob = torch.rand(1, 80, num_classes, generator=gen)
    target = {"boxes": gt, "labels": torch.randint(0, num_classes, (num_gt,), generator=gen)}
    return prob, boxes[None], points, strides, target


@pytest.mark.parametrize("seed", range(12))
def test_random_cases_match_loop_reference_and_properties(seed):
    topk, epoch = [1, 2, 3, 7][seed % 4], seed % 12
    prob, boxes, points, strides, target = random_case(seed, num_gt=2 + seed % 4)
    t = soft_target_scale(epoch, 12)
    out = O2FAssigner(topk=topk)(prob, boxes, points, strides, [target], 3, epoch=epoch, max_epoch=12)
    got = as_dict(out)
    want, q = reference_o2f(prob[0], boxes[0], points, strides, target, topk, t)
    assert_same(got, want)
    gts, labels = target["boxes"].tolist(), target["labels"].tolist()
    for i in range(len(gts)):
        mine = {j: v for j, v in got.items() if v[0] == i}
        if not mine:
            continue
        # property 2: one certain point (s = 1, w = 1); soft anchors w = 0.4, 0 < s <= t, max = t, ratios = p ratios
        certain = [j for j, v in mine.items() if v[1:] == (1.0, 1.0)]
        assert len(certain) == 1
        soft = {j: v[1] for j, v in mine.items() if j != certain[0]}
        assert all(mine[j][2] == pytest.approx(0.4) and 0 < s <= t + 1e-6 for j, s in soft.items())
        if soft:
            assert max(soft.values()) == pytest.approx(t, rel=1e-6)
            j0 = max(soft, key=soft.get)
            for j, s in soft.items():
                assert s / soft[j0] == pytest.approx(prob[0, j, labels[i]].item() / prob[0, j0, labels[i]].item(),
                                                     rel=1e-5)
        # property 3: n <= topk, n <= #in-prior points with IoU > 0, every point strictly in the centre region
        assert len(mine) <= topk
        assert all(_in_region(points[j].tolist(), strides[j].item(), gts[i]) for j in mine)
        # property 5: the certain point has the highest Q of the kept points ...
        assert certain[0] == max(mine, key=lambda j: q[i][j])
        # ... and equals the row argmax when the GT lost no candidate to another GT
        if all(got.get(j, (i,))[0] == i for j in sorted(range(80), key=lambda j: -q[i][j])[:len(mine)]):
            assert certain[0] == max(range(80), key=lambda j: q[i][j])


@pytest.mark.parametrize("seed", range(6))
def test_topk_one_is_argmax_poto_with_the_joint_score(seed):
    # property 6; holds whenever every GT's best in-prior Q is > 0 (true for continuous random inputs; argmax POTO
    # also takes a GT whose in-prior Q are all 0, O2F does not)
    prob, boxes, points, strides, target = random_case(100 + seed, num_gt=3 + seed % 3)
    out = O2FAssigner(topk=1)(prob, boxes, points, strides, [target], 3, epoch=seed, max_epoch=6)
    ref = POTOAssigner(mode="argmax")(prob, boxes, points, strides, [target], 3)
    assert torch.equal(out.gt_index, ref.gt_index) and torch.equal(out.labels, ref.labels)
    assert torch.equal(out.pos_mask, ref.pos_mask) and torch.equal(out.box_targets, ref.box_targets)
    assert torch.all(out.soft_targets[out.pos_mask] == 1) and torch.all(out.weights[out.pos_mask] == 1)


def test_batch_with_empty_image_and_independent_images():
    prob, boxes, points, strides, target = fixture()
    prob2, boxes2, _, _, target2 = random_case(7)
    prob2 = torch.cat((prob2, torch.rand(1, 80, 1)), -1)  # 4 classes like the fixture
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    batch = O2FAssigner()(torch.cat((prob, prob2, prob)), torch.cat((boxes, boxes2, boxes)), points, strides,
                          [target, target2, empty], 4, epoch=0, max_epoch=12)
    assert_same(as_dict(batch, 0), expected_fixture(0.6))
    single = O2FAssigner()(prob2, boxes2, points, strides, [target2], 4, epoch=0, max_epoch=12)
    assert as_dict(batch, 1) == as_dict(single)
    assert not batch.pos_mask[2].any() and torch.all(batch.labels[2] == 4)
    assert torch.all(batch.soft_targets[2] == 0) and torch.all(batch.weights[2] == 0)
    assert batch.soft_targets.dtype == batch.weights.dtype == torch.float32


def test_inputs_untouched_and_validation():
    prob, boxes, points, strides, target = fixture()
    prob.requires_grad_(True)
    before = prob.detach().clone()
    out = O2FAssigner()(prob, boxes, points, strides, [target], 4)
    assert torch.equal(prob.detach(), before) and not out.soft_targets.requires_grad
    with pytest.raises(ValueError, match="topk"):
        O2FAssigner(topk=0)
    assert math.isclose(O2FAssigner().soft_weight, 0.4) and O2FAssigner().topk == 7
