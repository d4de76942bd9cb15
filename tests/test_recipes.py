"""Every registered recipe builds, trains one step on CPU with finite losses and gradients for every trainable
parameter, and post-processes (issue "query-based detectors", Done means; dense recipes likewise).

The CPU-sized recipes run at their real size. The published COCO recipes are built at their real size too (ResNet-50/101,
256-d, 100/300 queries), but their training step runs with a narrower backbone/width and fewer queries (:data:`SHRINK`)
and otherwise the recipe's exact method settings, so the whole file stays within CI's 2-core budget.
"""

import math

import pytest
import torch

from e2edet.build import build_criterion, build_model, build_postprocessor
from e2edet.config import apply_overrides
from e2edet.engine.logger import is_loss_key
from e2edet.recipes import get_recipe, list_recipes

NAMES = [name for name, _ in list_recipes()]
#: Narrower settings for the training step of the published recipes, per architecture (each takes only its own keys).
SHRINK = {
    "dense": ["backbone=resnet18", "model.fpn_channels=64", "model.num_convs=2"],
    "sparse_rcnn": ["backbone=resnet18", "model.fpn_channels=64", "model.num_queries=20", "model.dim_feedforward=128",
                    "model.dynamic_dim=16"],
    "adamixer": ["backbone=resnet18", "model.fpn_channels=64", "model.num_queries=20", "model.dim_feedforward=128"],
    "deformable_detr": ["backbone=resnet18", "model.fpn_channels=64", "model.num_queries=20",
                        "model.dim_feedforward=128", "model.enc_layers=2", "model.dec_layers=2"],
}


