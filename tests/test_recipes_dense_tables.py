"""The dense recipes of DeFCN's COCO and CrowdHuman tables (specs/dense.md 2.6, 2.7): each recipe carries the
official config's settings (``Megvii-BaseDetection/DeFCN`` ``playground/detection/*/<folder>/config.py``), and the
config checks of the assigners they use. Every recipe's training step is in ``tests/test_recipes.py``."""

from __future__ import annotations

import pytest

from e2edet.build import build_criterion
from e2edet.config import ConfigError, apply_overrides
from e2edet.recipes import get_recipe, list_recipes

NAMES = {name for name, _ in list_recipes()}


def test_every_row_of_the_defcn_tables_has_a_recipe():
    coco = ["fcos", "fcos_wo_ctrness", "anchor", "center", "fg_loss", "poto", "poto_argmax", "poto_3dmf",
            "poto_3dmf_wo_gn", "defcn", "defcn_wo_gn"]
    assert {f"{v}_r50_3x_ms" for v in coco} | {"poto_r50_6x_ms", "poto_r50_9x_ms"} <= NAMES
    assert {f"{v}_r50_crowdhuman" for v in ("fcos", "atss", "poto", "poto_3dmf", "defcn")} <= NAMES
    cpu = ["fcos", "fcos_wo_ctrness", "atss", "anchor", "center", "fg_loss", "poto", "poto_3dmf", "defcn"]
    assert {f"{v}_mnv2_cpu" for v in cpu} <= NAMES


@pytest.mark.parametrize("schedule, iters, steps", [("6x", 540_000, (480_000, 520_000)),
                                                    ("9x", 810_000, (750_000, 790_000))])
def test_poto_long_schedules(schedule, iters, steps):
    cfg, base = get_recipe(f"poto_r50_{schedule}_ms"), get_recipe("poto_r50_3x_ms")
    assert cfg.train.max_iters == iters and tuple(round(s * iters) for s in cfg.train.steps) == steps
    assert (cfg.model, cfg.loss, cfg.test, cfg.data) == (base.model, base.loss, base.test, base.data)


def test_coco_method_settings():
    wo = get_recipe("fcos_wo_ctrness_r50_3x_ms")
    assert not wo.model.centerness and (wo.loss.assigner, wo.loss.reg_weight) == ("fcos", 1.0)
    assert (wo.test.score, wo.test.nms_iou) == ("cls", 0.6)
    assert not build_criterion(apply_overrides(wo, ["model.num_classes=2"])).centerness
    anchor = get_recipe("anchor_r50_3x_ms")
    assert (anchor.model.box_coder, anchor.model.anchor_size, anchor.loss.assigner) == ("anchor_deltas", 4.0, "anchor")
    for name, assigner in (("center_r50_3x_ms", "center"), ("fg_loss_r50_3x_ms", "fg_loss")):
        cfg = get_recipe(name)
        assert (cfg.loss.assigner, cfg.loss.score, cfg.loss.reg_weight, cfg.test.nms_iou) == (assigner, "cls", 2.0, 0)
    for name, aux in (("poto_3dmf_wo_gn_r50_3x_ms", False), ("defcn_wo_gn_r50_3x_ms", True)):
        m, loss = get_recipe(name).model, get_recipe(name).loss
        assert m.max_filter and not m.max_filter_gn and loss.aux == aux and loss.score == "cls_filter"
    for name in ("anchor_r50_3x_ms", "fg_loss_r50_3x_ms", "poto_3dmf_wo_gn_r50_3x_ms"):
        t = get_recipe(name).train
        assert (t.max_iters, t.lr, t.batch_size, t.warmup_iters, t.warmup_factor) == (270_000, 0.01, 2, 1000, 0.001)


@pytest.mark.parametrize("variant", ["fcos", "atss", "poto", "poto_3dmf", "defcn"])
def test_crowdhuman_recipes_follow_the_official_configs(variant):
    cfg = get_recipe(f"{variant}_r50_crowdhuman")
    d, t = cfg.data, cfg.train
    assert (d.train_min_sizes, d.train_max_size, d.test_min_size, d.test_max_size) == ((800,), 1400, 800, 1400)
    assert t.max_iters == 30_000 and [round(s * 30_000) for s in t.steps] == [20_000, 25_000]
    assert (t.optimizer, t.lr, t.batch_size) == ("sgd", 0.01, 2)  # x 8 GPUs = IMS_PER_BATCH 16
    assert cfg.test.max_detections == 500 and cfg.model.backbone == "resnet50"
    base = get_recipe(f"{variant}_r50_3x_ms") if variant != "atss" else None
    if variant in ("fcos", "atss"):  # one-to-many + NMS 0.6; FCOS keeps its 1.5-stride centre sampling
        assert cfg.test.nms_iou == 0.6 and cfg.model.centerness and cfg.test.score == "cls_ctr_sqrt"
        assert cfg.loss.center_radius == 1.5
    else:  # POTO's prior is the inside of the box (POTO.CENTER_SAMPLING_RADIUS = 0)
        assert cfg.loss.center_radius == 0.0 and cfg.test.nms_iou == 0
    if base is not None:
        assert cfg.model == base.model and cfg.loss.model_copy(update={"center_radius": 1.5}) == base.loss
    if variant == "atss":
        loss = cfg.loss
        assert (loss.assigner, loss.atss_topk, loss.atss_anchor_scale, loss.reg_weight) == ("atss", 9, 8.0, 2.0)


def test_assigner_checks_name_the_keys():
    with pytest.raises(ConfigError, match="loss.assigner=anchor matches anchor boxes: it needs model.box_coder"):
        apply_overrides(get_recipe("poto_mnv2_cpu"), ["loss.assigner=anchor"])
    for assigner in ("atss", "center", "fg_loss"):
        with pytest.raises(ConfigError, match=f"loss.assigner={assigner} trains on loss.score=cls"):
            apply_overrides(get_recipe("poto_3dmf_mnv2_cpu"), [f"loss.assigner={assigner}"])
    with pytest.raises(ConfigError, match="model.box_coder"):
        apply_overrides(get_recipe("poto_mnv2_cpu"), ["model.box_coder=xywh"])
    # any assigner trains an anchor-delta model (it consumes the decoded boxes), and FCOS/ATSS without centerness
    cfg = apply_overrides(get_recipe("anchor_mnv2_cpu"), ["loss.assigner=poto", "model.num_classes=2"])
    assert build_criterion(cfg).assigner_name == "poto"
    apply_overrides(get_recipe("atss_mnv2_cpu"), ["model.centerness=false", "test.score=cls"])
