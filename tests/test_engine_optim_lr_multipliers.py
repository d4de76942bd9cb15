"""Per-parameter learning-rate multipliers (``model.lr_multipliers``) in :func:`build_optimizer`: the groups, their
lrs under the schedule, shared parameters, multiplier 0, and the logged base lr (Deformable DETR's recipe:
backbone and ``reference_points|sampling_offsets`` at 0.1 x lr, ``specs/detr.md`` 1.6)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from e2edet.engine.optim import base_lr, build_optimizer, build_scheduler, lr_at

MULTS = {r"^backbone\.": 0.1, r"reference_points|sampling_offsets": 0.1}


def _cfg(**kw):
    base = dict(optimizer="adamw", lr=2e-4, momentum=0.9, weight_decay=1e-4, weight_decay_norm=0.0,
                schedule="multistep", steps=(0.5,), gamma=0.1, warmup_iters=4, warmup_factor=0.01)
    base.update(kw)
    return SimpleNamespace(**base)


class Tiny(nn.Module):
    """A backbone (conv + BN), a deformable-attention-like block (``sampling_offsets``, ``value_proj``, LayerNorm)
    and a head."""

    def __init__(self, mults=MULTS):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.attn = nn.ModuleDict({"sampling_offsets": nn.Linear(4, 8), "value_proj": nn.Linear(4, 4)})
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        if mults is not None:
            self.lr_multipliers = dict(mults)


def _ids(params):
    return {id(p) for p in params}


def test_groups_split_by_multiplier_and_weight_decay():
    model = Tiny()
    groups = {g["name"]: g for g in build_optimizer(model, _cfg()).param_groups}
    assert list(groups) == ["default", "norm", "default_x0.1", "norm_x0.1"]  # multiplier 1 first
    expect = {
        "default": (2e-4, 1e-4, [*model.attn["value_proj"].parameters(), *model.head.parameters()]),
        "norm": (2e-4, 0.0, list(model.norm.parameters())),
        "default_x0.1": (2e-5, 1e-4, [*model.backbone[0].parameters(), *model.attn["sampling_offsets"].parameters()]),
        "norm_x0.1": (2e-5, 0.0, list(model.backbone[1].parameters())),
    }
    for name, (lr, wd, params) in expect.items():
        assert groups[name]["lr"] == pytest.approx(lr, rel=1e-12) and groups[name]["weight_decay"] == wd, name
        assert _ids(groups[name]["params"]) == _ids(params), name
    assert groups["default"]["lr_mult"] == 1.0 and groups["norm_x0.1"]["lr_mult"] == 0.1
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_first_matching_regex_wins_and_frozen_parameters_stay_out():
    model = Tiny({r"^backbone\.0\.": 0.5, r"^backbone": 0.1, r"offsets": 2.0})
    model.head.bias.requires_grad_(False)
    groups = {g["name"]: g for g in build_optimizer(model, _cfg(optimizer="sgd", lr=0.1)).param_groups}
    assert _ids(groups["default_x0.5"]["params"]) == _ids(model.backbone[0].parameters())
    assert _ids(groups["norm_x0.1"]["params"]) == _ids(model.backbone[1].parameters())
    assert groups["default_x2"]["lr"] == pytest.approx(0.2)
    assert id(model.head.bias) not in {id(p) for g in groups.values() for p in g["params"]}


def test_every_group_follows_the_schedule_from_its_own_base_lr():
    cfg = _cfg()
    opt = build_optimizer(Tiny(), cfg)
    sched = build_scheduler(opt, cfg, total_iters=12)
    for it in range(12):
        assert base_lr(opt) == pytest.approx(lr_at(cfg, 12, it))  # what the trainer logs
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(lr_at(cfg, 12, it) * group["lr_mult"]), (it, group["name"])
        opt.step()
        sched.step()
    assert lr_at(cfg, 12, 11) == pytest.approx(2e-5)  # the drop at half of training


def test_a_shared_parameter_is_added_once_with_its_first_name():
    model = Tiny()
    model.neck = model.backbone[0]  # the same conv, registered again outside the backbone
    opt = build_optimizer(model, _cfg())
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(_ids(params)) == len(list(model.parameters()))
    groups = {g["name"]: g for g in opt.param_groups}
    assert _ids(model.backbone[0].parameters()) <= _ids(groups["default_x0.1"]["params"])  # first name: backbone.0


def test_multiplier_zero_keeps_the_parameter_at_lr_zero():
    torch.manual_seed(0)
    model = Tiny({r"^backbone\.": 0.0})
    opt = build_optimizer(model, _cfg(weight_decay=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["default_x0"]["lr"] == 0.0 and groups["norm_x0"]["lr"] == 0.0
    assert _ids(groups["default_x0"]["params"]) == _ids(model.backbone[0].parameters())
    before = [p.detach().clone() for p in model.backbone.parameters()]
    head_before = model.head.weight.detach().clone()
    x = torch.randn(2, 3, 5, 5)
    loss = model.head(model.norm(model.backbone(x).mean((2, 3)))).sum()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    assert not torch.equal(head_before, model.head.weight)
    assert base_lr(opt) == pytest.approx(2e-4)


def test_without_multipliers_the_groups_are_the_plain_ones():
    """No ``lr_multipliers`` (or an empty dict): the two plain groups, no per-group lr or ``lr_mult`` key."""
    for model in (Tiny(None), Tiny({})):
        opt = build_optimizer(model, _cfg())
        assert [g["name"] for g in opt.param_groups] == ["default", "norm"]
        assert all("lr_mult" not in g for g in opt.param_groups)
        assert base_lr(opt) == 2e-4


def test_base_lr_without_a_group_of_multiplier_one():
    model = Tiny({".": 0.5})
    opt = build_optimizer(model, _cfg(lr=1e-3))
    assert [g["name"] for g in opt.param_groups] == ["default_x0.5", "norm_x0.5"]
    assert base_lr(opt) == pytest.approx(1e-3)
    assert base_lr(build_optimizer(Tiny({".": 0.0}), _cfg())) == 0.0


def test_state_dict_round_trip_keeps_the_multipliers():
    cfg = _cfg()
    model = Tiny()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_iters=12)
    for _ in range(6):
        opt.step()
        sched.step()
    fresh = build_optimizer(model, cfg)
    fresh_sched = build_scheduler(fresh, cfg, total_iters=12)
    fresh.load_state_dict(opt.state_dict())
    fresh_sched.load_state_dict(sched.state_dict())
    assert [(g["name"], g["lr"], g["lr_mult"]) for g in fresh.param_groups] == \
        [(g["name"], g["lr"], g["lr_mult"]) for g in opt.param_groups]
    fresh.step()
    fresh_sched.step()
    assert base_lr(fresh) == pytest.approx(lr_at(cfg, 12, 7))


@pytest.mark.parametrize("mults, message", [({"(": 0.1}, "bad lr_multipliers"), ({"x": -1.0}, "must be >= 0"),
                                            ({"x": "fast"}, "bad lr_multipliers"), ({"x": float("nan")}, ">= 0")])
def test_bad_multipliers(mults, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(Tiny(mults), _cfg())


def test_trainer_logs_the_base_lr_with_multipliers(tmp_path):
    """The trainer's ``lr`` metric is ``cfg.lr`` x schedule even when no group trains at ``cfg.lr`` (here the first
    group is at 0.1 x)."""
    from torch.utils.data import DataLoader

    from e2edet.engine.logger import read_metrics
    from e2edet.engine.trainer import Trainer
    from tests.test_engine_trainer import BoxCriterion, BoxDataset, TinyDetector, collate, make_cfg

    torch.manual_seed(0)
    model = TinyDetector()
    model.lr_multipliers = {r"^conv1\.": 0.1, r"^bn\.": 0.0, r"^(conv2|head)\.": 0.5}
    cfg = make_cfg(epochs=1, eval_period=0, checkpoint_period=0, warmup_iters=0)
    loader = DataLoader(BoxDataset(), batch_size=4, shuffle=False, collate_fn=collate)
    trainer = Trainer(model, BoxCriterion(), loader, cfg, tmp_path, config_dict={"name": "tiny"}, progress=False)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert list(groups) == ["default_x0.1", "norm_x0", "default_x0.5"]
    assert groups == pytest.approx({"default_x0.1": 0.005, "norm_x0": 0.0, "default_x0.5": 0.025})
    trainer.fit()
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["type"] == "train"]
    assert [r["lr"] for r in train] == pytest.approx([0.05, 0.005])  # the drop at round(0.667 * 2) = 1


def test_deformable_detr_parameter_groups_follow_the_official_recipe():
    """The real model's names: backbone and ``reference_points``/``sampling_offsets`` at 0.1 x, everything else
    (``input_proj`` included) at 1 x; GroupNorm/LayerNorm keep ``weight_decay_norm`` (specs/detr.md 1.6)."""
    from e2edet.build import build_model
    from e2edet.config import apply_overrides
    from e2edet.recipes import get_recipe

    cfg = apply_overrides(get_recipe("deformable_detr_mnv2_cpu"), [
        "model.pretrained=false", "model.num_classes=3", "model.fpn_channels=64", "model.num_queries=20",
        "model.dim_feedforward=128", "model.enc_layers=1", "model.dec_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.train)
    mult = {id(p): g["lr_mult"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    for name, p in names.items():
        if p.requires_grad:
            slow = name.startswith("backbone.") or "sampling_offsets" in name or "reference_points" in name
            assert mult[id(p)] == (0.1 if slow else 1.0), name
    assert any("sampling_offsets" in n for n in names) and any(n.startswith("input_proj.") for n in names)
    assert {g["name"] for g in opt.param_groups} >= {"default", "norm", "default_x0.1"}
    assert all(g["lr"] == pytest.approx(2e-4 * g["lr_mult"]) for g in opt.param_groups)
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)  # the official AdamW: one weight decay
