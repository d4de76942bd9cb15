"""General set criterion: named prediction sets, class-agnostic sets, normalised cxcywh boxes, matching costs apart
from loss weights, per-set normalisers, one host copy per step (issue 11 item 5; specs/detr.md §1.3, §1.4, §3.3,
§3.4, "Design notes for one codebase"; specs/query.md §1.3, §1.4)."""

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

import e2edet.assign.set_matcher as sm
from e2edet.losses.set_criterion import PredictionSet, SetCriterion

SIZE = (100, 200)  # (h, w)


def _target(boxes, labels, size=SIZE):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "size": torch.tensor(size)}


def _pred(batch, num_queries, num_classes, gen, size=SIZE):
    logits = torch.randn(batch, num_queries, num_classes, generator=gen).requires_grad_()
    xy = torch.rand(batch, num_queries, 2, generator=gen) * torch.tensor([size[1] * 0.6, size[0] * 0.6])
    wh = torch.rand(batch, num_queries, 2, generator=gen) * 30 + 5
    return {"pred_logits": logits, "pred_boxes": torch.cat([xy, xy + wh], dim=-1).requires_grad_()}


def _targets():
    return [_target([[10, 10, 40, 50], [60, 20, 90, 45], [100, 30, 150, 80]], [0, 2, 1]),
            _target([[5, 5, 30, 30]], [1], (80, 120))]


def _losses(out, prefix):
    return {k[len(prefix) + 1:]: v for k, v in out.items() if k.startswith(prefix + "_")}


def test_for_stages_default_equals_the_old_constructor_bitwise():
    gen = torch.Generator().manual_seed(0)
    outputs = {"stages": [_pred(2, 5, 3, gen) for _ in range(3)]}
    old = SetCriterion(3)(outputs, _targets())
    new = SetCriterion.for_stages(3)(outputs, _targets())
    assert old.keys() == new.keys()
    for k in old:
        assert torch.equal(old[k], new[k]), k


@pytest.mark.parametrize("enc_classes", [1, 3])
def test_class_agnostic_set_equals_per_class_criterion_on_zeroed_labels(enc_classes):
    gen = torch.Generator().manual_seed(1)
    enc = _pred(2, 6, enc_classes, gen)
    targets = _targets()
    agnostic = SetCriterion(3, sets=[PredictionSet("enc", "enc_outputs", label_mode="class_agnostic")])
    out = agnostic({"enc_outputs": enc}, targets)
    zeroed = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    ref = SetCriterion(enc_classes)({"stages": [enc]}, zeroed)
    assert set(out) == {"enc_loss_cls", "enc_loss_bbox", "enc_loss_iou", "enc_pos_acc", "num_gt"}
    for k, v in _losses(ref, "stage0").items():
        torch.testing.assert_close(out[f"enc_{k}"], v, rtol=0, atol=0)
    assert out["num_gt"].item() == 4.0


def test_cxcywh_l1_and_giou_by_hand_and_against_torchvision():
    # one query, one GT in a (h, w) = (100, 200) image: GT [40, 30, 80, 50] px = normalised cxcywh (0.3, 0.4, 0.2, 0.2)
    pred_cxcywh = torch.tensor([[[0.35, 0.42, 0.25, 0.1]]], requires_grad=True)
    logits = torch.tensor([[[1.5, -0.5]]], requires_grad=True)
    targets = [_target([[40, 30, 80, 50]], [0])]
    detr = PredictionSet("dec", None, box_format="cxcywh_norm", box_space="cxcywh_norm", cls_weight=1.0)
    out = SetCriterion(2, sets=[detr])({"pred_logits": logits, "pred_boxes": pred_cxcywh}, targets)

    l1 = abs(0.35 - 0.3) + abs(0.42 - 0.4) + abs(0.25 - 0.2) + abs(0.1 - 0.2)
    assert out["dec_loss_bbox"].item() == pytest.approx(5.0 * l1, rel=1e-5)
    # GIoU by hand on pixels: pred = [45, 37, 95, 47]
    inter = (80 - 45) * (47 - 37)
    union = 50 * 10 + 40 * 20 - inter
    hull = (95 - 40) * (50 - 30)
    giou = inter / union - (hull - union) / hull
    assert out["dec_loss_iou"].item() == pytest.approx(2.0 * (1 - giou), rel=1e-5)
    tv_giou = generalized_box_iou_loss(torch.tensor([[45.0, 37, 95, 47]]), targets[0]["boxes"], reduction="sum")
    assert out["dec_loss_iou"].item() == pytest.approx(2.0 * tv_giou.item(), rel=1e-5)
    tv_focal = sigmoid_focal_loss(logits.detach(), torch.tensor([[[1.0, 0.0]]]), reduction="sum")
    assert out["dec_loss_cls"].item() == pytest.approx(tv_focal.item(), rel=1e-6)

    # the same boxes as xyxy pixels with the L1 in normalised cxcywh give the same numbers; in xyxy another L1
    pixels = torch.tensor([[[45.0, 37.0, 95.0, 47.0]]])
    xyxy_in = {"pred_logits": logits, "pred_boxes": pixels}
    out_px = SetCriterion(2, sets=[PredictionSet("dec", None, box_space="cxcywh_norm", cls_weight=1.0)])(
        xyxy_in, targets)
    for k in ("loss_cls", "loss_bbox", "loss_iou"):
        assert out_px[f"dec_{k}"].item() == pytest.approx(out[f"dec_{k}"].item(), rel=1e-5), k
    out_xyxy = SetCriterion(2, sets=[PredictionSet("dec", None, box_format="cxcywh_norm")])(
        {"pred_logits": logits, "pred_boxes": pred_cxcywh}, targets)
    l1_xyxy = abs(45 - 40) / 200 + abs(37 - 30) / 100 + abs(95 - 80) / 200 + abs(47 - 50) / 100
    assert out_xyxy["dec_loss_bbox"].item() == pytest.approx(5.0 * l1_xyxy, rel=1e-5)
    (out["dec_loss_bbox"] + out["dec_loss_iou"]).backward()
    assert pred_cxcywh.grad.abs().sum() > 0


