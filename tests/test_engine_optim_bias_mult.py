"""mmcv's ``paramwise_cfg`` bias rules in :func:`build_optimizer` (``train.bias_lr_mult`` / ``train.bias_decay_mult``,
used by the O2F CondInst configs: ``bias_lr_mult=2., bias_decay_mult=0.``, ``specs/dense.md`` 3.10).

The expected lr / weight decay of every parameter is written out by hand from mmcv 1.x
``DefaultOptimizerConstructor.add_params``: the bias of a non-norm layer gets ``lr * bias_lr_mult``; its decay is
``wd * bias_decay_mult`` unless the layer is a depthwise conv (``in_channels == groups``), which keeps ``wd``; norm
layers' weight and bias get ``wd * norm_decay_mult`` (here ``weight_decay_norm``) and the plain lr."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from e2edet.config import ConfigError, apply_overrides
from e2edet.engine.optim import build_optimizer, build_scheduler
from e2edet.recipes import get_recipe


def _cfg(**kw):
    base = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, weight_decay_norm=1e-4,
                schedule="multistep", steps=(0.5,), gamma=0.1, warmup_iters=0, warmup_factor=0.001,
                bias_lr_mult=2.0, bias_decay_mult=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


class Net(nn.Module):
    """A conv with bias, a depthwise conv with bias, a GroupNorm, a bias-free conv and a linear layer."""

    def __init__(self, mults=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.gn = nn.GroupNorm(2, 4)
        self.pw = nn.Conv2d(4, 4, 1, bias=False)
        self.fc = nn.Linear(4, 2)
        if mults is not None:
            self.lr_multipliers = mults


def _lr_wd(optimizer):
    """{id(param): (lr, weight_decay)} over every group."""
    return {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_each_parameter_gets_mmcvs_lr_and_decay():
    net = Net()
    got = _lr_wd(build_optimizer(net, _cfg()))
    expect = {
        net.conv.weight: (0.01, 1e-4), net.conv.bias: (0.02, 0.0),
        net.dw.weight: (0.01, 1e-4), net.dw.bias: (0.02, 1e-4),  # depthwise: lr x2, decay kept
        net.gn.weight: (0.01, 1e-4), net.gn.bias: (0.01, 1e-4),  # norm: neither bias rule
        net.pw.weight: (0.01, 1e-4),
        net.fc.weight: (0.01, 1e-4), net.fc.bias: (0.02, 0.0),
    }
    assert len(got) == len(list(net.parameters()))
    for param, (lr, wd) in expect.items():
        assert got[id(param)] == pytest.approx((lr, wd), rel=1e-12)


def test_the_schedule_scales_the_bias_groups_from_their_own_lr():
    net = Net()
    opt = build_optimizer(net, _cfg(warmup_iters=2, warmup_factor=0.5))
    sched = build_scheduler(opt, _cfg(warmup_iters=2, warmup_factor=0.5), total_iters=8)
    lrs = []
    for _ in range(6):
        lrs.append(_lr_wd(opt)[id(net.conv.bias)][0] / _lr_wd(opt)[id(net.conv.weight)][0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0] * 6)
    assert _lr_wd(opt)[id(net.conv.bias)][0] == pytest.approx(0.02 * 0.1)  # after the step at 4 of 8


def test_bias_mult_compounds_with_lr_multipliers():
    net = Net(mults={r"^conv\.": 0.1})
    got = _lr_wd(build_optimizer(net, _cfg()))
    assert got[id(net.conv.weight)] == pytest.approx((1e-3, 1e-4))
    assert got[id(net.conv.bias)] == pytest.approx((2e-3, 0.0))
    assert got[id(net.fc.bias)] == pytest.approx((0.02, 0.0))


def test_defaults_leave_the_plain_groups():
    net = Net()
    groups = build_optimizer(net, _cfg(bias_lr_mult=1.0, bias_decay_mult=1.0)).param_groups
    assert [g["name"] for g in groups] == ["default", "norm"]
    only_decay = build_optimizer(net, _cfg(bias_lr_mult=1.0, bias_decay_mult=0.5))
    assert [g["name"] for g in only_decay.param_groups] == ["default", "norm", "bias"]
    got = _lr_wd(only_decay)
    assert got[id(net.fc.bias)] == pytest.approx((0.01, 5e-5)) and got[id(net.dw.bias)] == pytest.approx((0.01, 1e-4))


def test_negative_multiplier_is_refused():
    with pytest.raises(ValueError, match="bias_lr_mult"):
        build_optimizer(Net(), _cfg(bias_lr_mult=-1.0))
    with pytest.raises(ConfigError, match="bias_decay_mult"):
        apply_overrides(get_recipe("fcos_mnv2_cpu"), ["train.bias_decay_mult=-1"])


def test_condinst_recipes_use_the_published_paramwise_cfg():
    for name in ("o2f_condinst_r50_1x", "o2f_condinst_r50_3x"):
        t = get_recipe(name).train
        assert (t.bias_lr_mult, t.bias_decay_mult, t.weight_decay_norm) == (2.0, 0.0, 1e-4), name
    t = get_recipe("o2f_r50_1x").train  # detection config: norm_decay_mult=0., no bias rule
    assert (t.bias_lr_mult, t.bias_decay_mult, t.weight_decay_norm) == (1.0, 1.0, 0.0)