def _targets(size, masks=False):
    h, w = size
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, w - 2.0, h - 3.0]])
    target = {"boxes": boxes, "labels": torch.tensor([0, 2]), "size": torch.tensor(size),
              "orig_size": torch.tensor([2 * h, 2 * w]), "image_id": 1}
    if masks:  # instance-segmentation recipes: an ellipse inside each box, in the (padded) input frame
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        c, r = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
        target["masks"] = ((((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2
                            + ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2) <= 1).to(torch.uint8)
    return [target]


@pytest.mark.parametrize("name", NAMES)
def test_recipe_trains_one_step_with_finite_gradients(name):
    torch.manual_seed(0)
    cfg = apply_overrides(get_recipe(name), ["model.pretrained=false"])
    cfg.model.num_classes, cfg.model.class_names = 3, ("a", "b", "c")
    if "cpu" not in name:
        full = build_model(cfg)  # the published size builds
        assert sum(p.numel() for p in full.parameters()) > 10_000_000
        del full
        cfg = apply_overrides(cfg, SHRINK[cfg.model.arch])
    model, criterion, post = build_model(cfg).train(), build_criterion(cfg), build_postprocessor(cfg)
    size = (64, 96)
    targets = _targets(size, masks=getattr(cfg.model, "masks", False))
    outputs = model(torch.randn(1, 3, *size), torch.tensor([size]))
    losses = criterion(outputs, targets, epoch=0, max_epoch=cfg.train.epochs or 1)
    keys = [k for k in losses if is_loss_key(k)]
    assert keys and all(math.isfinite(float(losses[k].detach())) for k in keys)
    sum(losses[k] for k in keys).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    model.eval()
    with torch.no_grad():
        dets = post(model(torch.randn(1, 3, *size), torch.tensor([size])), [size], [[2 * size[0], 2 * size[1]]])
    assert len(dets) == 1 and len(dets[0]["scores"]) <= cfg.test.max_detections
    assert torch.all(dets[0]["labels"] < 3)


def test_query_recipes_stage_and_proposal_init():
    """The published COCO recipes keep the official inits; only the CPU Sparse R-CNN recipe uses AdaMixer's zero
    stage init (D-RMM + Sparse R-CNN measured worse with it), and D-RMM + AdaMixer starts from the grid."""
    for name in NAMES:
        m = get_recipe(name).model
        if m.arch == "sparse_rcnn":
            cpu_set_loss = name.endswith("_mnv2_cpu") and not m.drmm
            assert m.stage_init == ("adamixer" if cpu_set_loss else "official"), name
        if m.arch == "adamixer":
            assert m.proposal_init == ("grid" if m.drmm else ""), name


def test_query_matching_costs_come_from_the_loss_section():
    """``loss.cost_*`` reach the Hungarian matcher, ``loss.*_weight`` the losses (separately)."""
    cfg = apply_overrides(get_recipe("sparse_rcnn_mnv2_cpu"), ["loss.cost_class=0.5", "loss.cost_l1=1",
                                                               "loss.cost_giou=3", "loss.l1_weight=4"])
    cfg.model.num_classes = 3
    criterion = build_criterion(cfg)
    matcher = criterion.sets[0].matcher
    assert (matcher.cost_class, matcher.cost_l1, matcher.cost_giou) == (0.5, 1.0, 3.0)
    assert (criterion.sets[0].cls_weight, criterion.sets[0].l1_weight, criterion.sets[0].giou_weight) == (2.0, 4.0, 2.0)


def test_deformable_detr_recipes_follow_the_published_settings():
    """specs/detr.md 1.6: AdamW 2e-4 (backbone and offset/reference projections x0.1), clip 0.1, no warm-up, lr drop
    at epoch 40 of 50 (H-DETR's 12-epoch baselines: at 11), 300 queries, top-100 sigmoid scores without NMS."""
    variants = {"deformable_detr_r50_50e": (50, 1024, 0.1, False, False, False),
                "deformable_detr_refine_r50_50e": (50, 1024, 0.1, True, False, False),
                "deformable_detr_two_stage_r50_50e": (50, 1024, 0.1, True, True, False),
                "deformable_detr_two_stage_ffn2048_r50_12e": (12, 2048, 0.1, True, True, False),
                "deformable_detr_pp_r50_12e": (12, 2048, 0.0, True, True, True)}
    for name, (epochs, ffn, dropout, refine, two_stage, tricks) in variants.items():
        cfg = get_recipe(name)
        m, t, d = cfg.model, cfg.train, cfg.data
        assert (m.backbone, m.fpn_channels, m.num_queries, m.enc_layers, m.dec_layers) == ("resnet50", 256, 300, 6, 6)
        assert (m.dim_feedforward, m.dropout, m.with_box_refine, m.two_stage) == (ffn, dropout, refine, two_stage)
        assert m.mixed_selection == m.look_forward_twice == tricks
        assert (m.lr_backbone_mult, m.lr_linear_proj_mult) == (0.1, 0.1)
        assert (t.optimizer, t.lr, t.weight_decay, t.clip_grad_norm, t.warmup_iters) == ("adamw", 2e-4, 1e-4, 0.1, 0)
        assert t.epochs == epochs and [round(s * epochs) for s in t.steps] == [40 if epochs == 50 else 11]
        assert t.batch_size == 2 and t.eval_period == 0 and d.dataset == "" and d.crop
        assert d.train_min_sizes == tuple(range(480, 801, 32)) and (d.train_max_size, d.test_min_size) == (1333, 800)
        assert (cfg.test.score, cfg.test.max_detections, cfg.test.nms_iou) == ("cls", 100, 0.0)
    for name in ("deformable_detr_mnv2_cpu", "deformable_detr_refine_mnv2_cpu", "deformable_detr_two_stage_mnv2_cpu",
                 "deformable_detr_pp_mnv2_cpu"):
        m = get_recipe(name).model
        assert (m.backbone, m.fpn_channels, m.num_queries, m.enc_layers, m.dec_layers) == ("mobilenet_v2", 128, 100, 3, 6)
        assert m.dim_feedforward == (1024 if "_pp_" in name else 512)
