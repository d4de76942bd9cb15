"""A run trained from ImageNet weights (frozen batch norms) reloads for eval/predict/export without ImageNet weights."""

from __future__ import annotations

import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from e2edet.build import build_model
from e2edet.config import apply_overrides, to_dict
from e2edet.engine.checkpoint import save_checkpoint
from e2edet.inference import Predictor
from e2edet.models.backbone import _to_frozen_bn
from e2edet.recipes import get_recipe
from tests.conftest import TINY


def test_pretrained_run_reloads_with_its_frozen_batch_norms(tmp_path):
    torch.manual_seed(0)
    cfg = apply_overrides(get_recipe("defcn_mnv2_cpu"), [*TINY, "model.num_classes=2", "data.test_min_size=64",
                                                          "data.test_max_size=96"])
    cfg.model.class_names = ("a", "b")
    model = build_model(cfg)
    _to_frozen_bn(model.backbone)  # what build_backbone does when it loads ImageNet weights (norm=None)
    for m in model.backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):  # non-trivial statistics
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    cfg.model.pretrained = True  # as the run's stored config says
    save_checkpoint(tmp_path, "best", model, None, None, {}, to_dict(cfg))
    loaded = Predictor.from_weights(tmp_path)  # rebuilt without ImageNet weights: BatchNorm2d unless fixed
    assert any(isinstance(m, FrozenBatchNorm2d) for m in loaded.model.backbone.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.backbone.modules())
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = Predictor(model, cfg, device="cpu")(image)[0], loaded(image)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
