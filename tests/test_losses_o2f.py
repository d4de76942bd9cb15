"""O2F losses through DenseCriterion(assigner="o2f", score="cls_ctr") (specs/dense.md 3.4, 3.8.1, 3.8.6-3.8.9, 3.9).

The criterion is run on the hand-made fixture of ``test_assign_o2f`` (whose assignment is derived by hand there):
cls and ctr logits are set so that sigmoid(cls)·sigmoid(ctr) equals the fixture's joint probabilities. Expected losses
are recomputed here with plain ``math.log`` loops, independently of the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.ops import generalized_box_iou

import e2edet.losses.dense_criterion as dc
from e2edet.assign.o2f import soft_target_scale
from e2edet.engine.trainer import Trainer
from e2edet.losses.dense_criterion import DenseCriterion
from e2edet.losses.focal import soft_focal_loss_with_prob
from e2edet.ops.boxes import decode_ltrb
from e2edet.models.dense.detector import flatten_levels
from e2edet.models.dense.head import DenseHead
from e2edet.models.dense.points import anchor_points
from tests.test_assign_o2f import A, B, C, D, expected_fixture, fixture
from tests.test_engine_trainer import BoxDataset, collate, make_cfg

GT_BOXES = [A, B, C, D]
EMPTY = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def fixture_outputs(gts="ABCD", batch=1):
    """Model-output dict of the fixture: sigmoid(ctr) varies over points, sigmoid(cls) = p / sigmoid(ctr)."""
    prob, boxes, points, strides, target = fixture(gts)
    ctr_prob = 0.95 + 0.04 * torch.linspace(0, 1, 80)
    cls_prob = prob / ctr_prob[None, :, None]
    _, _, levels, counts = anchor_points([(8, 8), (4, 4)], [8, 16])
    outputs = {
        "pred_logits": torch.logit(cls_prob.double()).float().repeat(batch, 1, 1).requires_grad_(),
        "pred_ctr": torch.logit(ctr_prob.double()).float()[None].repeat(batch, 1).requires_grad_(),
        "pred_boxes": boxes.repeat(batch, 1, 1).requires_grad_(),
        "points": points, "strides": strides, "levels": levels, "num_points_per_level": counts,
    }
    return outputs, target


def joint_prob(outputs):
    return (outputs["pred_logits"].sigmoid() * outputs["pred_ctr"].sigmoid().unsqueeze(-1)).detach().double()


def cls_loss_by_hand(q, fg):
    """[sum_neg 0.75 q^2 (-log(1-q)) + sum_fg w BCE(q, s)] over one image; q [R, K] float64, fg {j: (c, s, w)}."""
    total = 0.0
    for j in range(q.shape[0]):
        for c in range(q.shape[1]):
            v = q[j, c].item()
            if j in fg and fg[j][0] == c:
                s, w = fg[j][1], fg[j][2]
                total += w * -(s * math.log(v) + (1 - s) * math.log(1 - v))
            else:
                total += 0.75 * v * v * -math.log(1 - v)
    return total


def centerness_by_hand(outputs, j, g):
    x, y = outputs["points"][j].tolist()
    x1, y1, x2, y2 = GT_BOXES[g]
    l, t, r, b = x - x1, y - y1, x2 - x, y2 - y
    return math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))


def box_loss_by_hand(outputs, fg):
    """2 · sum ctr_j (1 - GIoU_j) / sum ctr_j over the foreground points of one image."""
    num, den = 0.0, 0.0
    for j, (g, _, _) in fg.items():
        ctr = centerness_by_hand(outputs, j, g)
        giou = generalized_box_iou(outputs["pred_boxes"][0, j][None].detach(), torch.tensor([GT_BOXES[g]]))
        num += ctr * (1 - giou.item())
        den += ctr
    return 2.0 * num / den


def test_soft_focal_loss_formula_and_gradient():
    gen = torch.Generator().manual_seed(0)
    prob = (0.02 + 0.96 * torch.rand(2, 6, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([[0, 3, 2, 3, 1, 0], [3, 3, 1, 3, 3, 2]])
    soft = torch.rand(2, 6, generator=gen, dtype=torch.float64)
    weight = torch.where(torch.rand(2, 6, generator=gen) > 0.5, 1.0, 0.4).double()
    loss = soft_focal_loss_with_prob(prob, labels, soft, weight)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    expected = sum(cls_loss_by_hand(prob[b].detach(), {j: (labels[b, j].item(), soft[b, j].item(),
                                                           weight[b, j].item()) for j in range(6)})
                   for b in range(2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the replaced entries carry only w·dBCE(q, s)/dq: no leftover focal gradient of the negative term
    loss.backward()
    q = prob.detach()
    grad = 0.75 * (2 * q * -torch.log1p(-q) + q * q / (1 - q))
    pos = labels < 3
    qp, sp, wp = q[pos].gather(-1, labels[pos, None]).squeeze(-1), soft[pos], weight[pos]
    grad[pos] = grad[pos].scatter(-1, labels[pos, None], (wp * (qp - sp) / (qp * (1 - qp)))[:, None])
    torch.testing.assert_close(prob.grad, grad.float().double(), rtol=1e-5, atol=1e-6)


def test_schedule_values():
    assert soft_target_scale(0, 12) == pytest.approx(0.6)
    assert soft_target_scale(11, 12) == pytest.approx(0.2)
    assert soft_target_scale(6, 12) == pytest.approx(0.38182, abs=1e-5)
    assert soft_target_scale(1, 36) == pytest.approx(0.58857, abs=1e-5)
    assert soft_target_scale(35, 36) == pytest.approx(0.2)
    expected_1x = [0.6, 0.5636, 0.5273, 0.4909, 0.4545, 0.4182, 0.3818]
    assert [round(soft_target_scale(e, 12), 4) for e in range(7)] == expected_1x
    steps = [soft_target_scale(e + 1, 50) - soft_target_scale(e, 50) for e in range(49)]
    assert max(steps) == pytest.approx(min(steps)) == pytest.approx(-0.4 / 49)  # linear
    assert soft_target_scale(0, 1) == 0.6 and soft_target_scale(3, 0) == 0.6  # max_epoch <= 1 guarded
    assert soft_target_scale(-2, 12) == 0.6 and soft_target_scale(40, 12) == pytest.approx(0.2)  # clamped
    assert soft_target_scale(1, 3, max_t=1.0, min_t=0.0) == pytest.approx(0.5)


@pytest.mark.parametrize("epoch", [0, 6, 11])
def test_cls_and_box_losses_on_the_fixture(epoch):
    outputs, target = fixture_outputs()
    losses = DenseCriterion(4, assigner="o2f", score="cls_ctr")(outputs, [target], epoch=epoch, max_epoch=12)
    t = soft_target_scale(epoch, 12)
    assert losses["soft_t"].item() == pytest.approx(t)
    assert losses["num_pos"].item() == 11 and losses["num_soft"].item() == 8 and losses["num_gt"].item() == 4
    fg = expected_fixture(t)  # GT index = class index in the fixture
    # property 7: / max(#fg, 1) with the 8 soft anchors counted (11, not 3 certain points or 4 GTs)
    assert losses["loss_cls"].item() == pytest.approx(cls_loss_by_hand(joint_prob(outputs)[0], fg) / 11, rel=1e-5)
    # property 8: GIoU on certain and soft points, centerness-weighted, / sum of the centerness targets, weight 2
    assert losses["loss_box"].item() == pytest.approx(box_loss_by_hand(outputs, fg), rel=1e-5)
    certain_only = {j: v for j, v in fg.items() if v[2] == 1.0}
    assert box_loss_by_hand(outputs, certain_only) != pytest.approx(losses["loss_box"].item(), rel=1e-3)
    assert set(losses) == {"loss_cls", "loss_box", "num_pos", "num_gt", "num_fg_per_gt", "num_soft", "soft_t"}


def test_epoch_changes_the_soft_targets_through_the_criterion():
    outputs, target = fixture_outputs()
    crit = DenseCriterion(4, assigner="o2f", score="cls_ctr")
    for epoch, t in [(0, 0.6), (6, 0.381818), (11, 0.2)]:
        asg = crit.assign(outputs, [target], epoch=epoch, max_epoch=12)
        assert asg.soft_targets[0, 51].item() == pytest.approx(t, rel=1e-5)  # D's best soft anchor gets t(e)
        assert asg.soft_targets[0, 43].item() == pytest.approx(t / 4, rel=1e-4)
    first, last = (crit(outputs, [target], epoch=e, max_epoch=12)["loss_cls"].item() for e in (0, 11))
    q = joint_prob(outputs)[0]
    by_hand = [cls_loss_by_hand(q, expected_fixture(t)) / 11 for t in (0.6, 0.2)]
    assert first - last == pytest.approx(by_hand[0] - by_hand[1], rel=2e-2)  # the soft part only (1.5e-3 here)
    # max_epoch = 1 (one-epoch run) is guarded: t = 0.6, finite losses
    losses = crit(outputs, [target], epoch=0, max_epoch=1)
    assert losses["soft_t"].item() == pytest.approx(0.6) and torch.isfinite(losses["loss_cls"])


def test_topk_one_is_bce_on_positives_and_focal_negatives():
    # property 6: positives 69 (A), 19 (B), 44 (D) as argmax POTO; BCE(q, 1) without alpha or focal factor
    outputs, target = fixture_outputs()
    losses = DenseCriterion(4, assigner="o2f", score="cls_ctr", o2f_topk=1)(outputs, [target], epoch=5, max_epoch=12)
    fg = {69: (0, 1.0, 1.0), 19: (1, 1.0, 1.0), 44: (3, 1.0, 1.0)}
    assert losses["num_pos"].item() == 3 and losses["num_soft"].item() == 0
    assert losses["loss_cls"].item() == pytest.approx(cls_loss_by_hand(joint_prob(outputs)[0], fg) / 3, rel=1e-5)


def test_normalisers_are_all_reduced_means(monkeypatch):
    outputs, target = fixture_outputs()
    ref = DenseCriterion(4, assigner="o2f", score="cls_ctr")(outputs, [target])
    ctr_sum = sum(centerness_by_hand(outputs, j, g) for j, (g, _, _) in expected_fixture(0.6).items())
    monkeypatch.setattr(dc, "reduce_mean", lambda value: torch.as_tensor(value, dtype=torch.float32) * 0 + 0.5)
    scaled = DenseCriterion(4, assigner="o2f", score="cls_ctr")(outputs, [target])
    # the cls normaliser is clamped at 1 (0.5 -> 1); the centerness normaliser only at 1e-6 (0.5 kept)
    assert scaled["loss_cls"].item() == pytest.approx(ref["loss_cls"].item() * 11, rel=1e-5)
    assert scaled["loss_box"].item() == pytest.approx(ref["loss_box"].item() * ctr_sum / 0.5, rel=1e-5)


def test_images_without_gt_give_finite_losses():
    outputs, target = fixture_outputs(batch=2)
    crit = DenseCriterion(4, assigner="o2f", score="cls_ctr")
    losses = crit(outputs, [target, EMPTY], epoch=3, max_epoch=12)
    assert losses["num_pos"].item() == 11 and all(torch.isfinite(v) for v in losses.values())
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert all(torch.isfinite(outputs[k].grad).all() for k in ("pred_logits", "pred_ctr", "pred_boxes"))
    # a batch without any GT: only negatives, divided by 1; the box loss is an exact 0 still in the graph
    outputs, _ = fixture_outputs(batch=2)
    losses = crit(outputs, [EMPTY, EMPTY], epoch=3, max_epoch=12)
    q = joint_prob(outputs)
    assert losses["loss_cls"].item() == pytest.approx(2 * cls_loss_by_hand(q[0], {}), rel=1e-5)
    assert losses["loss_box"].item() == 0.0 and losses["num_pos"].item() == 0 and losses["num_soft"].item() == 0
    (losses["loss_cls"] + losses["loss_box"]).backward()
    assert torch.all(outputs["pred_boxes"].grad == 0) and torch.isfinite(outputs["pred_ctr"].grad).all()


def _head_outputs(head, batch=2, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, 8, size // s, size // s, generator=gen) for s in (8, 16)]
    out = head(feats)
    points, strides, levels, counts = anchor_points([(size // 8, size // 8), (size // 16, size // 16)], [8, 16])
    ltrb = flatten_levels(out["bbox_ltrb"])
    return {"pred_logits": flatten_levels(out["cls_logits"]), "pred_ctr": flatten_levels(out["centerness"])[..., 0],
            "pred_boxes": decode_ltrb(points[None], ltrb), "points": points, "strides": strides, "levels": levels,
            "num_points_per_level": counts}


def test_centerness_branch_learns_only_through_the_cls_loss():
    # property 9, on a DenseHead with O2F's centerness branch (3 convs + centerness conv), tiny channels
    torch.manual_seed(0)
    head = DenseHead(8, num_classes=2, num_levels=2, num_convs=1, strides=(8, 16), centerness=True,
                     ctr_convs=3, ctr_channels=8)
    with torch.no_grad():
        head.bbox_pred.bias.fill_(1.0)  # boxes about one stride wide, so predictions overlap the GTs
    outputs = _head_outputs(head)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 28.0, 60.0, 62.0]]),
                "labels": torch.tensor([0, 1])}, EMPTY]
    losses = DenseCriterion(2, assigner="o2f", score="cls_ctr")(outputs, targets, epoch=0, max_epoch=12)
    assert losses["num_pos"].item() > 2 and losses["num_soft"].item() > 0
    ctr_params = [head.centerness.weight, head.centerness.bias, *head.ctr_tower.parameters()]
    box_grads = torch.autograd.grad(losses["loss_box"], ctr_params + [head.bbox_pred.weight], retain_graph=True,
                                    allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in box_grads[:-1])  # no centerness loss, no box-loss path
    assert box_grads[-1].abs().sum() > 0
    cls_grads = torch.autograd.grad(losses["loss_cls"], ctr_params, retain_graph=True)
    assert all(torch.isfinite(g).all() for g in cls_grads)
    assert cls_grads[0].abs().sum() > 0 and cls_grads[2].abs().sum() > 0  # centerness conv and first ctr conv
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    for g_total, g_cls in zip(torch.autograd.grad(total, ctr_params), cls_grads):
        torch.testing.assert_close(g_total, g_cls)  # the whole centerness gradient comes from loss_cls


class _DenseTiny(torch.nn.Module):
    """Stride-8 and stride-16 convs + an O2F DenseHead: the dense model-output dict for 32x32 images."""

    def __init__(self):
        super().__init__()
        self.p3 = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.p4 = torch.nn.Conv2d(8, 8, 2, stride=2)
        self.head = DenseHead(8, 1, num_levels=2, num_convs=1, strides=(8, 16), centerness=True, ctr_convs=3,
                              ctr_channels=8)
        with torch.no_grad():
            self.head.bbox_pred.bias.fill_(1.0)

    def forward(self, images, image_sizes=None):
        p3 = self.p3(images)
        out = self.head([p3, self.p4(p3)])
        points, strides, levels, counts = anchor_points([(4, 4), (2, 2)], [8, 16])
        return {"pred_logits": flatten_levels(out["cls_logits"]),
                "pred_ctr": flatten_levels(out["centerness"])[..., 0],
                "pred_boxes": decode_ltrb(points[None], flatten_levels(out["bbox_ltrb"])), "points": points,
                "strides": strides, "levels": levels, "num_points_per_level": counts}


class _Recorder(DenseCriterion):
    def __init__(self):
        super().__init__(1, assigner="o2f", score="cls_ctr")
        self.calls = []

    def forward(self, outputs, targets, epoch=0, max_epoch=1):
        losses = super().forward(outputs, targets, epoch=epoch, max_epoch=max_epoch)
        self.calls.append((epoch, max_epoch, round(losses["soft_t"].item(), 6)))
        return losses


def test_trainer_advances_the_epoch_of_an_iteration_schedule(tmp_path):
    # 8 images, batch 4 -> 2 iterations per epoch; max_iters 5 -> ceil(5 / 2) = 3 epochs, t = 0.6, 0.4, 0.2
    torch.manual_seed(0)
    loader = DataLoader(BoxDataset(), batch_size=4, shuffle=True, collate_fn=collate)
    crit = _Recorder()
    cfg = make_cfg(max_iters=5, epochs=100, checkpoint_period=0, eval_period=0, amp=False, lr=0.01)
    trainer = Trainer(_DenseTiny(), crit, loader, cfg, tmp_path, progress=False)
    trainer.fit()
    assert crit.calls == [(0, 3, 0.6), (0, 3, 0.6), (1, 3, 0.4), (1, 3, 0.4), (2, 3, 0.2)]


def test_num_soft_counts_soft_anchors_even_with_equal_weights():
    outputs, target = fixture_outputs()
    losses = DenseCriterion(4, assigner="o2f", score="cls_ctr", soft_weight=1.0)(outputs, [target], epoch=2,
                                                                                  max_epoch=12)
    assert losses["num_pos"].item() == 11 and losses["num_soft"].item() == 8
