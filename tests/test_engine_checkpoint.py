"""Checkpoints: round trip, atomic replacement, clear errors for missing/corrupt/mismatching files."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from e2edet.engine import checkpoint as ckpt
from e2edet.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from e2edet.engine.optim import build_optimizer, build_scheduler
from e2edet.engine.rng import capture_rng_state, restore_rng_state

CFG = SimpleNamespace(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, weight_decay_norm=0.0,
                      schedule="multistep", steps=(0.5,), gamma=0.1, warmup_iters=2, warmup_factor=0.1)


def _net(seed=0, out=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, out, 1))


def _trained(seed=0):
    model = _net(seed)
    opt = build_optimizer(model, CFG)
    sched = build_scheduler(opt, CFG, total_iters=10)
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip(tmp_path):
    model, opt, sched = _trained()
    rng = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    state = {"epoch": 3, "iteration": 30, "best_metric": 12.5, "rng": rng}
    path = save_checkpoint(tmp_path, "last", nn.DataParallel(model), opt, sched, state, {"model": {"k": 2}})
    assert path == tmp_path / "checkpoints" / "last"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "state.pt"]

    fresh = _net(seed=1)
    opt2 = build_optimizer(fresh, CFG)
    sched2 = build_scheduler(opt2, CFG, total_iters=10)
    got = load_checkpoint(tmp_path, fresh, opt2, sched2)
    assert _equal(model, fresh)
    assert got["epoch"] == 3 and got["iteration"] == 30 and got["best_metric"] == 12.5
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert sched2.last_epoch == sched.last_epoch == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    restore_rng_state(got["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]

    for where in (tmp_path, path, path / "model.safetensors"):
        weights, config = load_weights(where)
        assert config == {"model": {"k": 2}}
        assert not any(k.startswith("module.") for k in weights)
        assert torch.equal(weights["0.weight"], model[0].weight)


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    save_checkpoint(tmp_path, "last", model, None, None, {}, None)
    weights, config = load_weights(tmp_path)
    assert config == {} and torch.equal(weights["0.weight"], weights["1.weight"])


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    save_checkpoint(tmp_path, "last", model, opt, sched, {"epoch": 1}, {})
    newer, opt2, sched2 = _trained(seed=5)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, "last", newer, opt2, sched2, {"epoch": 2}, {})
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["last"]  # no partial/temporary directory left
    restored = _net(seed=9)
    assert load_checkpoint(tmp_path, restored)["epoch"] == 1
    assert _equal(restored, model)


def test_crash_between_renames_is_repaired(tmp_path):
    model, opt, sched = _trained()
    save_checkpoint(tmp_path, "last", model, opt, sched, {"epoch": 4}, {})
    root = tmp_path / "checkpoints"
    (root / "last").rename(root / ".last.old")  # as if the process died after moving the old one away
    assert load_checkpoint(tmp_path, _net(seed=3))["epoch"] == 4
    assert (root / "last").is_dir() and not (root / ".last.old").exists()


def test_missing_and_corrupt_files(tmp_path):
    model, opt, sched = _trained()
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        load_checkpoint(tmp_path / "nothing_here", model)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_weights(tmp_path)

    path = save_checkpoint(tmp_path, "last", model, opt, sched, {"epoch": 1}, {})
    (path / "state.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="state.pt is corrupt"):
        load_checkpoint(tmp_path, model, opt, sched)
    (path / "state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="state.pt is missing"):
        load_checkpoint(tmp_path, model, opt, sched)
    assert load_checkpoint(tmp_path, model) == {}  # weights alone are fine without optimizer

    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        load_weights(path)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign), metadata={"format": "other-v9"})
    with pytest.raises(ValueError, match="other-v9"):
        load_weights(foreign)
    bad_tag = tmp_path / "x"
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        save_checkpoint(bad_tag, "../last", model, None, None, {}, {})


def test_shape_mismatch_lists_keys(tmp_path):
    save_checkpoint(tmp_path, "last", _net(out=2), None, None, {}, {})
    other = _net(out=5)
    with pytest.raises(ckpt.WeightsMismatchError) as info:
        load_checkpoint(tmp_path, other)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "checkpoints" / "last" / "model.safetensors"))
    assert ": does not match the model: 2 shape mismatches (3.bias: file (2,) vs model (5,), " \
           "3.weight: file (2, 4, 1, 1) vs model (5, 4, 1, 1))" in message
    assert isinstance(info.value, RuntimeError)  # what load_model_weights raised before
    extra = nn.Sequential(*_net(out=2), nn.Conv2d(2, 2, 1))
    with pytest.raises(RuntimeError, match=r"2 missing keys \(4\.bias, 4\.weight\)"):
        load_checkpoint(tmp_path, extra)
    fewer = nn.Sequential(*list(_net(out=2))[:3])
    with pytest.raises(ckpt.WeightsMismatchError, match=r"2 unexpected keys \(3\.bias, 3\.weight\)"):
        load_checkpoint(tmp_path, fewer)
    before = other[3].weight.clone()
    with pytest.warns(UserWarning, match="skipped"):
        load_checkpoint(tmp_path, other, strict=False)
    assert torch.equal(other[3].weight, before)  # mismatched entry skipped
    source, _ = load_weights(tmp_path)
    assert torch.equal(other[0].weight, source["0.weight"])  # matching entries loaded


def test_metadata_is_json(tmp_path):
    from safetensors import safe_open

    save_checkpoint(tmp_path, "best", _net(), None, None, {}, {"train": {"lr": 0.01}})
    with safe_open(str(tmp_path / "checkpoints" / "best" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "e2edet-v1" and json.loads(meta["e2edet_config"]) == {"train": {"lr": 0.01}}
    assert load_weights(tmp_path)[1] == {"train": {"lr": 0.01}}  # run dir -> best


def test_mismatch_message_shows_first_keys_and_counts():
    target = {f"k{i}": (2,) for i in range(6)}
    assert ckpt.weights_mismatch(target, dict(target)) is None
    found = {"k0": (3,), "k1": (2,), "x": (1,)}
    assert ckpt.weights_mismatch(target, found) == ("4 missing keys (k2, k3, k4, ...), 1 unexpected key (x), "
                                                    "1 shape mismatch (k0: file (3,) vs model (2,))")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, value):
    model = _net()
    with torch.no_grad():
        model[3].weight[0, 0] = value
        model[0].bias[1] = value
    path = save_checkpoint(tmp_path, "best", model, None, None, {}, {}) / "model.safetensors"
    with pytest.raises(ckpt.WeightsError, match=rf"^{path}: tensor 0\.bias holds 1 non-finite value \(NaN/inf\) "
                                                 r"\(and 1 more tensor\)"):
        load_weights(tmp_path)
    with pytest.raises(ValueError, match="non-finite"):  # a ValueError, as the other unusable-file errors
        load_checkpoint(tmp_path, _net())


def test_header_gives_shapes_without_reading_tensors(tmp_path):
    save_checkpoint(tmp_path, "best", _net(), None, None, {}, {"model": {"arch": "dense"}})
    file, shapes, config = ckpt.read_weights_header(tmp_path)
    assert file == tmp_path / "checkpoints" / "best" / "model.safetensors"
    assert shapes["3.weight"] == (2, 4, 1, 1) and config == {"model": {"arch": "dense"}}
    file.write_bytes(file.read_bytes()[:50])
    with pytest.raises(ckpt.WeightsError, match="is not a readable safetensors"):
        ckpt.read_weights_header(file)
