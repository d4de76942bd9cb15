"""``e2edet weights import``: turn a published Deformable DETR checkpoint into an e2edet run folder.

Accepted sources: an official ``fundamentalvision/Deformable-DETR`` ``.pth`` (also MS-DETR / H-DETR checkpoints,
which share its key layout: ``{"model": state_dict, "args": argparse.Namespace}``), loaded with
``torch.load(weights_only=True)``; or a Hugging Face ``transformers`` checkpoint folder (``config.json`` +
``model.safetensors`` or ``pytorch_model.bin``) of ``DeformableDetrForObjectDetection``. The architecture settings
come from the checkpoint's own ``args`` / ``config.json``; the keys are renamed by :mod:`e2edet.models.detr.convert`.

With a dataset (``data=``), the class logits are reduced to that dataset's categories in its order (the official
COCO models have 91 logits indexed by COCO category id), so that ``e2edet eval RUN data=...`` scores them directly.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from e2edet.archs.deformable_detr import DeformableDETRModelSection
from e2edet.build import build_model
from e2edet.config import Config, ConfigError, save_config, to_dict
from e2edet.data.validate import load_coco_json
from e2edet.data.datasets import resolve_dataset
from e2edet.engine.checkpoint import WeightsError, load_model_weights, save_checkpoint
from e2edet.models.backbone import BACKBONES
from e2edet.models.detr.convert import from_official, from_transformers, official_hparams, transformers_hparams

__all__ = ["import_weights"]

#: transformers ResNet configs (depths, layer type) -> torchvision backbone names.
_HF_RESNETS = {((2, 2, 2, 2), "basic"): "resnet18", ((3, 4, 6, 3), "basic"): "resnet34",
               ((3, 4, 6, 3), "bottleneck"): "resnet50", ((3, 4, 23, 3), "bottleneck"): "resnet101"}


def _read_official(path: Path) -> tuple[dict, dict, list[str]]:
    """State dict, model-section values and class names of an official ``.pth``."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, unsafe globals, not a torch file
        text = " ".join(str(err).split())[:300]
        raise WeightsError(f"{path}: not a loadable checkpoint with weights_only=True: {text}") from None
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{path}: expected a dict with a 'model' state dict, got {type(ckpt).__name__}")
    state = ckpt.get("model", ckpt)
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    state = from_official({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    num_logits = _num_logits(state, path)
    return state, official_hparams(args), [str(i) for i in range(num_logits)]


def _read_transformers(folder: Path) -> tuple[dict, dict, list[str]]:
    """State dict, model-section values and class names of a transformers checkpoint folder."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{folder}: no config.json (expected a transformers checkpoint folder)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") not in (None, "deformable_detr"):
        raise WeightsError(f"{config_file}: model_type {config.get('model_type')!r} is not deformable_detr")
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise WeightsError(f"{folder}: neither model.safetensors nor pytorch_model.bin")
    try:
        state = from_transformers(state)
    except KeyError as err:
        raise WeightsError(f"{folder}: {err.args[0]}") from None
    hparams = transformers_hparams(config)
    backbone = config.get("backbone_config") or {}
    if not config.get("backbone") and backbone:
        key = (tuple(backbone.get("depths", ())), backbone.get("layer_type", "bottleneck"))
        hparams["backbone"] = _HF_RESNETS.get(key, f"resnet with depths {key[0]} ({key[1]})")
    id2label = config.get("id2label") or {}
    num_logits = _num_logits(state, folder)
    return state, hparams, [str(id2label.get(str(i), i)) for i in range(num_logits)]


def _num_logits(state: dict, source: Path) -> int:
    if "class_embed.0.weight" not in state:
        raise WeightsError(f"{source}: no class_embed.0.weight: not a Deformable DETR checkpoint")
    return int(state["class_embed.0.weight"].shape[0])


def _select_classes(state: dict, names: list[str], dataset: str, source: Path) -> list[str]:
    """Keep the class-logit rows of ``dataset``'s category ids, in its order (in place); returns its names."""
    paths = resolve_dataset(dataset)
    categories = [(int(c["id"]), str(c["name"])) for c in sorted(load_coco_json(paths.val_json)["categories"],
                                                                  key=lambda c: c["id"])]
    ids = [cid for cid, _ in categories]
    if max(ids) >= len(names):
        raise ConfigError(f"{paths.val_json}: category id {max(ids)} has no logit in {source} "
                          f"({len(names)} classes); import without data= or with a dataset of the same categories")
    rows = torch.tensor(ids)
    for key in [k for k in state if k.startswith("class_embed.")]:
        state[key] = state[key][rows].clone()
    return [name for _, name in categories]


def import_weights(source: str | Path, out_dir: str | Path, dataset: str | None = None,
                   name: str | None = None) -> Path:
    """Write ``out_dir`` (``checkpoints/best/model.safetensors`` with the config in its metadata, and
    ``config.yaml``) from a published checkpoint (module docstring). Returns ``out_dir``.

    Raises:
        WeightsError: unreadable source, unknown keys (named), or tensors that do not fit the model the checkpoint's
            own settings build (missing / unexpected / mis-shaped keys listed in one line).
        ConfigError: settings e2edet cannot build (e.g. another backbone), or a dataset whose categories have no
            logit in the checkpoint.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise WeightsError(f"{source}: no such file or folder")
    state, hparams, class_names = _read_transformers(source) if source.is_dir() else _read_official(source)
    if hparams["backbone"] not in BACKBONES:
        raise ConfigError(f"{source}: backbone {hparams['backbone']!r} is not one of {', '.join(BACKBONES)}")
    hparams = {k: v for k, v in hparams.items() if k in DeformableDETRModelSection.model_fields}
    if dataset:
        class_names = _select_classes(state, class_names, dataset, source)
    cfg = Config.for_arch("deformable_detr", name=name or source.stem,
                          description=f"Deformable DETR imported from {source.name}")
    cfg.model = DeformableDETRModelSection(**hparams, pretrained=False, num_classes=len(class_names),
                                           class_names=tuple(class_names))
    cfg.data.dataset = dataset or ""
    model = build_model(cfg)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:  # frozen-BN checkpoints have no step counters
            state[key] = torch.zeros_like(value)
        shared = re.sub(r"^(class_embed|bbox_embed)\.\d+\.", r"\1.0.", key)
        if not cfg.model.with_box_refine and key not in state and shared in state:  # one head shared by all layers,
            state[key] = state[shared]  # saved once by transformers' save_pretrained (tied weights)
    load_model_weights(model, state, strict=True, source=source)
    save_checkpoint(out_dir, "best", model, None, None, {"imported_from": str(source)}, to_dict(cfg))
    save_config(cfg, out_dir / "config.yaml")
    return out_dir
