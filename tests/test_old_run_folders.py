"""Run folders written by an earlier config format still load and predict the same detections.

The fixtures (``tests/fixtures/old_run/``, see its README) hold a flat ``config.yaml`` and weights whose metadata
carries the same flat config, as written before the typed per-architecture configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from e2edet.config import load_config
from e2edet.inference import Predictor

OLD_RUNS = Path(__file__).parent / "fixtures" / "old_run"


def synthetic_image() -> torch.Tensor:
    """The image the fixtures' ``detections.json`` were computed on (``make_old_run.py``)."""
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 150, 190), dtype=np.uint8))


@pytest.mark.parametrize("arch", ["dense", "sparse_rcnn"])
def test_old_run_folder_loads_and_predicts_the_same(arch):
    run = OLD_RUNS / arch
    cfg = load_config(run / "config.yaml")
    assert cfg.model.arch == arch and cfg.model.class_names == ("cat", "dog") and cfg.model.fpn_channels == 16
    predictor = Predictor.from_weights(run, device="cpu")
    assert predictor.cfg.model == cfg.model.model_copy(update={"pretrained": False})
    det = predictor([synthetic_image()])[0]
    expected = json.loads((run / "detections.json").read_text())
    assert det["labels"].tolist() == expected["labels"]
    torch.testing.assert_close(det["scores"], torch.tensor(expected["scores"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(det["boxes"], torch.tensor(expected["boxes"]), rtol=1e-4, atol=1e-3)
