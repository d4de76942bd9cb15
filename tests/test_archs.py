"""The architecture registry: every architecture's sections, checks and builders, and the rebuild of a trained model
from the config stored with its weights (the model hyper-parameters come from the config, not from the model)."""

from __future__ import annotations

import typing

import pytest
import torch

from e2edet.archs import ARCHITECTURES, get_architecture
from e2edet.archs.base import ModelSection
from e2edet.build import build_criterion, build_model, build_postprocessor
from e2edet.config import ConfigError, apply_overrides, from_dict, to_dict
from e2edet.engine.checkpoint import load_weights, save_checkpoint
from e2edet.recipes import get_recipe

#: A tiny config of every architecture (recipe + overrides of its own keys).
TINY = {
    "dense": ("o2f_mnv2_cpu", ["model.fpn_channels=16", "model.num_convs=1", "model.ctr_channels=8"]),
    "sparse_rcnn": ("drmm_sparse_rcnn_mnv2_cpu", ["model.fpn_channels=16", "model.num_queries=6",
                                                  "model.num_stages=2", "model.num_heads=2",
                                                  "model.dim_feedforward=32", "model.dynamic_dim=8"]),
    "adamixer": ("adamixer_mnv2_cpu", ["model.fpn_channels=16", "model.num_queries=6", "model.num_stages=2",
                                       "model.num_heads=2", "model.dim_feedforward=32", "model.in_points=4",
                                       "model.out_points=8", "model.num_groups=2"]),
    "deformable_detr": ("deformable_detr_pp_mnv2_cpu", ["model.fpn_channels=64", "model.num_queries=20",
                                                        "model.enc_layers=1", "model.dec_layers=2",
                                                        "model.num_heads=4", "model.dim_feedforward=64"]),
}


def test_every_architecture_is_registered_under_its_arch_literal():
    assert set(TINY) == set(ARCHITECTURES)
    for name, arch in ARCHITECTURES.items():
        assert issubclass(arch.model_section, ModelSection)
        assert typing.get_args(arch.model_section.model_fields["arch"].annotation) == (name,)
        assert get_architecture(name) is arch
    with pytest.raises(KeyError, match="known: dense, sparse_rcnn, adamixer"):
        get_architecture("detr")


@pytest.mark.parametrize("arch", list(TINY))
def test_rebuild_from_the_stored_config_gives_the_same_detections(arch, tmp_path):
    recipe, over = TINY[arch]
    cfg = apply_overrides(get_recipe(recipe), ["model.pretrained=false", "model.num_classes=2", *over])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path, "best", model, None, None, {}, to_dict(cfg))
    state, stored = load_weights(tmp_path)
    rebuilt = build_model(from_dict(stored, "weights")).eval()
    rebuilt.load_state_dict(state)
    images, sizes = torch.randn(1, 3, 64, 96), torch.tensor([[64, 96]])
    post = build_postprocessor(cfg)
    with torch.no_grad():
        a = post(model(images, sizes), sizes, sizes)[0]
        b = post(rebuilt(images, sizes), sizes, sizes)[0]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(a[key], b[key])
    assert callable(build_criterion(cfg))


def test_architecture_checks_name_the_keys():
    with pytest.raises(ConfigError, match="model.fpn_channels=20 must be divisible by model.num_groups"):
        apply_overrides(get_recipe("adamixer_mnv2_cpu"), ["model.fpn_channels=20", "model.num_heads=2",
                                                          "model.num_groups=8"])
    with pytest.raises(ConfigError, match="test.score=drmm together with model.drmm=true"):
        apply_overrides(get_recipe("sparse_rcnn_mnv2_cpu"), ["test.score=drmm"])
    with pytest.raises(ConfigError, match="test.score=drmm needs a query detector"):
        apply_overrides(get_recipe("poto_mnv2_cpu"), ["test.score=drmm"])
    with pytest.raises(ConfigError, match="model.fpn_channels=36 must be divisible by model.num_groups .4. and by 8"):
        apply_overrides(get_recipe("adamixer_mnv2_cpu"), ["model.fpn_channels=36", "model.num_heads=2"])
