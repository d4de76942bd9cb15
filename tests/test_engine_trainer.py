"""Trainer on a tiny synthetic detector: learning, logs, best/last checkpoints, exact resume (also mid-epoch,
after SIGINT/SIGTERM), max_iters, non-finite outputs, losses and gradients."""

from __future__ import annotations

import json
import math
import os
import signal
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from e2edet.data.loader import build_loader
from e2edet.engine.checkpoint import load_checkpoint, load_weights
from e2edet.engine.logger import read_metrics
from e2edet.engine.trainer import Trainer, TrainingInterrupted


class BoxDataset(Dataset):
    """8 images 3x32x32 with one bright square each; the target is that square's xyxy box."""

    def __init__(self, n=8):
        g = torch.Generator().manual_seed(123)
        self.items = []
        for i in range(n):
            x, y = torch.randint(0, 20, (2,), generator=g).tolist()
            img = torch.randn(3, 32, 32, generator=g) * 0.1
            img[:, y:y + 12, x:x + 12] += 1.0
            self.items.append((img, torch.tensor([[x, y, x + 12, y + 12]], dtype=torch.float32), i))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, box, image_id = self.items[i]
        target = {"boxes": box, "labels": torch.zeros(1, dtype=torch.long), "image_id": image_id,
                  "size": torch.tensor([32, 32]), "orig_size": torch.tensor([32, 32])}
        return img, target


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class TinyDetector(nn.Module):
    """Two convs + BN + dropout -> one box per image (xyxy pixels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8 * 8 * 8, 4)

    def forward(self, images, image_sizes=None):
        x = F.relu(self.bn(self.conv1(images)))
        x = self.drop(F.relu(self.conv2(x))).flatten(1)
        return {"pred_boxes": (self.head(x) * 16 + 16).unsqueeze(1)}


class BoxCriterion:
    """L1 box loss; records the (epoch, max_epoch) it is called with; can inject NaN at a given call."""

    def __init__(self, nan_at=None):
        self.calls, self.nan_at = [], nan_at

    def __call__(self, outputs, targets, epoch=0, max_epoch=1):
        self.calls.append((epoch, max_epoch))
        gt = torch.stack([t["boxes"][0] for t in targets])
        loss = F.l1_loss(outputs["pred_boxes"][:, 0], gt) / 16
        if self.nan_at is not None and len(self.calls) == self.nan_at:
            loss = loss * float("nan")
        return {"loss_box": loss, "loss_zero": loss.detach() * 0, "num_pos": torch.tensor(float(len(targets)))}


def make_cfg(**kw):
    base = dict(epochs=2, max_iters=0, batch_size=4, workers=0, optimizer="sgd", lr=0.05, momentum=0.9,
                weight_decay=1e-4, weight_decay_norm=0.0, schedule="multistep", steps=(0.667, 0.889), gamma=0.1,
                warmup_iters=2, warmup_factor=0.1, clip_grad_norm=1.0, amp=True, seed=7, log_period=1,
                eval_period=1, checkpoint_period=1, checkpoint_every=0, device="cpu")
    base.update(kw)
    return SimpleNamespace(**base)


def make_trainer(run_dir, cfg, criterion=None, evaluate_fn=None, model_seed=0):
    torch.manual_seed(model_seed)
    loader = DataLoader(BoxDataset(), batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)
    return Trainer(TinyDetector(), criterion or BoxCriterion(), loader, cfg, run_dir, config_dict={"name": "tiny"},
                   evaluate_fn=evaluate_fn, progress=False)


def rng_eating_eval(model, epoch):
    """An evaluation that consumes global randomness (must not change training) and scores by epoch."""
    torch.rand(5)
    return {"no_nms": {"AP": [0.0, 30.0, 20.0, 25.0][epoch]}, "nms": {"AP": 1.0}}


def test_loss_decreases_and_logs(tmp_path):
    trainer = make_trainer(tmp_path, make_cfg(epochs=3, steps=(0.9,)), evaluate_fn=rng_eating_eval)
    result = trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert len(train) == 6 and [r["iteration"] for r in train] == list(range(1, 7))
    assert {"lr", "total_loss", "loss_box", "loss_zero", "num_pos", "time", "data_time", "eta_seconds",
            "grad_norm", "epoch"} <= set(train[0])
    assert train[-1]["total_loss"] < train[0]["total_loss"]
    assert train[0]["lr"] == pytest.approx(0.05 * 0.1) and train[-1]["eta_seconds"] == 0
    assert [r["epoch"] for r in evals] == [1, 2, 3] and evals[0]["no_nms"]["AP"] == 30.0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval_epoch002.json").read_text())["no_nms"]["AP"] == 20.0
    # best = epoch 1 (AP 30), last = epoch 3
    assert load_checkpoint(tmp_path / "checkpoints" / "best", TinyDetector())["epoch"] == 1
    assert load_checkpoint(tmp_path / "checkpoints" / "last", TinyDetector())["epoch"] == 3
    assert load_weights(tmp_path)[1] == {"name": "tiny"}
    assert result["best_metric"] == 30.0 and result["iteration"] == 6 and result["eval"]["no_nms"]["AP"] == 25.0


def test_resume_is_exact(tmp_path):
    cfg = make_cfg(epochs=2)
    full = make_trainer(tmp_path / "full", cfg, evaluate_fn=rng_eating_eval)
    full.fit()

    first = make_trainer(tmp_path / "split", cfg, evaluate_fn=rng_eating_eval)
    out = first.fit(stop_epoch=1)
    assert out["epoch"] == 1 and out["iteration"] == 2
    torch.rand(10)  # unrelated randomness between the two jobs
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # logged by a crashed job after its checkpoint
        f.write(json.dumps({"type": "train", "iteration": 3, "epoch": 1, "total_loss": 99.0}) + "\n")
    second = make_trainer(tmp_path / "split", cfg, evaluate_fn=rng_eating_eval, model_seed=99)
    out = second.fit(resume=tmp_path / "split")
    assert out["epoch"] == 2 and out["iteration"] == 4 and out["best_metric"] == 30.0

    train = [r for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4] and max(r["total_loss"] for r in train) < 99

    a, b = full.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted training"
    sa, sb = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)


def test_max_iters_passes_epoch_to_criterion(tmp_path):
    criterion = BoxCriterion()
    trainer = make_trainer(tmp_path, make_cfg(max_iters=5, epochs=100, checkpoint_period=0, eval_period=0),
                           criterion=criterion)
    result = trainer.fit()
    assert trainer.num_epochs == 3 and trainer.total_iters == 5
    assert criterion.calls == [(0, 3), (0, 3), (1, 3), (1, 3), (2, 3)]
    assert result["iteration"] == 5 and result["epoch"] == 3
    state = load_checkpoint(tmp_path, TinyDetector())
    assert state["iteration"] == 5  # a final checkpoint even with checkpoint_period=0


def test_non_finite_loss_stops_with_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, make_cfg(epochs=3), criterion=BoxCriterion(nan_at=3))
    expected = r"diverged at iteration 3 \(epoch 2\): non-finite loss loss_box \(loss_box=nan, loss_zero=nan, total_loss=nan\)"
    with pytest.raises(FloatingPointError, match=expected):
        trainer.fit()
    state = load_checkpoint(tmp_path, TinyDetector())
    assert state["iteration"] == 2  # the last good checkpoint (end of epoch 1) is kept
    assert all(math.isfinite(v.float().sum().item()) for v in trainer.model.state_dict().values())


def test_empty_loader_and_missing_resume(tmp_path):
    cfg = make_cfg()
    with pytest.raises(ValueError, match="empty"):
        Trainer(TinyDetector(), BoxCriterion(), [], cfg, tmp_path, progress=False)
    trainer = make_trainer(tmp_path, cfg)
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        trainer.fit(resume=tmp_path / "no_such_run")


class SignalAt(BoxCriterion):
    """BoxCriterion that sends ``signum`` to this process during call ``at`` (as Ctrl-C would mid-iteration)."""

    def __init__(self, at, signum=signal.SIGINT):
        super().__init__()
        self.at, self.signum = at, signum

    def __call__(self, outputs, targets, epoch=0, max_epoch=1):
        if len(self.calls) + 1 == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__call__(outputs, targets, epoch, max_epoch)


def _seeded_trainer(run_dir, cfg, criterion=None, workers=0):
    """Trainer over the project's resumable loader (3 images a batch: 3 iterations per epoch)."""
    torch.manual_seed(0)
    loader = build_loader(BoxDataset(), batch_size=3, train=True, workers=workers, seed=cfg.seed, distributed=False)
    return Trainer(TinyDetector(), criterion or BoxCriterion(), loader, cfg, run_dir, config_dict={"name": "tiny"},
                   evaluate_fn=rng_eating_eval, progress=False)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_current_iteration_and_resume_is_exact(tmp_path, signum):
    cfg = make_cfg(epochs=3, checkpoint_period=0)
    full = _seeded_trainer(tmp_path / "full", cfg)
    full.fit()
    stopped = _seeded_trainer(tmp_path / "split", cfg, criterion=SignalAt(5, signum))
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at iteration 5/9; .*resume with"):
        stopped.fit()
    assert signal.getsignal(signum) == before  # handlers restored
    state = load_checkpoint(tmp_path / "split", TinyDetector())
    assert (state["epoch"], state["iteration"]) == (1, 5)  # mid-epoch: 2 of epoch 2's 3 iterations done
    resumed = _seeded_trainer(tmp_path / "split", cfg)
    out = resumed.fit(resume=tmp_path / "split")
    assert out["iteration"] == 9 and out["epoch"] == 3
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted training"
    evals = [r["epoch"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r["type"] == "eval"]
    assert evals == [1, 2, 3]


class CrashAt(BoxCriterion):
    """BoxCriterion that dies (as a killed process would) at call ``at``."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def __call__(self, outputs, targets, epoch=0, max_epoch=1):
        if len(self.calls) + 1 == self.at:
            raise SystemExit("killed")
        return super().__call__(outputs, targets, epoch, max_epoch)


@pytest.mark.parametrize("workers", [0, 2])
def test_checkpoint_every_iterations_resumes_mid_epoch_exactly(tmp_path, workers):
    cfg = make_cfg(epochs=3, checkpoint_period=0, checkpoint_every=2, eval_period=0)
    full = _seeded_trainer(tmp_path / "full", cfg, workers=workers)
    full.fit()
    crashed = _seeded_trainer(tmp_path / "split", cfg, criterion=CrashAt(6), workers=workers)
    with pytest.raises(SystemExit):
        crashed.fit()
    state = load_checkpoint(tmp_path / "split", TinyDetector())
    assert (state["epoch"], state["iteration"]) == (1, 4)  # saved at iterations 2 and 4, both mid-epoch
    resumed = _seeded_trainer(tmp_path / "split", cfg, workers=workers)
    resumed.fit(resume=tmp_path / "split")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_schedule(tmp_path):
    _seeded_trainer(tmp_path, make_cfg(epochs=1)).fit()
    with pytest.raises(ValueError, match=r"run with total_iters 3 \(now 7\); resume with the dataset"):
        _seeded_trainer(tmp_path, make_cfg(epochs=1, max_iters=7)).fit(resume=tmp_path)
    trainer = _seeded_trainer(tmp_path, make_cfg(epochs=1))
    trainer.loader = build_loader(BoxDataset(), batch_size=2, train=True, workers=0, seed=7, distributed=False)
    trainer.iters_per_epoch = len(trainer.loader)
    with pytest.raises(ValueError, match=r"iters_per_epoch 3 \(now 4\)"):
        trainer.fit(resume=tmp_path)


def test_resuming_a_finished_max_iters_run_has_nothing_left(tmp_path):
    cfg = make_cfg(epochs=0, max_iters=4, eval_period=0)  # 3 iterations per epoch: the last epoch is partial
    _seeded_trainer(tmp_path, cfg).fit()
    out = _seeded_trainer(tmp_path, cfg).fit(resume=tmp_path)
    assert (out["epoch"], out["iteration"], out["eval"]) == (2, 4, None)


def test_a_second_fit_after_an_interrupt_starts_with_no_pending_stop(tmp_path):
    trainer = _seeded_trainer(tmp_path, make_cfg(epochs=2), criterion=SignalAt(2))
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    trainer.criterion.at = None
    assert trainer.fit(resume=tmp_path)["iteration"] == 6


class NaNOutput(BoxCriterion):
    """A probability-space loss (BCE) that refuses NaN inputs, fed NaN boxes from call 2 on."""

    def __call__(self, outputs, targets, epoch=0, max_epoch=1):
        self.calls.append((epoch, max_epoch))
        boxes = outputs["pred_boxes"] * (float("nan") if len(self.calls) >= 2 else 1.0)
        return {"loss_bce": F.binary_cross_entropy(boxes.sigmoid(), torch.ones_like(boxes))}


def test_non_finite_output_is_named_even_when_the_criterion_raises(tmp_path):
    trainer = _seeded_trainer(tmp_path, make_cfg(), criterion=NaNOutput())
    trainer.model.head.bias.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"iteration 1 .*model output 'pred_boxes' is not finite"):
        trainer.fit()


class NaNGradient(BoxCriterion):
    """Finite loss value whose gradient is NaN in ``param`` only (d sqrt(x)/dx at 0, times 0)."""

    param = None

    def __call__(self, outputs, targets, epoch=0, max_epoch=1):
        out = super().__call__(outputs, targets, epoch, max_epoch)
        return {**out, "loss_sqrt": torch.sqrt(self.param.sum() * 0)}


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_non_finite_gradient_stops_before_the_update(tmp_path, clip):
    trainer = _seeded_trainer(tmp_path, make_cfg(clip_grad_norm=clip), criterion=NaNGradient())
    trainer.criterion.param = trainer.model.head.bias  # the last parameter: clipping must not hide which one
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"iteration 1 .*non-finite gradient .*'head.bias'"):
        trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("bn."))


def test_clip_finite_gradients_scales_a_finite_norm_and_names_a_nan():
    from e2edet.engine.precision import clip_finite_gradients

    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    assert clip_finite_gradients(model, 1.0) == (0.0, None)  # no gradient yet
    for p, g in zip(model.parameters(), (3.0, 0.0, 4.0, 0.0)):
        p.grad = torch.full_like(p, g)
    expected = math.sqrt(6 * 9 + 2 * 16)  # 6 entries of 3 in the first weight, 2 of 4 in the second
    norm, bad = clip_finite_gradients(model, 1.0)
    assert bad is None and norm == pytest.approx(expected)
    total = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))
    assert total == pytest.approx(1.0, rel=1e-5)
    model[1].bias.grad = torch.tensor([float("nan")])
    before = model[0].weight.grad.clone()
    norm, bad = clip_finite_gradients(model, 1.0)
    assert math.isnan(norm) and bad == "1.bias" and torch.equal(model[0].weight.grad, before)


class _Bar:
    """Records the (description, start, total) of each progress bar the trainer opens."""

    opened: ClassVar[list] = []

    def __init__(self, total=None, initial=0, desc=None, **kwargs):
        self.opened.append((desc, initial, total))

    def set_postfix(self, **kwargs):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("epochs, max_iters, signal_at, bars", [
    (3, 0, 5, [("epoch 2/3", 2, 3), ("epoch 3/3", 0, 3)]),  # mid-epoch: 2 of epoch 2's 3 iterations done
    (0, 4, 1, [("epoch 1/2", 1, 3), ("epoch 2/2", 0, 1)]),  # max_iters: the last epoch is 1 iteration long
    (0, 2, 1, [("epoch 1/1", 1, 2)]),  # max_iters shorter than an epoch
])
def test_resumed_progress_bar_counts_the_whole_epoch(tmp_path, monkeypatch, epochs, max_iters, signal_at, bars):
    monkeypatch.setattr("e2edet.engine.trainer.tqdm", _Bar)
    monkeypatch.setattr(_Bar, "opened", [])
    cfg = make_cfg(epochs=epochs, max_iters=max_iters, checkpoint_period=0, eval_period=0)
    with pytest.raises(TrainingInterrupted):
        _seeded_trainer(tmp_path, cfg, criterion=SignalAt(signal_at)).fit()
    _Bar.opened.clear()
    _seeded_trainer(tmp_path, cfg).fit(resume=tmp_path)
    assert _Bar.opened == bars


def test_compile_trains_through_the_compiled_module_and_saves_the_plain_one(tmp_path, monkeypatch):
    compiled = []

    class Compiled(nn.Module):  # what torch.compile returns: a wrapper calling the module (no real compilation here)
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module
            self.calls = 0

        def forward(self, *args):
            self.calls += 1
            return self._orig_mod(*args)

    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(Compiled(module)) or compiled[-1])
    trainer = make_trainer(tmp_path, make_cfg(epochs=1, compile=True))
    assert trainer.ddp_model is compiled[0] and compiled[0]._orig_mod is trainer.model
    trainer.fit()
    assert compiled[0].calls == 2  # every training step went through it
    state, _ = load_weights(tmp_path)
    assert set(state) == set(TinyDetector().state_dict())  # plain keys, no "_orig_mod." prefix