def test_cost_matrices_of_cxcywh_predictions_equal_those_of_the_same_boxes_in_pixels():
    gen = torch.Generator().manual_seed(2)
    pred = _pred(2, 5, 3, gen)
    targets = _targets()
    whwh = torch.tensor([[200.0, 100, 200, 100], [120, 80, 120, 80]])[:, None]
    cxcywh = box_convert(pred["pred_boxes"].detach() / whwh, "xyxy", "cxcywh")
    for space in sm.BOX_SPACES:
        m = sm.HungarianMatcher(box_space=space)
        ref = m.cost_matrices(pred["pred_logits"], pred["pred_boxes"], targets)
        got = m.cost_matrices(pred["pred_logits"], cxcywh, targets, box_format="cxcywh_norm")
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="box_format"):
        sm.HungarianMatcher()(pred["pred_logits"], cxcywh, targets, box_format="cxcywh")


def test_cost_weights_change_the_matching_but_not_the_loss_weights():
    # one GT of class 0; query 0 has the right class and a far box, query 1 the wrong class and the exact box
    logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])
    boxes = torch.tensor([[[120.0, 50.0, 160.0, 90.0], [10.0, 10.0, 50.0, 50.0]]])
    outputs = {"stages": [{"pred_logits": logits, "pred_boxes": boxes}]}
    targets = [_target([[10, 10, 50, 50]], [0])]
    by_class = SetCriterion.for_stages(2, cost_class=1.0, cost_l1=0.0, cost_giou=0.0)
    by_box = SetCriterion.for_stages(2, cost_class=0.0, cost_l1=1.0, cost_giou=1.0)
    assert (by_class.matcher.cost_class, by_class.matcher.cost_l1, by_class.cls_weight) == (1.0, 0.0, 2.0)
    a, b = by_class(outputs, targets), by_box(outputs, targets)
    # query 0 matched: L1 = (110 + 110) / 200 + (40 + 40) / 100; query 1 matched: L1 = 0, GIoU loss = 0
    assert a["stage0_loss_bbox"].item() == pytest.approx(5.0 * (1.1 + 0.8), rel=1e-5)
    assert a["stage0_pos_acc"].item() == 100.0
    assert b["stage0_loss_bbox"].item() == 0.0 and b["stage0_loss_iou"].item() == pytest.approx(0.0, abs=1e-6)
    assert b["stage0_pos_acc"].item() == 0.0
    # loss weights scale the losses and leave the matching (costs by default = the loss weights) alone
    scaled = SetCriterion.for_stages(2, cls_weight=4.0, l1_weight=1.0, giou_weight=3.0, cost_class=1.0, cost_l1=0.0,
                                     cost_giou=0.0)(outputs, targets)
    for k, factor in (("loss_cls", 2.0), ("loss_bbox", 0.2), ("loss_iou", 1.5)):
        assert scaled[f"stage0_{k}"].item() == pytest.approx(factor * a[f"stage0_{k}"].item(), rel=1e-6), k
    # default costs = loss weights (the old behaviour): box terms dominate here, query 1 wins
    assert SetCriterion.for_stages(2)(outputs, targets)["stage0_loss_bbox"].item() == 0.0


