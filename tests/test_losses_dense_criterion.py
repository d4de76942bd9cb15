"""DenseCriterion: FCOS, POTO (Hungarian/argmax), 3DMF product score and Aux losses (specs/dense.md 1.4, 2.4, 2.8)."""

import math

import pytest
import torch
import torchvision
from torchvision.ops import generalized_box_iou_loss

import e2edet.losses.dense_criterion as dc
from e2edet.assign.poto import POTOAssigner
from e2edet.losses.dense_criterion import DenseCriterion
from e2edet.losses.focal import prob_focal_loss
from e2edet.models.dense.points import anchor_points
from e2edet.ops.boxes import square_boxes

LOG2 = math.log(2.0)


def _pyramid(size=64, strides=(8, 16)):
    """Anchor points of a small square pyramid (the model's own point generator, tested in test_models_points_box)."""
    points, stride, level, counts = anchor_points([(size // s, size // s) for s in strides], list(strides))
    return points, stride, level, counts


def _outputs(batch, num_classes, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    points, strides, levels, counts = _pyramid()
    r = points.shape[0]
    logits = torch.randn(batch, r, num_classes, generator=gen).requires_grad_(requires_grad)
    ltrb = (2 + torch.rand(batch, r, 4, generator=gen) * 20).requires_grad_(requires_grad)
    out = {
        "pred_logits": logits,
        "pred_ltrb": ltrb,
        "pred_boxes": torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), -1),
        "pred_ctr": torch.randn(batch, r, generator=gen).requires_grad_(requires_grad),
        "pred_filter": torch.randn(batch, r, generator=gen).requires_grad_(requires_grad),
        "points": points,
        "strides": strides,
        "levels": levels,
        "num_points_per_level": counts,
        "anchors": square_boxes(points, strides * 4.0),  # read by assigner="anchor" only
    }
    return out


def _targets():
    return [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [16.0, 16.0, 32.0, 32.0], [45.0, 1.0, 51.0, 7.0]]),
         "labels": torch.tensor([0, 1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


CONFIGS = [
    {"assigner": "fcos"},
    {"assigner": "poto"},
    {"assigner": "poto_argmax"},
    {"assigner": "poto", "score": "cls_filter"},
    {"assigner": "poto", "score": "cls_filter", "aux": True},
    {"assigner": "fcos", "centerness": False},
    # 4-stride anchors: on this 2-level toy pyramid the default 8-stride anchors all contain the small GTs, the
    # candidates' IoUs take two values and mean + std lies above both (no positive, the official rule too)
    {"assigner": "atss", "atss_anchor_scale": 4.0},
    {"assigner": "anchor"},
    {"assigner": "center"},
    {"assigner": "fg_loss"},
]


def test_fcos_hand_computed():
    # GT [0, 0, 32, 32], K = 1: positives are the 4 P3 points (12|20, 12|20), each with centerness 0.6.
    # All logits 0 (p = 0.5), all predicted boxes [0, 0, 16, 16] (GIoU loss 0.75), centerness logits 0.
    points, strides, levels, counts = _pyramid()
    r = points.shape[0]
    outputs = {
        "pred_logits": torch.zeros(1, r, 1, requires_grad=True),
        "pred_boxes": torch.tensor([0.0, 0.0, 16.0, 16.0]).expand(1, r, 4).clone().requires_grad_(),
        "pred_ctr": torch.zeros(1, r, requires_grad=True),
        "points": points, "strides": strides, "levels": levels, "num_points_per_level": counts,
    }
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]), "labels": torch.tensor([0])}]
    losses = DenseCriterion(1, assigner="fcos")(outputs, targets)
    assert losses["num_pos"].item() == 4
    # focal at p = 0.5: positive 0.25·0.25·log2, negative 0.75·0.25·log2; 4 positives, 76 negatives, / 4.
    assert losses["loss_cls"].item() == pytest.approx((4 * 0.0625 + 76 * 0.1875) * LOG2 / 4, rel=1e-5)
    # Σ 0.75·0.6 / max(1, Σ 0.6) = 1.8 / 2.4
    assert losses["loss_box"].item() == pytest.approx(0.75, rel=1e-5)
    # BCE(logit 0, 0.6) = log 2 per positive, / 4
    assert losses["loss_ctr"].item() == pytest.approx(LOG2, rel=1e-5)
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr", "num_pos", "num_gt", "num_fg_per_gt"}


