"""metrics.jsonl writing/reading, TensorBoard logging, the loss-curve picture, and RNG isolation helpers."""

from __future__ import annotations

import random
import sys
import types

import numpy as np
import pytest
import torch

from e2edet.config import Config, ConfigError, apply_overrides
from e2edet.engine.logger import MetricsLogger, lookup, plot_losses, read_metrics, tensorboard_scalars
from e2edet.engine.rng import preserve_rng_state
from tests.test_engine_trainer import make_cfg, make_trainer


def test_jsonl_round_trip_and_truncated_line(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"type": "train", "iteration": 1, "loss_cls": torch.tensor(0.5), "lr": np.float32(0.25)})
    logger.log({"type": "eval", "iteration": 1, "no_nms": {"AP": torch.tensor(12.0)}})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "itera')  # a crash in the middle of a line
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records == [{"type": "train", "iteration": 1, "loss_cls": 0.5, "lr": 0.25},
                       {"type": "eval", "iteration": 1, "no_nms": {"AP": 12.0}}]
    assert lookup(records[1], "no_nms.AP") == 12.0 and lookup(records[1], "nms.AP") is None
    MetricsLogger(tmp_path / "other", enabled=False).log({"x": 1})
    assert not (tmp_path / "other").exists()


def test_plot_losses(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.path.write_text("")
    assert plot_losses(logger.path, tmp_path / "loss.png") is None  # nothing to draw yet
    for it in range(1, 30):
        logger.log({"type": "train", "iteration": it, "total_loss": 10.0 / it, "loss_cls": 6.0 / it,
                    "loss_box": 4.0 / it, "num_pos": 3})
        if it % 10 == 0:
            logger.log({"type": "eval", "iteration": it, "no_nms": {"AP": float(it)}})
    out = plot_losses(logger.path, tmp_path / "loss.png")
    assert out == tmp_path / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_preserve_rng_state():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with preserve_rng_state():
        torch.rand(100), random.random(), np.random.rand(7)
    assert torch.equal(torch.rand(2), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


EVAL_RECORD = {"type": "eval", "iteration": 4, "epoch": 1, "seconds": 2.5, "nms_iou": 0.6,
               "no_nms": {"AP": 12.5, "APs": -1.0}, "nms": {"AP": 10.0},
               "diagnostics": {"no_nms": {"ece": 3.0, "reliability": {"counts": [1, 2]}}},
               "crowd": {"no_nms": None},
               "per_class": {"no_nms": [{"category_id": 1, "name": "WBC", "num_gt": 3, "AP": 40.0, "AP50": 90.0},
                                        {"category_id": 2, "name": "RBC", "num_gt": 0, "AP": None, "AP50": None}]}}


def test_tensorboard_scalars():
    train = {"type": "train", "iteration": 3, "epoch": 0, "lr": 0.01, "total_loss": 1.5, "loss_cls": 1.0,
             "num_pos": 4, "flag": True, "nan": float("nan")}
    assert dict(tensorboard_scalars(train)) == {"train/lr": 0.01, "train/total_loss": 1.5, "train/loss_cls": 1.0,
                                                "train/num_pos": 4.0}
    assert dict(tensorboard_scalars(EVAL_RECORD)) == {  # -1 (undefined), None, lists and ids are left out
        "eval/seconds": 2.5, "eval/nms_iou": 0.6, "eval/no_nms/AP": 12.5, "eval/nms/AP": 10.0,
        "eval/diagnostics/no_nms/ece": 3.0, "eval_per_class/no_nms/AP/WBC": 40.0,
        "eval_per_class/no_nms/AP50/WBC": 90.0}
    assert list(tensorboard_scalars({"type": "other", "x": 1.0})) == []


class FakeWriter:
    """Stands in for ``torch.utils.tensorboard.SummaryWriter``; records what it is given."""

    instances: list[FakeWriter] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.flushes, self.closed = log_dir, purge_step, [], 0, False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step=None):
        assert not self.closed
        self.scalars.append((tag, value, global_step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeWriter.instances = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    return FakeWriter.instances


def test_tensorboard_logging_and_resume(tmp_path, fake_tensorboard):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    assert fake_tensorboard == []  # opened at the first record
    logger.log({"type": "train", "iteration": 2, "epoch": 0, "loss_box": torch.tensor(0.5), "lr": 0.1})
    logger.log(EVAL_RECORD)
    logger.log({"note": "no iteration: metrics.jsonl only"})
    (writer,) = fake_tensorboard
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.purge_step is None and writer.flushes == 2
    assert writer.scalars[:2] == [("train/loss_box", 0.5, 2), ("train/lr", 0.1, 2)]
    assert ("eval/no_nms/AP", 12.5, 4) in writer.scalars and len(read_metrics(logger.path)) == 3
    logger.truncate_after(2)  # resuming from iteration 2: later TensorBoard steps are purged too
    assert writer.closed and [r.get("iteration") for r in read_metrics(logger.path)] == [2, None]
    logger.log({"type": "train", "iteration": 3, "total_loss": 1.0})
    assert fake_tensorboard[1].purge_step == 3 and fake_tensorboard[1].scalars == [("train/total_loss", 1.0, 3)]
    MetricsLogger(tmp_path / "rank1", enabled=False, tensorboard=True).log({"type": "train", "iteration": 1})
    assert len(fake_tensorboard) == 2 and not (tmp_path / "rank1").exists()


def test_tensorboard_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with pytest.raises(ConfigError, match=r"train.tensorboard: true needs the tensorboard package \(pip install "
                                          r"tensorboard\), or set train.tensorboard=false"):
        MetricsLogger(tmp_path, tensorboard=True)
    MetricsLogger(tmp_path, tensorboard=False).log({"type": "train", "iteration": 1})
    MetricsLogger(tmp_path, enabled=False, tensorboard=True)  # other ranks never write, never need it


def test_trainer_logs_to_tensorboard(tmp_path, fake_tensorboard):
    assert Config().train.tensorboard is False
    assert apply_overrides(Config(), ["train.tensorboard=true"]).train.tensorboard is True
    evaluate_fn = lambda model, epoch: {"no_nms": {"AP": 10.0 * epoch}, "nms": {"AP": 5.0}}  # noqa: E731
    make_trainer(tmp_path, make_cfg(epochs=1, tensorboard=True), evaluate_fn=evaluate_fn).fit()
    (writer,) = fake_tensorboard
    tags = {(tag, step) for tag, _, step in writer.scalars}
    assert {("train/loss_box", 1), ("train/loss_box", 2), ("train/lr", 2), ("eval/no_nms/AP", 2),
            ("eval/nms/AP", 2)} <= tags
    make_trainer(tmp_path / "off", make_cfg(epochs=1)).fit()  # the key defaults to off
    assert len(fake_tensorboard) == 1 and not (tmp_path / "off" / "tensorboard").exists()


def test_tensorboard_event_files(tmp_path):
    """With the real package: the event files hold the scalars, and a resume purges the steps it redoes."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    for it in (1, 2, 3):
        logger.log({"type": "train", "iteration": it, "total_loss": float(it)})
    logger.log({**EVAL_RECORD, "iteration": 3})
    logger.truncate_after(1)
    for it in (2, 3):
        logger.log({"type": "train", "iteration": it, "total_loss": 10.0 * it})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/total_loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]
    assert events.Scalars("eval/no_nms/AP") == []  # logged at step 3, purged by the resume
