"""metrics.jsonl writing/reading, the loss-curve picture, and RNG isolation helpers."""

from __future__ import annotations

import random

import numpy as np
import torch

from e2edet.engine.logger import MetricsLogger, lookup, plot_losses, read_metrics
from e2edet.engine.rng import preserve_rng_state


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