def test_two_sets_get_prefixed_keys_and_their_own_normalisers():
    gen = torch.Generator().manual_seed(3)
    stages = [_pred(2, 2, 3, gen) for _ in range(2)]  # 2 queries per image, image 0 has 3 GTs -> 2 + 1 matched
    enc = _pred(2, 2, 1, gen)
    targets = _targets()
    sets = [PredictionSet("stage{i}"), PredictionSet("enc", "enc_outputs", label_mode="class_agnostic",
                                                     normalizer="num_gt", cls_weight=1.0)]
    out = SetCriterion(3, sets=sets)({"stages": stages, "enc_outputs": enc}, targets)
    expected = {f"{n}_{k}" for n in ("stage0", "stage1", "enc") for k in ("loss_cls", "loss_bbox", "loss_iou",
                                                                          "pos_acc")}
    assert set(out) == expected | {"num_gt"}
    # each set normalised on its own: the stages by 3 matched pairs, the encoder by the 4 GTs
    ref_stage = SetCriterion(3)({"stages": stages}, targets)
    for s in range(2):
        for k in ("loss_cls", "loss_bbox", "loss_iou"):
            assert torch.equal(out[f"stage{s}_{k}"], ref_stage[f"stage{s}_{k}"])
    zeroed = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    ref_enc = SetCriterion(1, cls_weight=1.0)({"stages": [enc]}, zeroed)  # normalised by 3 matched pairs
    for k in ("loss_cls", "loss_bbox", "loss_iou"):
        assert out[f"enc_{k}"].item() == pytest.approx(ref_enc[f"stage0_{k}"].item() * 3 / 4, rel=1e-6), k
    sum(v for k, v in out.items() if "_loss_" in k).backward()
    assert enc["pred_boxes"].grad.abs().sum() > 0 and stages[1]["pred_logits"].grad.abs().sum() > 0


def test_one_to_many_matcher_with_repeated_queries():
    # a stand-in for a top-k one-to-many assigner: query 1 listed for both GTs (last pair wins the class target)
    def o2m(pred_logits, pred_boxes, targets):
        return [(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))]

    logits = torch.tensor([[[0.5, -1.0], [1.0, 2.0], [-2.0, 0.0]]])
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [12.0, 8.0, 52.0, 48.0], [0.0, 0.0, 5.0, 5.0]]])
    targets = [_target([[10, 10, 50, 50], [60, 20, 90, 40]], [0, 1])]
    crit = SetCriterion(2, sets=[PredictionSet("stage{i}_o2m", "stages", "pred_logits_o2m", "pred_boxes_o2m",
                                               matcher=o2m, cls_weight=1.0, l1_weight=1.0, giou_weight=1.0)])
    out = crit({"stages": [{"pred_logits_o2m": logits, "pred_boxes_o2m": boxes}]}, targets)
    cls_target = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # query 1: its last pair's class (1)
    focal = sigmoid_focal_loss(logits, cls_target, reduction="sum")
    assert out["stage0_o2m_loss_cls"].item() == pytest.approx(focal.item() / 3, rel=1e-6)  # 3 pairs
    gt = targets[0]["boxes"][[0, 0, 1]]
    pred = boxes[0, [0, 1, 1]]
    whwh = torch.tensor([200.0, 100, 200, 100])
    l1 = (pred / whwh - gt / whwh).abs().sum()
    assert out["stage0_o2m_loss_bbox"].item() == pytest.approx(l1.item() / 3, rel=1e-6)
    assert out["stage0_o2m_loss_iou"].item() == pytest.approx(
        generalized_box_iou_loss(pred, gt, reduction="sum").item() / 3, rel=1e-6)
    assert out["stage0_o2m_pos_acc"].item() == pytest.approx(200 / 3)  # argmax 0, 1, 1 vs GT 0, 0, 1


def test_matcher_sees_match_boxes_key_and_the_loss_the_regressed_boxes():
    # MS-DETR's encoder: matched on the anchors, loss on the regressed boxes (costs L1 + GIoU only)
    logits = torch.zeros(1, 2, 1)
    anchors = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [100.0, 50.0, 140.0, 90.0]]])
    boxes = anchors.flip(1)  # query 0 regressed far from the GT, query 1 onto it
    matcher = sm.HungarianMatcher(cost_class=0.0)
    spec = PredictionSet("enc", "enc_outputs", match_boxes_key="anchors", matcher=matcher,
                         label_mode="class_agnostic")
    out = SetCriterion(3, sets=[spec])({"enc_outputs": {"pred_logits": logits, "pred_boxes": boxes,
                                                        "anchors": anchors}}, [_target([[10, 10, 50, 50]], [2])])
    assert out["enc_loss_bbox"].item() == pytest.approx(5.0 * (90 / 200 + 40 / 100) * 2, rel=1e-5)  # query 0


