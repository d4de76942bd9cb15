"""Model EMA (``train.ema``): the warm-up update against a hand computation, the trainer evaluating and saving the EMA
weights, and an exact resume of the EMA state."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from e2edet.engine.checkpoint import load_checkpoint
from e2edet.engine.ema import build_ema, ema_decay, ema_multi_avg_fn
from tests.test_engine_trainer import (
    TinyDetector,
    make_cfg,
    make_trainer,
    rng_eating_eval,
)


def test_ema_decay_warm_up():
    assert ema_decay(1, 0.9998, 2000) == pytest.approx(0.9998 * (1 - math.exp(-1 / 2000)))
    assert ema_decay(2000, 0.9998, 2000) == pytest.approx(0.9998 * (1 - 1 / math.e))
    assert ema_decay(10**6, 0.9998, 2000) == pytest.approx(0.9998)
    with pytest.raises(ValueError, match="decay"):
        ema_multi_avg_fn(decay=1.0)
    with pytest.raises(ValueError, match="tau"):
        ema_decay(1, 0.9, tau=0)


def test_ema_update_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    decay, tau = 0.9, 2.0
    ema = build_ema(model, decay, tau)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    expected = None
    for step in range(1, 5):
        with torch.no_grad():  # a "training step": new weights and BN statistics
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))
        now = {k: v.clone() for k, v in model.state_dict().items()}
        if expected is None:
            expected = now  # the first update copies
        else:
            d = decay * (1 - math.exp(-step / tau))
            expected = {k: d * expected[k] + (1 - d) * now[k] if now[k].is_floating_point() else now[k]
                        for k in now}
        ema.update_parameters(model)
        got = ema.module.state_dict()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)
    assert int(ema.n_averaged) == 4
    assert int(ema.module[1].num_batches_tracked) == 4  # integer buffers are copied, not averaged
    assert not torch.equal(ema.module[0].weight, model[0].weight)


def _ema_cfg(**kw):
    return make_cfg(ema=True, ema_decay=0.9, ema_tau=2.0, **kw)


def test_trainer_evaluates_and_saves_the_ema(tmp_path):
    seen = []

    def evaluate(net, epoch):
        seen.append((net, {k: v.clone() for k, v in net.state_dict().items()}))
        return rng_eating_eval(net, epoch)

    trainer = make_trainer(tmp_path, _ema_cfg(epochs=2), evaluate_fn=evaluate)
    trainer.fit()
    assert all(net is trainer.ema.module for net, _ in seen) and len(seen) == 2
    ema, trained = trainer.ema.module.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(seen[-1][1][k], ema[k]) for k in ema)
    assert not torch.equal(ema["head.weight"], trained["head.weight"])
    assert int(trainer.ema.n_averaged) == 4  # one update per optimizer step
    deployed = load_file(str(tmp_path / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(deployed[k], ema[k]) for k in ema)  # eval/predict/export load the EMA
    state = torch.load(tmp_path / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], trained[k]) for k in trained)
    assert state["trainer_state"]["ema_updates"] == 4
    best = load_file(str(tmp_path / "checkpoints" / "best" / "model.safetensors"))  # epoch 1 scored best
    assert all(torch.equal(best[k], seen[0][1][k]) for k in best)


def test_ema_resume_is_exact(tmp_path):
    cfg = _ema_cfg(epochs=3)
    full = make_trainer(tmp_path / "full", cfg, evaluate_fn=rng_eating_eval)
    full.fit()
    make_trainer(tmp_path / "split", cfg, evaluate_fn=rng_eating_eval).fit(stop_epoch=1)
    resumed = make_trainer(tmp_path / "split", cfg, evaluate_fn=rng_eating_eval, model_seed=99)
    resumed.fit(resume=tmp_path / "split")
    for a, b in ((full.model, resumed.model), (full.ema.module, resumed.ema.module)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert int(resumed.ema.n_averaged) == int(full.ema.n_averaged) == 6


def test_resume_refuses_another_ema_setting(tmp_path):
    make_trainer(tmp_path / "plain", make_cfg(epochs=1)).fit()
    with pytest.raises(ValueError, match=r"cannot resume from .*plain.*train.ema=false"):
        make_trainer(tmp_path / "plain", _ema_cfg(epochs=1)).fit(resume=tmp_path / "plain")
    make_trainer(tmp_path / "ema", _ema_cfg(epochs=1)).fit()
    with pytest.raises(ValueError, match=r"train.ema=true"):
        make_trainer(tmp_path / "ema", make_cfg(epochs=1)).fit(resume=tmp_path / "ema")
    # weights only (no optimizer): the trained weights, from state.pt
    net = TinyDetector()
    load_checkpoint(tmp_path / "ema", net)
    state = torch.load(tmp_path / "ema" / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], state["model"][k]) for k in state["model"])
