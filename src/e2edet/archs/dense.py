"""Dense (FCOS-style) detectors: FCOS, POTO, DeFCN (3DMF + auxiliary loss) and One-to-Few.

Model :class:`e2edet.models.dense.detector.DenseDetector`, criterion
:class:`e2edet.losses.dense_criterion.DenseCriterion`, post-processor
:class:`e2edet.models.dense.postprocess.DensePostProcessor` (``specs/dense.md``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from e2edet.archs.base import Architecture, ModelSection
from e2edet.config_checks import ConfigError, Float, Int, Section

__all__ = ["ARCH", "DenseLossSection", "DenseModelSection"]


class DenseModelSection(ModelSection):
    """``model`` of ``arch: dense``: ``num_convs`` (depth of the cls and box towers), ``centerness`` (+
    ``ctr_convs`` x ``ctr_channels`` convs before it: O2F's 3 x 64), ``max_filter`` (DeFCN's 3D max filtering, with
    GroupNorm when ``max_filter_gn``), ``box_coder`` (``ltrb``: FCOS distances; ``anchor_deltas``: DeFCN Anchor's
    (dx, dy, dw, dh) of one square anchor of side ``anchor_size`` strides per location, 4 = 32..512 on P3..P7),
    ``masks`` (O2F's CondInst instance-segmentation head, ``specs/dense.md`` §3.10: a controller of the dynamic mask
    head's parameters on the box tower and a mask branch on P3-P5 of width ``mask_channels`` with ``mask_convs``
    tower convs and ``mask_bases`` bases; needs ``data.masks``), ``channels_last`` (weights and feature maps in NHWC
    memory layout: the same function, measured 0.86x the training-step time of NCHW on 2 CPU cores for
    ``defcn_mnv2_cpu``; off by default, on in the ``*_mnv2_cpu`` recipes; unmeasured on GPUs)."""

    arch: Literal["dense"] = "dense"
    num_convs: Int = Field(4, ge=0)
    centerness: bool = False
    ctr_convs: Int = Field(0, ge=0)
    ctr_channels: Int = Field(64, ge=1)
    max_filter: bool = False
    max_filter_gn: bool = True
    box_coder: Literal["ltrb", "anchor_deltas"] = "ltrb"
    anchor_size: Float = Field(4.0, gt=0)
    masks: bool = False
    mask_channels: Int = Field(128, ge=1)
    mask_convs: Int = Field(4, ge=0)
    mask_bases: Int = Field(8, ge=1)
    channels_last: bool = False


class DenseLossSection(Section):
    """``loss`` of ``arch: dense`` (the arguments of :class:`e2edet.losses.dense_criterion.DenseCriterion`).

    ``assigner``: ``fcos`` (one-to-many), ``atss`` (one-to-many: ``atss_topk`` nearest points per level, IoU of
    ``atss_anchor_scale``-stride anchors >= mean + std, inside the box), ``poto`` (Hungarian one-to-one on
    ``p^(1-poto_alpha) IoU^poto_alpha`` inside a ``center_radius`` prior), ``poto_argmax``, DeFCN's one-to-one
    baselines ``anchor`` (top-1 anchor IoU; needs ``model.box_coder=anchor_deltas``), ``center`` (nearest point per
    level within the FCOS scale range) and ``fg_loss`` (Hungarian on focal + ``reg_weight``·GIoU inside the prior),
    or ``o2f`` (one-to-few: ``o2f_topk``, ``soft_weight``, ``max_soft_weight``, ``max_t`` -> ``min_t``,
    ``o2f_neg_weight``). ``score``: the score the one-to-one loss and
    quality use, ``cls``, ``cls_filter`` (3DMF) or ``cls_ctr`` (O2F). ``aux``: DeFCN's auxiliary one-to-many focal
    loss (``aux_topk``, ``aux_weight``). ``keep_infeasible``: keep Hungarian matches outside a GT's prior (POTO and
    ``fg_loss``; official DeFCN; see :class:`e2edet.assign.poto.POTOAssigner`). ``focal_alpha`` < 0 disables the
    alpha term. ``mask_weight`` (dice, 2) and ``sem_weight`` (auxiliary semantic focal loss, 1) weigh the mask
    losses of models with ``model.masks`` (:class:`e2edet.losses.condinst_criterion.CondInstCriterion`).
    """

    assigner: Literal["fcos", "atss", "poto", "poto_argmax", "anchor", "center", "fg_loss", "o2f"] = "poto"
    score: Literal["cls", "cls_filter", "cls_ctr"] = "cls"
    aux: bool = False
    focal_alpha: Float = Field(0.25, le=1)
    focal_gamma: Float = Field(2.0, ge=0)
    reg_weight: Float = Field(2.0, ge=0)
    poto_alpha: Float = Field(0.8, ge=0, le=1)
    center_radius: Float = Field(1.5, ge=0)
    aux_topk: Int = Field(9, ge=1)
    aux_weight: Float = Field(1.0, ge=0)
    keep_infeasible: bool = False
    o2f_topk: Int = Field(7, ge=1)
    soft_weight: Float = Field(0.4, ge=0)
    max_soft_weight: Float = Field(1.0, ge=0)
    max_t: Float = Field(0.6, ge=0, le=1)
    min_t: Float = Field(0.2, ge=0, le=1)
    o2f_neg_weight: Float = Field(0.75, ge=0)
    atss_topk: Int = Field(9, ge=1)
    atss_anchor_scale: Float = Field(8.0, gt=0)
    mask_weight: Float = Field(2.0, ge=0)
    sem_weight: Float = Field(1.0, ge=0)


def check(cfg, source: str) -> None:
    """The dense-specific combinations (score heads, assigner and score pairs)."""
    m, loss = cfg.model, cfg.loss
    if cfg.test.score == "drmm":
        raise ConfigError(f"{source}: test.score=drmm needs a query detector with model.drmm=true "
                          "(model.arch=sparse_rcnn or adamixer)")
    if loss.score == "cls_filter" and not m.max_filter:
        raise ConfigError(f"{source}: loss.score=cls_filter needs model.max_filter=true (the 3DMF filter branch)")
    for key, score in (("test.score", cfg.test.score), ("loss.score", loss.score)):
        if score in ("cls_ctr_sqrt", "cls_ctr", "cls_ctr_cls_thresh") and not m.centerness:
            raise ConfigError(f"{source}: {key}={score} needs model.centerness=true")
    if loss.assigner == "o2f" and loss.score != "cls_ctr":
        raise ConfigError(f"{source}: loss.assigner=o2f goes with loss.score=cls_ctr (the joint cls x ctr score)")
    if loss.assigner in ("fcos", "atss", "anchor", "center", "fg_loss") and loss.score != "cls":
        raise ConfigError(f"{source}: loss.assigner={loss.assigner} trains on loss.score=cls (the product scores need "
                          "POTO/O2F)")
    if loss.assigner == "anchor" and m.box_coder != "anchor_deltas":
        raise ConfigError(f"{source}: loss.assigner=anchor matches anchor boxes: it needs "
                          "model.box_coder=anchor_deltas")
    if m.masks and loss.assigner != "o2f":
        raise ConfigError(f"{source}: model.masks=true (the CondInst head of O2F's segmentation variant) trains with "
                          f"loss.assigner=o2f, got {loss.assigner}")
    if m.masks and not cfg.data.masks:
        raise ConfigError(f"{source}: model.masks=true needs the instance masks of the training data: set "
                          "data.masks=true")


def build_model(cfg):
    """:class:`DenseDetector` with the ``model`` section's settings."""
    from e2edet.models.dense.detector import DenseDetector

    m = cfg.model
    return DenseDetector(backbone_name=m.backbone, num_classes=m.num_classes, pretrained=m.pretrained,
                         freeze_at=m.freeze_at, fpn_channels=m.fpn_channels, num_convs=m.num_convs,
                         centerness=m.centerness, ctr_convs=m.ctr_convs, ctr_channels=m.ctr_channels,
                         max_filter=m.max_filter, max_filter_gn=m.max_filter_gn, box_coder=m.box_coder,
                         anchor_size=m.anchor_size, masks=m.masks, mask_channels=m.mask_channels,
                         mask_convs=m.mask_convs, mask_bases=m.mask_bases, channels_last=m.channels_last)


