"""Checkpoint save/resume equality with the real DeFCN model, criterion and data pipeline on BCCD images."""

from __future__ import annotations

import pytest
import torch

from e2edet.build import build_criterion, build_datasets, build_model, fill_classes
from e2edet.config import apply_overrides, to_dict
from e2edet.data.loader import build_loader
from e2edet.engine.checkpoint import load_weights
from e2edet.engine.rng import seed_everything
from e2edet.engine.trainer import Trainer
from e2edet.recipes import get_recipe
from tests.conftest import TINY


def _train(cfg, run_dir, stop_epoch=None, resume=None) -> dict[str, torch.Tensor]:
    data = build_datasets(cfg)
    fill_classes(cfg, data.train.class_names)
    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    loader = build_loader(data.train, cfg.train.batch_size, train=True, workers=0, seed=cfg.train.seed)
    trainer = Trainer(model, build_criterion(cfg), loader, cfg.train, run_dir, config_dict=to_dict(cfg),
                      progress=False)
    trainer.fit(resume=resume, stop_epoch=stop_epoch)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_resume_continues_exactly(bccd_subset, tmp_path):
    cfg = apply_overrides(get_recipe("defcn_mnv2_cpu"), [f"data={bccd_subset}", "epochs=2", *TINY,
                                                         "train.eval_period=0", "data.train_min_sizes=160,192"])
    straight = _train(cfg, tmp_path / "a")
    _train(cfg, tmp_path / "b", stop_epoch=1)
    resumed = _train(cfg, tmp_path / "b", resume=tmp_path / "b")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # the saved weights carry the config, so they rebuild the model on their own
    state, saved_cfg = load_weights(tmp_path / "b")
    assert saved_cfg["model"]["max_filter"] is True and saved_cfg["model"]["num_classes"] == 3
    assert all(torch.equal(state[k], resumed[k]) for k in state)
