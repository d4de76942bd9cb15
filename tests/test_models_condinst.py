"""O2F's instance-segmentation variant end to end on a tiny model: the model's mask outputs, the criterion (mask
centroid prior, stride-normalised GIoU, dice and semantic losses, gradients) and the post-processor (threshold on the
cls probability, masks pasted into the original image)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from e2edet.assign.o2f import O2FAssigner
from e2edet.assign.prior import mask_centroids
from e2edet.build import build_criterion, build_model, build_postprocessor
from e2edet.config import ConfigError, apply_overrides
from e2edet.models.dense.postprocess import DensePostProcessor
from e2edet.recipes import get_recipe

TINY = ["model.pretrained=false", "model.fpn_channels=32", "model.num_convs=1", "model.mask_channels=16",
        "model.mask_convs=1"]


def _cfg(extra=()):
    cfg = apply_overrides(get_recipe("o2f_condinst_mnv2_cpu"), [*TINY, *extra])
    cfg.model.num_classes, cfg.model.class_names = 2, ("a", "b")
    return cfg


def _targets(h, w):
    """Two objects with masks in the padded frame (an L shape and a disk) and one image without objects."""
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 8:40, 6:50] = 1
    masks[0, 8:20, 6:20] = 0
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks[1] = ((xx - 70) ** 2 + (yy - 40) ** 2 <= 15**2).to(torch.uint8)
    boxes = torch.tensor([[6.0, 8.0, 50.0, 40.0], [55.0, 25.0, 86.0, 56.0]])
    one = {"boxes": boxes, "labels": torch.tensor([0, 1]), "masks": masks, "size": torch.tensor([h, w]),
           "orig_size": torch.tensor([2 * h, 2 * w]), "image_id": 1}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, h, w, dtype=torch.uint8), "size": torch.tensor([h, w]),
             "orig_size": torch.tensor([h, w]), "image_id": 2}
    return [one, empty]


def test_model_outputs_the_mask_keys():
    torch.manual_seed(0)
    model = build_model(_cfg()).train()
    out = model(torch.randn(2, 3, 64, 96))
    r = out["pred_logits"].shape[1]
    assert out["pred_mask_params"].shape == (2, r, 169)
    assert out["mask_feats"].shape == (2, 8, 8, 12) and out["mask_feat_stride"] == 8
    assert out["pred_semantic"].shape == (2, 2, 8, 12)
    assert "pred_ctr" in out  # the O2F joint score
    model.eval()
    with torch.no_grad():
        assert "pred_semantic" not in model(torch.randn(1, 3, 64, 96))  # auxiliary, training only
    plain = build_model(apply_overrides(get_recipe("o2f_mnv2_cpu"), TINY[:3] + ["model.num_classes=2"]))
    assert "mask_feats" not in plain(torch.randn(1, 3, 64, 96))


def test_config_checks():
    with pytest.raises(ConfigError, match="data.masks=true"):
        _cfg(["data.masks=false"])
    with pytest.raises(ConfigError, match="loss.assigner=o2f"):
        _cfg(["loss.assigner=poto", "loss.score=cls"])


def test_criterion_losses_gradients_and_stride_normalised_giou():
    torch.manual_seed(0)
    cfg = _cfg()
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    out = model(torch.randn(2, 3, 64, 96))
    targets = _targets(64, 96)
    losses = criterion(out, targets, epoch=0, max_epoch=12)
    for key in ("loss_cls", "loss_box", "loss_mask", "loss_sem"):
        assert math.isfinite(float(losses[key].detach())), key
    assert float(losses["num_mask"]) == float(losses["num_pos"]) > 0  # every foreground point gets a mask loss
    assert 0 < float(losses["loss_mask"].detach()) <= 2.0  # 2 x mean dice, dice in [0, 1]
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    for name in ("head.controller.weight", "mask_branch.tower.0.0.weight", "mask_branch.refine.2.0.weight",
                 "mask_branch.semantic.2.weight", "head.centerness.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # stride-normalised GIoU equals the pixel-space GIoU (GIoU is invariant to the common scaling)
    out = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
    pos = torch.zeros(out["pred_boxes"].shape[:2], dtype=torch.bool)
    pos[0, :40] = True
    target = torch.tensor([[6.0, 8.0, 50.0, 40.0]]).expand(40, 4)
    normalised = criterion._giou(out, pos, target)
    pixels = generalized_box_iou_loss(out["pred_boxes"][pos], target, reduction="none")
    torch.testing.assert_close(normalised, pixels, rtol=1e-4, atol=1e-5)


def test_criterion_without_foreground_and_without_masks():
    torch.manual_seed(0)
    cfg = _cfg()
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    out = model(torch.randn(1, 3, 64, 96))
    empty = _targets(64, 96)[1:]
    losses = criterion(out, empty)
    assert float(losses["loss_mask"].detach()) == 0.0 and losses["loss_mask"].requires_grad
    assert float(losses["loss_sem"].detach()) > 0  # every pixel is background: the negatives still count
    with pytest.raises(KeyError, match="data.masks"):
        criterion(out, [{k: v for k, v in empty[0].items() if k != "masks"}])


def test_o2f_prior_follows_the_mask_centroid():
    """A thin L-shaped object: its box center lies outside the mask; the centroid prior picks other points."""
    points = torch.tensor([[x + 4.0, y + 4.0] for y in range(0, 64, 8) for x in range(0, 64, 8)])
    strides = torch.full((64,), 8.0)
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 0:8, 0:64] = True  # top bar
    masks[0, 0:64, 0:8] = True  # left bar
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    centers = mask_centroids(masks, boxes)
    assert centers[0, 0] < 20 and centers[0, 1] < 20  # near the corner, the box center is (32, 32)
    pred = boxes.expand(64, 4).clone()[None]
    prob = torch.full((1, 64, 1), 0.5)
    targets = [{"boxes": boxes, "labels": torch.tensor([0])}]
    o2f = O2FAssigner(topk=64)
    box_prior = o2f(prob, pred, points, strides, targets, 1).pos_mask[0]
    mask_prior = o2f(prob, pred, points, strides, targets, 1, centers=[centers]).pos_mask[0]
    near = lambda c: (points - c).abs().amax(dim=1) < 12  # noqa: E731  (1.5 strides)
    assert torch.equal(box_prior, near(torch.tensor([32.0, 32.0])))
    assert torch.equal(mask_prior, near(centers[0]))


def test_postprocessor_thresholds_cls_and_pastes_masks():
    torch.manual_seed(0)
    cfg = _cfg()
    model, post = build_model(cfg).eval(), build_postprocessor(cfg)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    r = out["pred_logits"].shape[1]
    # two points above the cls threshold: point 3 (cls 0.9, ctr 0.5) and point 40 (cls 0.06, ctr 0.5: product 0.03,
    # kept since the threshold is on cls); point 7 (cls 0.04, ctr 0.99) is dropped
    logits = torch.full((1, r, 2), -10.0)
    ctr = torch.full((1, r), 0.0)
    for point, cls, c in ((3, 0.9, 0.5), (40, 0.06, 0.5), (7, 0.04, 0.99)):
        logits[0, point, 1] = math.log(cls / (1 - cls))
        ctr[0, point] = math.log(c / (1 - c))
    boxes = torch.cat([out["points"] - 10, out["points"] + 10], dim=1)[None]  # non-empty boxes for every point
    out.update(pred_logits=logits, pred_ctr=ctr, pred_boxes=boxes)
    sizes, orig = torch.tensor([[60, 90]]), torch.tensor([[120, 180]])
    det = post(out, sizes, orig)[0]
    torch.testing.assert_close(det["scores"], torch.tensor([0.45, 0.03]))
    assert det["masks"].dtype == torch.bool and det["masks"].shape == (2, 120, 180)
    assert DensePostProcessor(score="cls_ctr")(out, sizes, orig)[0]["scores"].tolist() == pytest.approx([0.45])
    with_nms = post(out, sizes, orig, nms_iou=0.5)[0]
    assert with_nms["masks"].shape[0] == with_nms["scores"].shape[0]


def test_published_recipes_follow_the_official_configs():
    """``configs/condinst_r50_{1x,3x}.py``: R-50, O2F top-7 with max_epoch = the schedule, GIoU 1.0, warm-up 500,
    steps 8/11 and 24/33, single scale 800 vs range 640-800, 100 detections, threshold 0.05 on cls."""
    for name, epochs, steps, sizes in (("o2f_condinst_r50_1x", 12, (8, 11), (800,)),
                                       ("o2f_condinst_r50_3x", 36, (24, 33), tuple(range(640, 801, 32)))):
        cfg = get_recipe(name)
        m, loss, t = cfg.model, cfg.loss, cfg.train
        assert m.backbone == "resnet50" and m.fpn_channels == 256 and m.num_convs == 4 and m.masks
        assert (m.mask_channels, m.mask_convs, m.mask_bases, m.ctr_convs, m.ctr_channels) == (128, 4, 8, 3, 64)
        assert cfg.data.masks and cfg.data.train_min_sizes == sizes and cfg.data.test_min_size == 800
        assert loss.assigner == "o2f" and loss.o2f_topk == 7 and loss.reg_weight == 1.0
        assert (loss.mask_weight, loss.sem_weight) == (2.0, 1.0)
        assert cfg.test.score == "cls_ctr_cls_thresh" and cfg.test.score_thresh == 0.05 and cfg.test.nms_iou == 0
        assert cfg.test.max_detections == 100 and cfg.test.topk_candidates == 1000
        assert t.epochs == epochs and [round(s * epochs) for s in t.steps] == list(steps)
        assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size) == ("sgd", 0.01, 0.9, 1e-4, 2)
        assert (t.warmup_iters, t.warmup_factor) == (500, 0.001)
    cpu = get_recipe("o2f_condinst_mnv2_cpu")
    assert cpu.data.dataset == "dsb2018" and cpu.model.backbone == "mobilenet_v2" and cpu.model.mask_bases == 8
