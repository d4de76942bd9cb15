"""MS-DETR's one-to-many assigner (``e2edet.assign.o2m``): spec ``detr.md`` §3.3 rule by rule on hand-built score
matrices (§3.8 properties 1-6), and the official ``Stage2Assigner`` test vectors.

``fixtures/o2m_assigner.json`` was written by ``tests/fixtures/make_o2m_fixture.py``, which runs the official
``models/matcher_o2m.py`` of ``Atten4Vis/MS-DETR`` (commit ``c015d65``, from a local checkout, not copied here) on
random jittered-GT inputs right after ``torch.manual_seed(seed)``; the same seed gives the same random subsampling
here, so the indices must agree exactly.
"""

import json
from pathlib import Path

import pytest
import torch

from e2edet.assign.o2m import OneToManyAssigner
from e2edet.losses.set_criterion import PredictionSet, SetCriterion

FIXTURE = Path(__file__).parent / "fixtures" / "o2m_assigner.json"


def _pairs(pred_idx, gt_idx):
    return list(zip(pred_idx.tolist(), gt_idx.tolist()))


# ---------------------------------------------------------------- the official test vectors
@pytest.mark.parametrize("case", json.loads(FIXTURE.read_text())["cases"], ids=lambda c: c["name"])
def test_matches_the_official_assigner(case):
    size = (100.0, 200.0)  # (h, w): targets in pixels here, normalised cxcywh in the official call
    targets = []
    for boxes, labels in zip(case["gt_boxes"], case["gt_labels"]):
        b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1) * torch.tensor([200.0, 100, 200, 100])
        targets.append({"boxes": xyxy, "labels": torch.tensor(labels, dtype=torch.int64), "size": torch.tensor(size)})
    torch.manual_seed(case["seed"])
    got = OneToManyAssigner()(torch.tensor(case["pred_logits"]), torch.tensor(case["pred_boxes"]), targets,
                              box_format="cxcywh_norm")
    for (p, g), want_p, want_g in zip(got, case["pred_idx"], case["gt_idx"]):
        assert p.tolist() == want_p and g.tolist() == want_g


# ---------------------------------------------------------------- the rules on hand-built scores
def test_score_is_weighted_iou_plus_class_probability():
    a = OneToManyAssigner()
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 20.0]])
    logits = torch.tensor([[-1e4, 1e4], [1e4, -1e4], [0.0, 0.0]])
    s = a.scores(logits, boxes, gt, torch.tensor([1]))
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0, 0.7 * 0.5 + 0.3 * 0.5]]))


def test_threshold_and_forced_best_query():
    a = OneToManyAssigner(positive_fraction=1.0)
    s = torch.tensor([[0.39, 0.10, 0.05, 0.0],    # GT 0: nothing >= 0.4; its best query (0) is forced in
                      [0.30, 0.45, 0.41, 0.2]])  # GT 1: queries 1, 2 pass the threshold
    p, g = a.assign(s)
    assert sorted(_pairs(p, g)) == [(0, 0), (1, 1), (2, 1)]
    assert 3 not in p.tolist()  # below threshold and nobody's best query


def test_forced_query_keeps_its_argmax_gt():
    a = OneToManyAssigner(positive_fraction=1.0)
    s = torch.tensor([[0.35, 0.0], [0.38, 0.0]])  # GT 0's best query is 0, but query 0's argmax GT is 1
    p, g = a.assign(s)
    # query 0 counts for GT 1 (c_1 = 1); GT 0 ends with no positive of its own, so no pair for it
    assert _pairs(p, g) == [(0, 1)]


def test_per_gt_top_k_over_all_queries():
    a = OneToManyAssigner(k=2, positive_fraction=1.0)
    # GT 0 gets 3 positives by argmax (queries 0, 1, 2) but its top-2 row entries are queries 3 and 0,
    # and query 3's argmax is GT 1
    s = torch.tensor([[0.50, 0.45, 0.42, 0.90, 0.0],
                      [0.10, 0.10, 0.10, 0.95, 0.0]])
    p, g = a.assign(s)
    pairs = _pairs(p, g)
    assert (3, 0) in pairs and (0, 0) in pairs and (1, 0) not in pairs and (2, 0) not in pairs
    assert (3, 1) in pairs  # GT 1: one positive (query 3), its top-1 query
    assert sum(1 for _, gt in pairs if gt == 0) == 2  # min(c_0 = 3, k = 2)


def test_cap_on_positives_and_reproducible_subsampling():
    q = 12
    s = torch.full((1, q), 0.9)
    s[0, :] += torch.arange(q) * 1e-3
    a = OneToManyAssigner(k=q, positive_fraction=0.25)
    torch.manual_seed(0)
    p1, _ = a.assign(s)
    torch.manual_seed(0)
    p2, _ = a.assign(s)
    assert len(p1) == 3 and torch.equal(p1, p2)  # floor(0.25 * 12) survive the cap; c_0 = 3 of GT 0's top-12
    # the per-GT step takes the row's top entries, whichever positives survived the random cap
    assert sorted(p1.tolist()) == [9, 10, 11]


