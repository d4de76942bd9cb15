"""Set criterion of Sparse R-CNN / AdaMixer (spec query.md 1.4, 1.8 #8, 1.9, 2.4)."""

import math

import pytest
import torch

from e2edet.losses.set_criterion import SetCriterion


def _target(boxes, labels, size):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "size": torch.tensor(size)}


def _focal(x, y, alpha=0.25, gamma=2.0):
    """Scalar sigmoid focal loss written out: -α(1-p)^γ log p for y = 1, -(1-α) p^γ log(1-p) for y = 0."""
    p = 1.0 / (1.0 + math.exp(-x))
    return -alpha * (1 - p) ** gamma * math.log(p) if y else -(1 - alpha) * p**gamma * math.log(1 - p)


def _stages(num_stages, batch, num_queries, num_classes, gen, size=(100, 200)):
    stages = []
    for _ in range(num_stages):
        logits = (torch.randn(batch, num_queries, num_classes, generator=gen)).requires_grad_()
        xy = torch.rand(batch, num_queries, 2, generator=gen) * torch.tensor([size[1] * 0.6, size[0] * 0.6])
        wh = torch.rand(batch, num_queries, 2, generator=gen) * 30 + 5
        boxes = torch.cat([xy, xy + wh], dim=-1).requires_grad_()
        stages.append({"pred_logits": logits, "pred_boxes": boxes})
    return {"stages": stages, **stages[-1]}


def test_hand_computed_single_gt():
    logits = torch.tensor([[[2.0, -1.0], [-3.0, 0.5]]], requires_grad=True)
    boxes = torch.tensor([[[20.0, 20.0, 60.0, 60.0], [150.0, 70.0, 190.0, 95.0]]], requires_grad=True)
    outputs = {"stages": [{"pred_logits": logits, "pred_boxes": boxes}]}
    targets = [_target([10, 10, 50, 50], [0], (100, 200))]  # (h, w) = (100, 200)
    out = SetCriterion(num_classes=2)(outputs, targets)

    # query 0 is matched to the GT (class 0); query 1 and every other class column are background
    focal = _focal(2.0, 1) + _focal(-1.0, 0) + _focal(-3.0, 0) + _focal(0.5, 0)
    l1 = 10 / 200 + 10 / 100 + 10 / 200 + 10 / 100
    inter, union, hull = 30 * 30, 40 * 40 * 2 - 30 * 30, 50 * 50
    giou = inter / union - (hull - union) / hull
    assert out["stage0_loss_cls"].item() == pytest.approx(2.0 * focal, rel=1e-5)
    assert out["stage0_loss_bbox"].item() == pytest.approx(5.0 * l1, rel=1e-5)
    assert out["stage0_loss_iou"].item() == pytest.approx(2.0 * (1 - giou), rel=1e-5)
    assert out["stage0_pos_acc"].item() == pytest.approx(100.0)
    assert out["num_gt"].item() == 1.0
    # a wrong argmax class gives 0 % accuracy
    wrong = {"stages": [{"pred_logits": logits.detach() * torch.tensor([-1.0, -1.0]), "pred_boxes": boxes}]}
    assert SetCriterion(num_classes=2)(wrong, targets)["stage0_pos_acc"].item() == 0.0


def test_six_stage_keys_and_gradients_reach_every_stage():
    gen = torch.Generator().manual_seed(0)
    outputs = _stages(6, 2, 5, 3, gen)
    targets = [_target([[10, 10, 40, 50], [60, 20, 90, 45]], [0, 2], (100, 200)),
               _target([[5, 5, 30, 30]], [1], (80, 120))]
    out = SetCriterion(num_classes=3)(outputs, targets)
    expected = {f"stage{s}_{k}" for s in range(6) for k in ("loss_cls", "loss_bbox", "loss_iou", "pos_acc")}
    assert set(out) == expected | {"num_gt"}
    for key, value in out.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value), key
        assert value.requires_grad == ("loss" in key.split("_")), key
    sum(v for k, v in out.items() if "loss" in k.split("_")).backward()
    for s, stage in enumerate(outputs["stages"]):
        assert stage["pred_logits"].grad.abs().sum() > 0, s
        assert stage["pred_boxes"].grad.abs().sum() > 0, s


def test_avg_factor_is_number_of_matched_gts_shared_by_stages():
    gen = torch.Generator().manual_seed(1)
    outputs = _stages(2, 2, 4, 3, gen)
    targets = [_target([[10, 10, 40, 50], [60, 20, 90, 45]], [0, 2], (100, 200)),
               _target([[5, 5, 30, 30]], [1], (80, 120))]
    criterion = SetCriterion(num_classes=3, cls_weight=1.0)
    out = criterion(outputs, targets)
    for s, stage in enumerate(outputs["stages"]):
        logits = stage["pred_logits"].detach()
        matches = criterion.matcher(logits, stage["pred_boxes"], targets)
        total = 0.0
        for b, (pred_idx, gt_idx) in enumerate(matches):
            label_of = {q: int(targets[b]["labels"][g]) for q, g in zip(pred_idx.tolist(), gt_idx.tolist())}
            for q in range(4):
                for k in range(3):
                    total += _focal(float(logits[b, q, k]), label_of.get(q) == k)
        assert out[f"stage{s}_loss_cls"].item() == pytest.approx(total / 3, rel=1e-5)  # 3 GTs in the batch


def test_zero_gt_batch_is_finite_with_exact_zero_box_losses():
    gen = torch.Generator().manual_seed(2)
    outputs = _stages(6, 2, 4, 3, gen)
    targets = [_target([], [], (100, 200)), _target([], [], (90, 90))]
    out = SetCriterion(num_classes=3)(outputs, targets)
    loss = sum(v for k, v in out.items() if "loss" in k.split("_"))
    assert torch.isfinite(loss)
    for s in range(6):
        assert out[f"stage{s}_loss_bbox"].item() == 0.0 and out[f"stage{s}_loss_iou"].item() == 0.0
        assert out[f"stage{s}_loss_bbox"].requires_grad and out[f"stage{s}_pos_acc"].item() == 0.0
    assert out["num_gt"].item() == 0.0
    loss.backward()
    for stage in outputs["stages"]:
        assert stage["pred_boxes"].grad is not None and torch.all(stage["pred_boxes"].grad == 0)
        assert torch.isfinite(stage["pred_logits"].grad).all() and stage["pred_logits"].grad.abs().sum() > 0
    # all-background focal loss, normalised by the clamp max(#GT, 1) = 1
    logits = outputs["stages"][0]["pred_logits"].detach()
    expected = 2.0 * sum(_focal(float(x), 0) for x in logits.flatten())
    assert out["stage0_loss_cls"].item() == pytest.approx(expected, rel=1e-5)


def test_low_precision_inputs_give_float32_losses_and_bad_inputs_raise():
    gen = torch.Generator().manual_seed(3)
    outputs = _stages(1, 1, 3, 2, gen)
    outputs["stages"][0]["pred_logits"] = outputs["stages"][0]["pred_logits"].detach().bfloat16()
    targets = [_target([[10, 10, 40, 50]], [1], (100, 200))]
    out = SetCriterion(num_classes=2)(outputs, targets)
    assert all(v.dtype == torch.float32 for v in out.values())
    with pytest.raises(ValueError, match="classes"):
        SetCriterion(num_classes=5)(outputs, targets)
    with pytest.raises(ValueError, match="stages"):
        SetCriterion(num_classes=2)({"pred_logits": outputs["pred_logits"]}, targets)
    with pytest.raises(ValueError, match="targets for a batch"):
        SetCriterion(num_classes=2)(outputs, targets * 2)
