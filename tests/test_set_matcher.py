"""Hungarian set matcher of the query-based detectors (spec query.md 1.3, 1.8 #3-4, 2.3)."""

import itertools
import math

import pytest
import torch

from e2edet.assign.set_matcher import HungarianMatcher, focal_cost
from e2edet.losses.focal import sigmoid_focal_loss


def _random_boxes(n, h, w, gen):
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.3, h * 0.3]) + 1.0
    return torch.cat([xy, xy + wh], dim=1)


def _targets(counts, sizes, num_classes, gen):
    return [
        {"boxes": _random_boxes(g, h, w, gen), "labels": torch.randint(num_classes, (g,), generator=gen),
         "size": torch.tensor([h, w])}
        for g, (h, w) in zip(counts, sizes)
    ]


def _giou(a, b):
    """Plain-Python GIoU of two xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _reference_cost(logit_row, box, gt_box, gt_label, h, w, weights=(2.0, 5.0, 2.0), alpha=0.25, gamma=2.0,
                    cxcywh=False):
    """One (query, GT) cost written out from spec 1.3 with scalar Python maths."""
    p = 1.0 / (1.0 + math.exp(-float(logit_row[gt_label])))
    pos = -alpha * (1 - p) ** gamma * math.log(p + 1e-12)
    neg = -(1 - alpha) * p**gamma * math.log(1 - p + 1e-12)
    scale = (w, h, w, h)
    pn = [float(v) / s for v, s in zip(box, scale)]
    gn = [float(v) / s for v, s in zip(gt_box, scale)]
    if cxcywh:
        pn = [(pn[0] + pn[2]) / 2, (pn[1] + pn[3]) / 2, pn[2] - pn[0], pn[3] - pn[1]]
        gn = [(gn[0] + gn[2]) / 2, (gn[1] + gn[3]) / 2, gn[2] - gn[0], gn[3] - gn[1]]
    l1 = sum(abs(a - b) for a, b in zip(pn, gn))
    return weights[0] * (pos - neg) + weights[1] * l1 - weights[2] * _giou(box.tolist(), gt_box.tolist())


def _brute_force_min(cost):
    """Minimum total cost over all injective GT -> query assignments; ``cost[g][q]``."""
    num_gt, num_q = len(cost), len(cost[0]) if cost else 0
    if num_gt == 0:
        return 0.0
    return min(sum(cost[g][q] for g, q in enumerate(perm)) for perm in itertools.permutations(range(num_q), num_gt))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("box_space", ["xyxy_norm", "cxcywh_norm"])
def test_matches_brute_force_optimum(seed, box_space):
    gen = torch.Generator().manual_seed(seed)
    num_q = 3 + seed % 3
    counts = [int(torch.randint(0, 4, (1,), generator=gen)), int(torch.randint(0, 4, (1,), generator=gen))]
    sizes = [(60, 90), (120, 50)]
    num_classes = 3
    logits = torch.randn(2, num_q, num_classes, generator=gen) * 2
    boxes = torch.stack([_random_boxes(num_q, h, w, gen) for h, w in sizes])
    targets = _targets(counts, sizes, num_classes, gen)
    matcher = HungarianMatcher(box_space=box_space)
    matches = matcher(logits, boxes, targets)
    mats = matcher.cost_matrices(logits, boxes, targets)
    for b, ((pred_idx, gt_idx), t) in enumerate(zip(matches, targets)):
        h, w = sizes[b]
        ref = [[_reference_cost(logits[b, q], boxes[b, q], t["boxes"][g], int(t["labels"][g]), h, w,
                                cxcywh=box_space == "cxcywh_norm")
                for q in range(num_q)] for g in range(counts[b])]
        if counts[b]:
            torch.testing.assert_close(mats[b], torch.tensor(ref), rtol=1e-5, atol=1e-5)
        assert pred_idx.dtype == gt_idx.dtype == torch.int64
        assert len(pred_idx) == min(num_q, counts[b]) and len(set(pred_idx.tolist())) == len(pred_idx)
        assert gt_idx.tolist() == list(range(counts[b]))  # sorted by gt_idx, every GT once (G <= N)
        total = sum(ref[g][q] for q, g in zip(pred_idx.tolist(), gt_idx.tolist()))
        assert total == pytest.approx(_brute_force_min(ref), abs=1e-5)


def test_more_gts_than_queries_matches_every_query_once():
    gen = torch.Generator().manual_seed(3)
    targets = _targets([5], [(64, 64)], 2, gen)
    logits = torch.randn(1, 3, 2, generator=gen)
    boxes = _random_boxes(3, 64, 64, gen)[None]
    (pred_idx, gt_idx), = HungarianMatcher()(logits, boxes, targets)
    assert sorted(pred_idx.tolist()) == [0, 1, 2] and len(set(gt_idx.tolist())) == 3
    ref = HungarianMatcher().cost_matrices(logits, boxes, targets)[0].tolist()
    chosen = sum(ref[g][q] for q, g in zip(pred_idx.tolist(), gt_idx.tolist()))
    best = min(sum(ref[g][q] for q, g in enumerate(gts)) for gts in itertools.permutations(range(5), 3))
    assert chosen == pytest.approx(best, abs=1e-5)


def test_empty_targets_give_empty_indices():
    gen = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 4, 3, generator=gen), _random_boxes(8, 50, 50, gen).view(2, 4, 4)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "size": torch.tensor([50, 50])}
    for targets in ([empty, empty], [empty, _targets([2], [(50, 50)], 3, gen)[0]]):
        matches = HungarianMatcher()(logits, boxes, targets)
        assert matches[0][0].shape == (0,) and matches[0][1].shape == (0,) and matches[0][0].dtype == torch.int64
    assert len(matches[1][0]) == 2


def test_nan_and_inf_predictions_still_give_a_valid_assignment():
    gen = torch.Generator().manual_seed(1)
    targets = _targets([3, 2], [(64, 64), (64, 64)], 3, gen)
    logits = torch.randn(2, 5, 3, generator=gen)
    boxes = torch.stack([_random_boxes(5, 64, 64, gen) for _ in range(2)])
    logits[0, 1] = float("nan")
    logits[1, :, 0] = float("nan")
    boxes[0, 3, 2] = float("inf")
    mats = HungarianMatcher().cost_matrices(logits, boxes, targets)
    assert not torch.isfinite(mats[0]).all()
    for (pred_idx, gt_idx), g in zip(HungarianMatcher()(logits, boxes, targets), (3, 2)):
        assert gt_idx.tolist() == list(range(g)) and len(set(pred_idx.tolist())) == g
        assert pred_idx.min() >= 0 and pred_idx.max() < 5


def test_result_invariant_to_gt_order():
    gen = torch.Generator().manual_seed(7)
    targets = _targets([4], [(80, 100)], 5, gen)
    logits, boxes = torch.randn(1, 6, 5, generator=gen), _random_boxes(6, 80, 100, gen)[None]
    (pred_idx, gt_idx), = HungarianMatcher()(logits, boxes, targets)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = [{**targets[0], "boxes": targets[0]["boxes"][perm], "labels": targets[0]["labels"][perm]}]
    (pred_p, gt_p), = HungarianMatcher()(logits, boxes, shuffled)
    assert {(q, g) for q, g in zip(pred_idx.tolist(), gt_idx.tolist())} == {
        (q, int(perm[g])) for q, g in zip(pred_p.tolist(), gt_p.tolist())
    }


def test_focal_cost_is_focal_loss_difference_at_gt_column():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=gen) * 3
    labels = torch.tensor([2, 0, 3])
    cost = focal_cost(logits, labels)
    fl_pos = sigmoid_focal_loss(logits, torch.ones_like(logits))
    fl_neg = sigmoid_focal_loss(logits, torch.zeros_like(logits))
    torch.testing.assert_close(cost, (fl_pos - fl_neg)[:, labels], rtol=1e-5, atol=1e-6)


def test_l1_normalised_by_unpadded_image_size():
    # one GT; query 0 shifted 30 px in x, query 1 shifted 10 px in y. In a 100 x 400 (h, w) image the x shift is
    # cheaper once normalised (2·30/400 = 0.15 < 2·10/100 = 0.2); a square (e.g. padded 400 x 400) size flips it.
    gt = torch.tensor([[100.0, 40.0, 140.0, 60.0]])
    boxes = torch.tensor([[[130.0, 40.0, 170.0, 60.0], [100.0, 50.0, 140.0, 70.0]]])
    logits = torch.zeros(1, 2, 1)
    matcher = HungarianMatcher(cost_class=0.0, cost_giou=0.0)
    tgt = {"boxes": gt, "labels": torch.tensor([0]), "size": torch.tensor([100, 400])}
    cost = matcher.cost_matrices(logits, boxes, [tgt])[0]
    torch.testing.assert_close(cost, torch.tensor([[5 * 0.15, 5 * 0.2]]))
    assert matcher(logits, boxes, [tgt])[0][0].tolist() == [0]
    assert matcher(logits, boxes, [{**tgt, "size": torch.tensor([400, 400])}])[0][0].tolist() == [1]


def test_bad_inputs_raise():
    tgt = {"boxes": torch.zeros(1, 4) + torch.tensor([0.0, 0.0, 5.0, 5.0]), "labels": torch.tensor([3]),
           "size": torch.tensor([10, 10])}
    logits, boxes = torch.zeros(1, 2, 3), torch.tensor([[[0.0, 0.0, 5.0, 5.0]] * 2])
    with pytest.raises(ValueError, match="box_space"):
        HungarianMatcher(box_space="cxcywh")
    with pytest.raises(ValueError, match="labels outside"):
        HungarianMatcher()(logits, boxes, [tgt])
    with pytest.raises(ValueError, match="targets for a batch"):
        HungarianMatcher()(logits, boxes, [tgt, tgt])
    with pytest.raises(ValueError, match="size"):
        HungarianMatcher()(logits, boxes, [{"boxes": tgt["boxes"], "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="pred_boxes"):
        HungarianMatcher()(logits, boxes[:, :1], [tgt])


def test_match_stages_equals_per_stage_matching_with_one_host_copy(monkeypatch):
    import e2edet.assign.set_matcher as sm

    torch.manual_seed(3)
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 30.0], [10.0, 5.0, 60.0, 40.0]]), "labels": torch.tensor([1, 0]),
                "size": torch.tensor([64, 64])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "size": torch.tensor([64, 48])}]
    stages = [{"pred_logits": torch.randn(2, 5, 3), "pred_boxes": torch.rand(2, 5, 4).cumsum(-1) * 20}
              for _ in range(3)]
    matcher = sm.HungarianMatcher()
    expected = [matcher(s["pred_logits"], s["pred_boxes"], targets) for s in stages]
    calls = []
    real = sm.linear_assignment
    monkeypatch.setattr(sm, "linear_assignment", lambda m, maximize: calls.append(len(m)) or real(m, maximize))
    got = matcher.match_stages(stages, targets)
    assert calls == [6]  # one solver call (one host copy) for 3 stages x 2 images
    for exp_stage, got_stage in zip(expected, got):
        for (ep, eg), (gp, gg) in zip(exp_stage, got_stage):
            assert torch.equal(ep, gp) and torch.equal(eg, gg)
