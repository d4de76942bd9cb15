"""Optimizer parameter groups and the per-iteration learning-rate schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from e2edet.engine.optim import build_optimizer, build_scheduler, lr_at


def _cfg(**kw):
    base = dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, weight_decay_norm=0.0,
                schedule="multistep", steps=(0.5, 0.75), gamma=0.1, warmup_iters=10, warmup_factor=0.001)
    base.update(kw)
    return SimpleNamespace(**base)


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))


def test_warmup_then_multistep():
    cfg = _cfg()
    assert lr_at(cfg, 100, 0) == pytest.approx(0.1 * 0.001)
    assert lr_at(cfg, 100, 5) == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))
    assert lr_at(cfg, 100, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 100, 49) == pytest.approx(0.1)
    assert lr_at(cfg, 100, 50) == pytest.approx(0.01)
    assert lr_at(cfg, 100, 74) == pytest.approx(0.01)
    assert lr_at(cfg, 100, 75) == pytest.approx(0.001)


def test_warmup_is_capped_to_a_quarter_of_short_runs():
    cfg = _cfg(warmup_iters=1000)
    assert lr_at(cfg, 100, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 100, 24) < 0.1
    assert lr_at(cfg, 100, 25) == pytest.approx(0.1)
    assert lr_at(_cfg(warmup_iters=1000), 3, 0) == pytest.approx(0.1)  # 3 // 4 == 0: no warm-up at all


def test_cosine():
    cfg = _cfg(schedule="cosine", warmup_iters=0)
    assert lr_at(cfg, 100, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 100, 25) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(cfg, 100, 50) == pytest.approx(0.05)
    assert lr_at(cfg, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_steps_per_iteration_like_lr_at():
    cfg = _cfg(schedule="multistep", warmup_iters=4)
    model = _net()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_iters=20)
    for it in range(20):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(lr_at(cfg, 20, it))
        opt.step()
        sched.step()


def test_param_groups_and_optimizers():
    model = _net()
    model[3].weight.requires_grad_(False)
    opt = build_optimizer(model, _cfg(weight_decay=1e-4, weight_decay_norm=0.0))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["default"]["weight_decay"] == 1e-4 and groups["norm"]["weight_decay"] == 0.0
    norm_ids = {id(p) for m in (model[1], model[2]) for p in m.parameters()}
    assert {id(p) for p in groups["norm"]["params"]} == norm_ids
    all_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[3].weight) not in all_ids and id(model[3].bias) in all_ids

    adamw = build_optimizer(model, _cfg(optimizer="adamw", lr=1e-4))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 1e-4


def test_bad_inputs():
    model = _net()
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, _cfg(optimizer="lamb"))
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(nn.Sequential(nn.ReLU()), _cfg())
    opt = build_optimizer(model, _cfg())
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(opt, _cfg(schedule="poly"), 10)
    with pytest.raises(ValueError, match="total_iters"):
        build_scheduler(opt, _cfg(), 0)
    with pytest.raises(ValueError, match="fractions"):
        build_scheduler(opt, _cfg(steps=(0.5, 2.0)), 10)


def test_swin_position_tables_get_the_norm_weight_decay():
    from types import SimpleNamespace

    from e2edet.engine.optim import build_optimizer
    from e2edet.models.backbone import build_backbone

    model = build_backbone("swin_t", pretrained=False, freeze_at=0)
    cfg = SimpleNamespace(optimizer="adamw", lr=1e-4, weight_decay=0.05, weight_decay_norm=0.0, momentum=0.9)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    tables = {id(p) for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and tables <= {id(p) for p in groups["norm"]["params"]}
    assert groups["norm"]["weight_decay"] == 0.0 and groups["default"]["weight_decay"] == 0.05
