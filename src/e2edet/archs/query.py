"""What the query-based detectors (Sparse R-CNN, AdaMixer; D-RMM on both) share: their common ``model`` keys, the
``loss`` section (Hungarian set loss, or the D-RMM mixture loss), the checks, the criterion and the post-processor.

``specs/query.md`` §1.3-1.4 (set loss), §3 (D-RMM).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from e2edet.archs.base import ModelSection, RecollectionKeys, build_recollection
from e2edet.config_checks import ConfigError, Float, Int, Section

__all__ = ["QueryLossSection", "QueryModelSection", "build_criterion", "build_postprocessor", "check",
           "query_kwargs"]


class QueryModelSection(RecollectionKeys, ModelSection):
    """Model keys of every query detector: ``num_queries``, ``num_stages`` (decoder stages), ``num_heads`` (query
    self-attention), ``dim_feedforward``, ``dropout``, ``proposal_init`` (``whole``/``grid``; empty = the method's
    default), ``drmm`` (D-RMM mixture outputs and loss) and the SQR keys (:class:`RecollectionKeys`)."""

    num_queries: Int = Field(100, ge=1)
    num_stages: Int = Field(6, ge=1)
    num_heads: Int = Field(8, ge=1)
    dim_feedforward: Int = Field(2048, ge=1)
    dropout: Float = Field(0.0, ge=0, lt=1)
    proposal_init: Literal["", "whole", "grid"] = ""
    drmm: bool = False


class QueryLossSection(Section):
    """``loss`` of the query detectors.

    Hungarian set loss (:class:`e2edet.losses.set_criterion.SetCriterion`): loss weights ``cls_weight`` (sigmoid
    focal, ``focal_alpha``/``focal_gamma``), ``l1_weight`` (L1 on normalised xyxy), ``giou_weight``; matching-cost
    weights ``cost_class``, ``cost_l1``, ``cost_giou`` (the published recipes use the loss weights, 2 / 5 / 2).
    With ``model.drmm`` the D-RMM mixture loss (:class:`e2edet.losses.drmm.DRMMCriterion`) is used instead:
    ``min_scale_ratio``, ``mm_weight``, ``mcm_weight``, ``prob_weight``, ``coord_dist``.
    """

    focal_alpha: Float = Field(0.25, le=1)
    focal_gamma: Float = Field(2.0, ge=0)
    cls_weight: Float = Field(2.0, ge=0)
    l1_weight: Float = Field(5.0, ge=0)
    giou_weight: Float = Field(2.0, ge=0)
    cost_class: Float = Field(2.0, ge=0)
    cost_l1: Float = Field(5.0, ge=0)
    cost_giou: Float = Field(2.0, ge=0)
    min_scale_ratio: Float = Field(0.04, ge=0)
    mm_weight: Float = Field(1.0, ge=0)
    mcm_weight: Float = Field(0.5, ge=0)
    prob_weight: Float = Field(1.0, ge=0)
    coord_dist: Literal["cauchy", "gaussian", "student_t"] = "cauchy"


def check(cfg, source: str) -> None:
    """Scores a query detector can use, and widths its attention splits into heads."""
    m = cfg.model
    if (cfg.test.score == "drmm") != m.drmm or cfg.test.score not in ("cls", "drmm"):
        raise ConfigError(f"{source}: query detectors score with test.score=cls (sigmoid), or test.score=drmm "
                          f"together with model.drmm=true; got test.score={cfg.test.score}, model.drmm={m.drmm}")
    if m.sqr != "off" and m.drmm:
        raise ConfigError(f"{source}: model.sqr={m.sqr} needs the Hungarian set loss; D-RMM's mixture loss "
                          f"(model.drmm=true) supervises only the sequential stages")
    if m.fpn_channels % m.num_heads:
        raise ConfigError(f"{source}: model.fpn_channels={m.fpn_channels} must be divisible by model.num_heads "
                          f"({m.num_heads})")


def query_kwargs(cfg) -> dict:
    """Constructor arguments every query detector takes, from the ``model`` section."""
    m = cfg.model
    return dict(recollection=build_recollection(m, m.num_stages), backbone_name=m.backbone, num_classes=m.num_classes, pretrained=m.pretrained, freeze_at=m.freeze_at,
                hidden_dim=m.fpn_channels, num_queries=m.num_queries, num_stages=m.num_stages,
                num_heads=m.num_heads, dim_feedforward=m.dim_feedforward, dropout=m.dropout, drmm=m.drmm,
                proposal_init=m.proposal_init or None)


def build_criterion(cfg):
    """The Hungarian :class:`SetCriterion` (loss and matching-cost weights from the ``loss`` section), or the D-RMM
    mixture loss when ``model.drmm``."""
    loss, k = cfg.loss, cfg.model.num_classes
    if cfg.model.drmm:
        from e2edet.losses.drmm import DRMMCriterion

        return DRMMCriterion(k, min_scale_ratio=loss.min_scale_ratio, mm_weight=loss.mm_weight,
                             mcm_weight=loss.mcm_weight, prob_weight=loss.prob_weight, coord_dist=loss.coord_dist)
    from e2edet.losses.set_criterion import SetCriterion

    return SetCriterion.for_stages(k, cls_weight=loss.cls_weight, l1_weight=loss.l1_weight,
                                   giou_weight=loss.giou_weight, cost_class=loss.cost_class, cost_l1=loss.cost_l1,
                                   cost_giou=loss.cost_giou, focal_alpha=loss.focal_alpha,
                                   focal_gamma=loss.focal_gamma)


def build_postprocessor(cfg):
    """Top-k over queries x classes (:class:`QueryPostProcessor`), D-RMM's softmax x foreground score when
    ``test.score=drmm``."""
    from e2edet.models.query.postprocess import QueryPostProcessor

    t = cfg.test
    return QueryPostProcessor(score="drmm" if t.score == "drmm" else "sigmoid", max_detections=t.max_detections)