def test_pairs_sorted_ascending_so_a_duplicated_query_gets_its_best_gt():
    a = OneToManyAssigner(k=2, positive_fraction=1.0)
    s = torch.tensor([[0.80, 0.60, 0.0],
                      [0.70, 0.50, 0.45]])  # query 0 is in both GTs' top-2
    p, g = a.assign(s)
    scores = s[g, p]
    assert torch.all(scores[1:] >= scores[:-1])
    last = {q: gt for q, gt in _pairs(p, g)}
    assert last[0] == 0  # written last: its highest-scoring GT
    # the set criterion keeps the last pair of a query as its class target
    logits = torch.zeros(1, 3, 2)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 3])
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 70.0, 80.0]]),
                "labels": torch.tensor([0, 1]), "size": torch.tensor([100, 100])}]
    crit = SetCriterion(2, sets=[PredictionSet("o2m", source=None, boxes_key="pred_boxes", box_format="cxcywh_norm",
                                               box_space="cxcywh_norm", normalizer="num_gt",
                                               matcher=lambda *a_, **k: [(p, g)])])
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert torch.isfinite(losses["o2m_loss_cls"])


def test_no_gt_and_empty_loss():
    a = OneToManyAssigner()
    p, g = a.assign(torch.zeros(0, 30))
    assert p.numel() == 0 and g.numel() == 0 and p.dtype == torch.int64
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "size": torch.tensor([50, 60])}]
    logits = torch.randn(1, 30, 3, requires_grad=True)
    boxes = torch.rand(1, 30, 4, requires_grad=True)
    crit = SetCriterion(3, sets=[PredictionSet("o2m", source=None, box_format="cxcywh_norm", box_space="cxcywh_norm",
                                               normalizer="num_gt", matcher=a)])
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["o2m_loss_bbox"] == 0 and losses["o2m_loss_iou"] == 0 and losses["o2m_loss_cls"] > 0
    sum(v for k, v in losses.items() if "loss" in k).backward()
    assert torch.isfinite(logits.grad).all()


def test_every_gt_with_a_positive_gets_one_to_k_queries():
    torch.manual_seed(0)
    a = OneToManyAssigner(positive_fraction=1.0)
    for _ in range(20):
        s = torch.rand(5, 40)
        p, g = a.assign(s)
        counts = torch.bincount(g, minlength=5)
        assert counts.max() <= 6
        assert set(g.tolist()) == set(s.max(0).indices[s.max(0).values >= 0.4].tolist()
                                      + s.max(0).indices[s.topk(1, dim=1).indices.flatten()].tolist())


def test_errors():
    with pytest.raises(ValueError, match="k >= 1"):
        OneToManyAssigner(k=0)
    with pytest.raises(ValueError, match="threshold"):
        OneToManyAssigner(threshold=float("nan"))
    a = OneToManyAssigner()
    with pytest.raises(ValueError, match="box_format"):
        a(torch.zeros(1, 3, 2), torch.zeros(1, 3, 4), [{}], box_format="xywh")
    with pytest.raises(ValueError, match="labels"):
        a(torch.zeros(1, 3, 2), torch.rand(1, 3, 4), [{"boxes": torch.tensor([[0.0, 0, 5, 5]]),
                                                       "labels": torch.tensor([2]), "size": (10, 10)}])


def test_o2m_set_is_normalised_by_the_gt_count_not_the_pairs():
    # spec 3.4: 3 one-to-many pairs for 2 GTs -> the box terms are divided by 2
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 70.0, 80.0]]),
                "labels": torch.tensor([0, 1]), "size": torch.tensor([100, 100])}]
    boxes = torch.tensor([[[0.2, 0.2, 0.2, 0.2], [0.25, 0.2, 0.2, 0.2], [0.6, 0.65, 0.2, 0.3]]])
    pairs = [(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]))]
    gt = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], [0.6, 0.65, 0.2, 0.3]])
    l1 = (boxes[0] - gt).abs().sum()
    for normalizer, divisor in (("num_gt", 2.0), ("matched", 3.0)):
        crit = SetCriterion(2, sets=[PredictionSet("o2m", source=None, box_format="cxcywh_norm",
                                                   box_space="cxcywh_norm", normalizer=normalizer,
                                                   matcher=lambda *a_, **k: pairs)])
        losses = crit({"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": boxes}, targets)
        torch.testing.assert_close(losses["o2m_loss_bbox"], 5.0 * l1 / divisor)