def test_fcos_centerness_normaliser_clamped_at_one():
    # One positive with centerness 0.6 < 1: the box loss is divided by 1, not by 0.6.
    points = torch.tensor([[12.0, 12.0]])
    outputs = {
        "pred_logits": torch.zeros(1, 1, 1), "pred_boxes": torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]),
        "pred_ctr": torch.zeros(1, 1), "points": points, "strides": torch.tensor([8.0]),
        "levels": torch.tensor([0]), "num_points_per_level": [1],
    }
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]), "labels": torch.tensor([0])}]
    losses = DenseCriterion(1, assigner="fcos")(outputs, targets)
    assert losses["num_pos"].item() == 1
    assert losses["loss_box"].item() == pytest.approx(0.75 * 0.6, rel=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_no_positive_divides_by_one(cfg):
    outputs = _outputs(2, 3, requires_grad=True)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = DenseCriterion(3, **cfg)(outputs, empty)
    target = torch.zeros_like(outputs["pred_logits"])
    if cfg.get("score") == "cls_filter":
        prob = outputs["pred_logits"].sigmoid() * outputs["pred_filter"].sigmoid().unsqueeze(-1)
        expected = prob_focal_loss(prob, target, reduction="sum")
    else:
        expected = torchvision.ops.sigmoid_focal_loss(outputs["pred_logits"], target, reduction="sum")
    assert losses["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_box"].item() == 0.0 and losses["num_pos"].item() == 0
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    total.backward()  # zero-positive losses stay connected to the graph
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    assert torch.all(outputs["pred_ltrb"].grad == 0)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_backward_gives_finite_gradients_with_an_empty_image(cfg):
    outputs = _outputs(2, 3)
    losses = DenseCriterion(3, **cfg)(outputs, _targets())
    for key, val in losses.items():
        assert val.dim() == 0 and val.dtype == torch.float32 and torch.isfinite(val), key
        assert key.startswith("loss") == val.requires_grad, key
    assert losses["num_pos"].item() >= 1 and losses["num_gt"].item() == 3
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    for key in ("pred_logits", "pred_ltrb"):
        assert torch.isfinite(outputs[key].grad).all() and outputs[key].grad.abs().sum() > 0, key
    if cfg.get("score") == "cls_filter":
        assert outputs["pred_filter"].grad.abs().sum() > 0


@pytest.mark.parametrize("assigner, mode", [("poto", "hungarian"), ("poto_argmax", "argmax")])
@pytest.mark.parametrize("score", ["cls", "cls_filter"])
def test_poto_losses_match_manual_computation(assigner, mode, score):
    outputs = _outputs(2, 3, seed=4, requires_grad=False)
    targets = _targets()
    losses = DenseCriterion(3, assigner=assigner, score=score)(outputs, targets)
    prob = outputs["pred_logits"].sigmoid()
    if score == "cls_filter":
        prob = prob * outputs["pred_filter"].sigmoid().unsqueeze(-1)
    asg = POTOAssigner(mode=mode)(prob, outputs["pred_boxes"], outputs["points"], outputs["strides"], targets, 3)
    n = max(1.0, asg.num_pos.item())
    onehot = asg.one_hot(3)
    if score == "cls_filter":
        cls = prob_focal_loss(prob, onehot, reduction="sum")
    else:
        cls = torchvision.ops.sigmoid_focal_loss(outputs["pred_logits"], onehot, reduction="sum")
    pos = asg.pos_mask
    box = generalized_box_iou_loss(outputs["pred_boxes"][pos], asg.box_targets[pos], reduction="sum")
    assert losses["loss_cls"].item() == pytest.approx(cls.item() / n, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(2.0 * box.item() / n, rel=1e-5)  # REG_WEIGHT 2, no ctr
    assert "loss_ctr" not in losses


def test_aux_uses_cls_only_and_has_no_regression():
    outputs = _outputs(2, 3, seed=2)
    crit = DenseCriterion(3, assigner="poto", score="cls_filter", aux=True)
    losses = crit(outputs, _targets())
    assert losses["num_pos_aux"].item() >= 1
    grads = torch.autograd.grad(
        losses["loss_cls_aux"], [outputs["pred_logits"], outputs["pred_filter"], outputs["pred_ltrb"]],
        allow_unused=True,
    )
    assert grads[0] is not None and grads[1] is None and grads[2] is None
    changed = dict(outputs, pred_filter=outputs["pred_filter"].detach() + 5.0)
    again = crit(changed, _targets())
    assert again["loss_cls_aux"].item() == pytest.approx(losses["loss_cls_aux"].item())
    assert again["num_pos_aux"].item() == losses["num_pos_aux"].item()


def test_normalisers_are_all_reduced_means(monkeypatch):
    outputs = _outputs(1, 3, seed=1, requires_grad=False)
    targets = _targets()[:1]
    ref = DenseCriterion(3, assigner="poto")(outputs, targets)
    monkeypatch.setattr(dc, "reduce_mean", lambda value: torch.as_tensor(value, dtype=torch.float32) * 0 + 8.0)
    scaled = DenseCriterion(3, assigner="poto")(outputs, targets)
    n = ref["num_pos"].item()
    assert scaled["loss_cls"].item() == pytest.approx(ref["loss_cls"].item() * n / 8.0, rel=1e-5)


def test_defaults_and_validation():
    assert DenseCriterion(2, assigner="fcos").reg_weight == 1.0
    assert DenseCriterion(2, assigner="poto").reg_weight == 2.0
    assert DenseCriterion(2, assigner="poto", reg_weight=3.0).reg_weight == 3.0
    assert DenseCriterion(2, assigner="atss").reg_weight == 2.0
    with pytest.raises(ValueError):
        DenseCriterion(2, assigner="retina")
    for assigner in ("fcos", "atss", "anchor", "center", "fg_loss"):
        with pytest.raises(ValueError, match="score='cls'"):
            DenseCriterion(2, assigner=assigner, score="cls_filter")
    with pytest.raises(ValueError):
        DenseCriterion(2, assigner="poto")(_outputs(1, 3), _targets()[:1])


def test_fcos_without_centerness_is_plain_giou_over_positives():
    """``fcos...3x_ms.wo_ctrness/fcos.py``: no centerness loss, GIoU unweighted / N_pos (REG_WEIGHT absent: 1)."""
    outputs = _outputs(2, 3, seed=6, requires_grad=False)
    targets = _targets()
    losses = DenseCriterion(3, assigner="fcos", centerness=False)(outputs, targets)
    asg = DenseCriterion(3, assigner="fcos").assign(outputs, targets)
    pos = asg.pos_mask
    giou = generalized_box_iou_loss(outputs["pred_boxes"][pos], asg.box_targets[pos], reduction="sum")
    assert "loss_ctr" not in losses and losses["num_pos"].item() == pos.sum().item()
    assert losses["loss_box"].item() == pytest.approx(giou.item() / pos.sum().item(), rel=1e-5)
    with_ctr = DenseCriterion(3, assigner="atss", atss_anchor_scale=4.0)(outputs, targets)
    assert "loss_ctr" in with_ctr and with_ctr["num_fg_per_gt"].item() > 1


@pytest.mark.parametrize("assigner", ["anchor", "center", "fg_loss"])
def test_one_to_one_baselines_train_like_poto(assigner):
    """Same losses as plain POTO: logit focal / N_pos and 2 x GIoU / N_pos, at most one positive per GT."""
    outputs = _outputs(2, 3, seed=7, requires_grad=False)
    targets = _targets()
    crit = DenseCriterion(3, assigner=assigner)
    losses = crit(outputs, targets)
    asg = crit.assign(outputs, targets)
    pos = asg.pos_mask
    n = max(1.0, pos.sum().item())
    cls = torchvision.ops.sigmoid_focal_loss(outputs["pred_logits"], asg.one_hot(3), reduction="sum")
    box = generalized_box_iou_loss(outputs["pred_boxes"][pos], asg.box_targets[pos], reduction="sum")
    assert losses["loss_cls"].item() == pytest.approx(cls.item() / n, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(2.0 * box.item() / n, rel=1e-5)
    assert "loss_ctr" not in losses and 1 <= losses["num_pos"].item() <= 3
    gt = asg.gt_index[0][pos[0]]
    assert len(set(gt.tolist())) == len(gt)  # one point per GT
