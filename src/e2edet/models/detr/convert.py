"""State-dict conversion of Deformable DETR checkpoints to e2edet's :class:`~e2edet.models.detr.deformable_detr.
DeformableDETR`: the official ``fundamentalvision/Deformable-DETR`` (and MS-DETR / H-DETR, which share its key
layout) ``.pth`` files, and Hugging Face ``transformers`` ``DeformableDetrForObjectDetection`` state dicts.

The key maps are read from the official ``models/deformable_detr.py`` / ``deformable_transformer.py`` (whose names
e2edet keeps) and from ``transformers``' ``modeling_deformable_detr.py`` (its conversion script
``convert_deformable_detr_to_pytorch.py`` documents the official -> transformers renaming). Pure functions over
``{name: tensor}`` dicts.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

__all__ = ["from_official", "from_transformers", "official_hparams", "transformers_hparams"]

#: Official keys that duplicate the top-level heads (the decoder holds references to them) and are dropped.
_DUPLICATE = re.compile(r"^transformer\.decoder\.(bbox_embed|class_embed)\.")


def from_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official / MS-DETR / H-DETR ``model`` state dict -> e2edet names: ``backbone.0.body.*`` -> ``backbone.body.*``;
    the decoder's copies of the heads are dropped; every other name is e2edet's already. ``module.`` prefixes (DDP)
    are removed."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if _DUPLICATE.match(key):
            continue
        out[re.sub(r"^backbone\.0\.body\.", "backbone.body.", key)] = value
    return out


#: transformers layer-name pieces -> e2edet (encoder layer, decoder layer).
_ENC = {"self_attn_layer_norm": "norm1", "mlp.fc1": "linear1", "mlp.fc2": "linear2", "fc1": "linear1",
        "fc2": "linear2", "final_layer_norm": "norm2"}
_DEC = {"encoder_attn_layer_norm": "norm1", "self_attn_layer_norm": "norm2", "mlp.fc1": "linear1",
        "mlp.fc2": "linear2", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm3",
        "encoder_attn": "cross_attn", "self_attn.o_proj": "self_attn.out_proj",
        "self_attn.out_proj": "self_attn.out_proj"}


def _hf_backbone(key: str) -> str | None:
    """A transformers backbone key -> e2edet ``backbone.body.*`` (torchvision ResNet names), or None if not one.

    timm backbones (the published checkpoints) already use torchvision names; transformers' own ``ResNetModel``
    (``embedder`` / ``encoder.stages``) is renamed: stage i layer j ``layer.k`` -> ``layer{i+1}.{j}.conv{k+1}`` /
    ``bn{k+1}``, ``shortcut`` -> ``downsample.0`` / ``.1``."""
    m = re.match(r"^model\.backbone\.(?:conv_encoder\.)?model\.(.*)$", key)
    if m is None:
        return None
    rest = m.group(1)
    rest = re.sub(r"^embedder\.embedder\.convolution\.", "conv1.", rest)
    rest = re.sub(r"^embedder\.embedder\.normalization\.", "bn1.", rest)
    stage = re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$", rest)
    if stage:
        i, j, tail = int(stage.group(1)), stage.group(2), stage.group(3)
        tail = re.sub(r"^layer\.(\d+)\.convolution\.", lambda g: f"conv{int(g.group(1)) + 1}.", tail)
        tail = re.sub(r"^layer\.(\d+)\.normalization\.", lambda g: f"bn{int(g.group(1)) + 1}.", tail)
        tail = re.sub(r"^shortcut\.convolution\.", "downsample.0.", tail)
        tail = re.sub(r"^shortcut\.normalization\.", "downsample.1.", tail)
        rest = f"layer{i + 1}.{j}.{tail}"
    return f"backbone.body.{rest}"


def from_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``DeformableDetrForObjectDetection`` state dict -> e2edet names.

    The decoder self-attention's separate ``q_proj``/``k_proj``/``v_proj`` are concatenated (q, k, v) into
    ``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias``; the decoder's copies of the heads are dropped.

    Raises:
        KeyError: a key this map does not know (the message names it).
    """
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        backbone = _hf_backbone(key)
        if backbone is not None:
            out[backbone] = value
            continue
        if re.match(r"^model\.decoder\.(bbox_embed|class_embed)\.", key) or key.endswith("num_batches_tracked"):
            continue
        if re.match(r"^(class_embed|bbox_embed)\.", key):
            out[key] = value
            continue
        if key == "model.query_position_embeddings.weight":
            out["query_embed.weight"] = value
            continue
        m = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.*)$", key)
        if m:
            part, idx, tail = m.groups()
            prefix = f"transformer.{part}.layers.{idx}."
            proj = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", tail)
            if part == "decoder" and proj:
                qkv.setdefault(f"{prefix}self_attn.in_proj_{proj.group(2)}", {})[proj.group(1)] = value
                continue
            for old, new in (_ENC if part == "encoder" else _DEC).items():
                if tail.startswith(old + "."):
                    tail = new + tail[len(old):]
                    break
            out[prefix + tail] = value
            continue
        m = re.match(r"^model\.(input_proj\..*)$", key)
        if m:
            out[m.group(1)] = value
            continue
        m = re.match(r"^model\.(level_embed|reference_points\..*|enc_output.*|pos_trans.*)$", key)
        if m:
            out[f"transformer.{m.group(1)}"] = value
            continue
        raise KeyError(f"unknown transformers Deformable DETR key {key!r}")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{key}: the checkpoint lacks one of q_proj/k_proj/v_proj")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def official_hparams(args: dict) -> dict:
    """e2edet ``model`` section values from an official checkpoint's ``args`` (``main.py`` argument names)."""
    get = args.get
    return dict(backbone=str(get("backbone", "resnet50")), fpn_channels=int(get("hidden_dim", 256)),
                num_queries=int(get("num_queries", 300)), num_feature_levels=int(get("num_feature_levels", 4)),
                enc_layers=int(get("enc_layers", 6)), dec_layers=int(get("dec_layers", 6)),
                num_heads=int(get("nheads", 8)), dim_feedforward=int(get("dim_feedforward", 1024)),
                dropout=float(get("dropout", 0.1)), enc_points=int(get("enc_n_points", 4)),
                dec_points=int(get("dec_n_points", 4)), with_box_refine=bool(get("with_box_refine", False)),
                two_stage=bool(get("two_stage", False)), mixed_selection=bool(get("mixed_selection", False)),
                look_forward_twice=bool(get("look_forward_twice", False)))


def transformers_hparams(config: dict) -> dict:
    """e2edet ``model`` section values from a transformers ``config.json`` (``DeformableDetrConfig``)."""
    get = config.get
    backbone = get("backbone") or "resnet50"
    return dict(backbone=str(backbone), fpn_channels=int(get("d_model", 256)), num_queries=int(get("num_queries", 300)),
                num_feature_levels=int(get("num_feature_levels", 4)), enc_layers=int(get("encoder_layers", 6)),
                dec_layers=int(get("decoder_layers", 6)), num_heads=int(get("encoder_attention_heads", 8)),
                dim_feedforward=int(get("encoder_ffn_dim", 1024)), dropout=float(get("dropout", 0.1)),
                enc_points=int(get("encoder_n_points", 4)), dec_points=int(get("decoder_n_points", 4)),
                with_box_refine=bool(get("with_box_refine", False)), two_stage=bool(get("two_stage", False)))