def test_all_sets_matched_with_one_host_copy_and_one_solver_call(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    stages = [{**_pred(2, 5, 3, gen), **{f"{k}_o2m": v for k, v in _pred(2, 5, 3, gen).items()}} for _ in range(3)]
    enc = _pred(2, 5, 1, gen)
    sets = [PredictionSet("stage{i}"),
            PredictionSet("stage{i}_o2m", logits_key="pred_logits_o2m", boxes_key="pred_boxes_o2m",
                          matcher=sm.HungarianMatcher(cost_class=1.0)),
            PredictionSet("enc", "enc_outputs", label_mode="class_agnostic", box_space="cxcywh_norm")]
    criterion = SetCriterion(3, sets=sets)
    outputs = {"stages": stages, "enc_outputs": enc}
    expected = criterion(outputs, _targets())

    copies, solves, reduces = [], [], []
    real_cpu, real_solve = torch.Tensor.cpu, sm.linear_assignment
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or real_cpu(self, *a,
                                                                                                            **k))
    monkeypatch.setattr(sm, "linear_assignment", lambda m, maximize: solves.append(len(m)) or real_solve(m, maximize))
    import e2edet.losses.set_criterion as sc
    real_reduce = sc.reduce_mean
    monkeypatch.setattr(sc, "reduce_mean", lambda v, device=None: reduces.append(1) or real_reduce(v, device))
    out = criterion(outputs, _targets())
    assert len(copies) == 1 and solves == [14] and len(reduces) == 1  # (3 + 3 + 1) sets x 2 images
    assert len(out) == 7 * 4 + 1
    for k in expected:
        assert torch.equal(out[k], expected[k]), k


def test_bad_sets_and_outputs_raise():
    gen = torch.Generator().manual_seed(5)
    pred = _pred(2, 4, 3, gen)
    targets = _targets()
    with pytest.raises(ValueError, match="label_mode"):
        PredictionSet("enc", label_mode="binary")
    with pytest.raises(ValueError, match="box_format"):
        PredictionSet("enc", box_format="cxcywh")
    with pytest.raises(ValueError, match="box_space"):
        PredictionSet("enc", box_space="xywh")
    with pytest.raises(ValueError, match="normalizer"):
        PredictionSet("enc", normalizer="mean")
    with pytest.raises(ValueError, match="field"):
        PredictionSet("stage{s}")
    with pytest.raises(ValueError, match="l1_weight"):
        PredictionSet("enc", l1_weight=-1.0)
    with pytest.raises(ValueError, match="either sets"):
        SetCriterion(3, cls_weight=1.0, sets=[PredictionSet("a", None)])
    with pytest.raises(ValueError, match="distinct"):
        SetCriterion(3, sets=[PredictionSet("a", None), PredictionSet("a", "enc")])
    with pytest.raises(ValueError, match="at least one"):
        SetCriterion(3, sets=[])
    enc_set = SetCriterion(3, sets=[PredictionSet("enc", "enc_outputs", label_mode="class_agnostic")])
    with pytest.raises(ValueError, match="no 'enc_outputs'"):
        enc_set({"stages": [pred]}, targets)
    with pytest.raises(ValueError, match="1 or 3"):
        enc_set({"enc_outputs": {**pred, "pred_logits": torch.zeros(2, 4, 2)}}, targets)
    with pytest.raises(ValueError, match="no 'pred_boxes'"):
        enc_set({"enc_outputs": {"pred_logits": pred["pred_logits"]}}, targets)
    with pytest.raises(ValueError, match="non-empty list"):
        SetCriterion(3)({"stages": pred}, targets)
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        SetCriterion(3)({"stages": [{**pred, "pred_boxes": pred["pred_boxes"][:, :2]}]}, targets)
    with pytest.raises(ValueError, match="repeated names"):
        SetCriterion(3, sets=[PredictionSet("x{i}"), PredictionSet("x0", "enc")])({"stages": [pred], "enc": pred},
                                                                                  targets)
    with pytest.raises(ValueError, match="labels outside"):
        SetCriterion(3)({"stages": [pred]}, [_target([[0, 0, 5, 5]], [3]), _target([], [])])