def build_criterion(cfg):
    """:class:`DenseCriterion` (every key of the ``loss`` section but the mask weights is one of its arguments;
    ``centerness`` comes from the model: FCOS/ATSS train and weight by the branch when the model has it,
    ``wo_ctrness`` otherwise), or :class:`CondInstCriterion` (all of them) for a model with ``masks``."""
    from e2edet.losses.condinst_criterion import CondInstCriterion
    from e2edet.losses.dense_criterion import DenseCriterion

    keys = cfg.loss.model_dump()
    mask_weight, sem_weight = keys.pop("mask_weight"), keys.pop("sem_weight")
    if cfg.model.masks:
        return CondInstCriterion(num_classes=cfg.model.num_classes, mask_weight=mask_weight, sem_weight=sem_weight,
                                 centerness=cfg.model.centerness, **keys)
    return DenseCriterion(num_classes=cfg.model.num_classes, centerness=cfg.model.centerness, **keys)


def build_postprocessor(cfg):
    """Per-level top-k + threshold (:class:`DensePostProcessor`); NMS only when ``nms_iou`` is passed at call time."""
    from e2edet.models.dense.postprocess import DensePostProcessor

    t = cfg.test
    return DensePostProcessor(score=t.score, score_thresh=t.score_thresh, topk_candidates=t.topk_candidates,
                              max_detections=t.max_detections)


ARCH = Architecture("dense", DenseModelSection, DenseLossSection, check, build_model, build_criterion,
                    build_postprocessor)
