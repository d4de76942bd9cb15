"""Deformable DETR and its published variants (refine, two-stage, Deformable-DETR++):
:class:`e2edet.models.detr.deformable_detr.DeformableDETR` (``specs/detr.md`` §1).

Criterion: :class:`e2edet.losses.set_criterion.SetCriterion` with one prediction set per decoder layer (or only the
last with ``loss.aux_loss=false``) and, in two-stage, the class-agnostic encoder set ``enc``; L1 on normalised
cxcywh, every set normalised by the number of GTs (official ``num_boxes``). Post-processing: sigmoid, top-k over
queries x classes, no NMS (shared with the query detectors).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from e2edet.archs import query
from e2edet.archs.base import Architecture, ModelSection, RecollectionKeys, build_recollection
from e2edet.config_checks import ConfigError, Float, Int, Section

__all__ = ["ARCH", "DeformableDETRLossSection", "DeformableDETRModelSection"]


class DeformableDETRModelSection(RecollectionKeys, ModelSection):
    """``model`` of ``arch: deformable_detr``. ``fpn_channels`` is the transformer width d (256).

    ``num_queries`` (300), ``num_feature_levels`` (4: C3-C5 + one stride-2 level), ``enc_layers``/``dec_layers``
    (6/6), ``num_heads`` (8), ``dim_feedforward`` (1024; 2048 in the H-DETR/MS-DETR baselines), ``dropout`` (0.1; 0 in
    Deformable-DETR++), ``enc_points``/``dec_points`` (4/4), ``with_box_refine``, ``two_stage``, ``mixed_selection``
    and ``look_forward_twice`` (the last two: Deformable-DETR++, with two-stage and refinement). Learning-rate
    multipliers of the official recipe: ``lr_backbone_mult`` for the backbone (2e-5 of 2e-4) and
    ``lr_linear_proj_mult`` for the reference-point and sampling-offset projections (``main.py``
    ``lr_linear_proj_names``), carried by the model as ``lr_multipliers`` for
    :func:`e2edet.engine.optim.build_optimizer`.

    MS-DETR (``specs/detr.md`` §3): ``ms_detr`` (decoder layers cross-attention -> self-attention -> FFN with a
    one-to-many tap after cross-attention, supervised by the ``loss.o2m_*`` set) and ``aux_ffn`` (the tap goes
    through an auxiliary FFN, as every released MS-DETR script). SQR (§2): the :class:`RecollectionKeys`.
    """

    arch: Literal["deformable_detr"] = "deformable_detr"
    num_queries: Int = Field(300, ge=1)
    num_feature_levels: Int = Field(4, ge=1)
    enc_layers: Int = Field(6, ge=1)
    dec_layers: Int = Field(6, ge=1)
    num_heads: Int = Field(8, ge=1)
    dim_feedforward: Int = Field(1024, ge=1)
    dropout: Float = Field(0.1, ge=0, lt=1)
    enc_points: Int = Field(4, ge=1)
    dec_points: Int = Field(4, ge=1)
    with_box_refine: bool = False
    two_stage: bool = False
    mixed_selection: bool = False
    look_forward_twice: bool = False
    lr_backbone_mult: Float = Field(0.1, ge=0)
    lr_linear_proj_mult: Float = Field(0.1, ge=0)
    ms_detr: bool = False
    aux_ffn: bool = True


class DeformableDETRLossSection(Section):
    """``loss`` of ``arch: deformable_detr`` (official ``main.py``): loss weights ``cls_weight`` (sigmoid focal,
    ``focal_alpha``/``focal_gamma``), ``l1_weight`` (normalised cxcywh), ``giou_weight``; matching-cost weights
    ``cost_class``, ``cost_l1``, ``cost_giou`` (2 / 5 / 2 both); ``aux_loss``: a loss on every decoder layer (and
    the encoder proposals in two-stage), not only the last.

    Encoder set (two-stage): ``enc_cls_weight``, ``enc_l1_weight``, ``enc_giou_weight`` (2 / 5 / 2), its matching
    cost on the class ``enc_cost_class`` (2; MS-DETR 0) and ``enc_match_anchors`` (MS-DETR: match on the fixed
    proposals, ``use_anchors_enc_match``, then compute the loss on the regressed boxes).

    One-to-many set (``model.ms_detr``, every decoder layer, normalised by the GT count): loss weights
    ``o2m_cls_weight``, ``o2m_l1_weight``, ``o2m_giou_weight`` (2 / 5 / 2) and the assigner
    (:class:`e2edet.assign.o2m.OneToManyAssigner`): ``o2m_threshold`` (0.4), ``o2m_k`` (6), ``o2m_coef_box`` (0.7;
    the class term weighs ``1 - o2m_coef_box``), ``o2m_pos_fraction`` (0.25).
    """

    focal_alpha: Float = Field(0.25, le=1)
    focal_gamma: Float = Field(2.0, ge=0)
    cls_weight: Float = Field(2.0, ge=0)
    l1_weight: Float = Field(5.0, ge=0)
    giou_weight: Float = Field(2.0, ge=0)
    cost_class: Float = Field(2.0, ge=0)
    cost_l1: Float = Field(5.0, ge=0)
    cost_giou: Float = Field(2.0, ge=0)
    aux_loss: bool = True
    enc_cls_weight: Float = Field(2.0, ge=0)
    enc_l1_weight: Float = Field(5.0, ge=0)
    enc_giou_weight: Float = Field(2.0, ge=0)
    enc_cost_class: Float = Field(2.0, ge=0)
    enc_match_anchors: bool = False
    o2m_cls_weight: Float = Field(2.0, ge=0)
    o2m_l1_weight: Float = Field(5.0, ge=0)
    o2m_giou_weight: Float = Field(2.0, ge=0)
    o2m_threshold: Float = Field(0.4, ge=0)
    o2m_k: Int = Field(6, ge=1)
    o2m_coef_box: Float = Field(0.7, ge=0, le=1)
    o2m_pos_fraction: Float = Field(0.25, ge=0, le=1)


def check(cfg, source: str) -> None:
    """Sigmoid scores only; widths that split into heads and GroupNorm groups; the ++ tricks need two-stage +
    refinement."""
    m = cfg.model
    if cfg.test.score != "cls":
        raise ConfigError(f"{source}: Deformable DETR scores with test.score=cls (sigmoid), got {cfg.test.score}")
    if m.fpn_channels % m.num_heads or m.fpn_channels % 32:
        raise ConfigError(f"{source}: model.fpn_channels={m.fpn_channels} must be divisible by model.num_heads "
                          f"({m.num_heads}) and by 32 (GroupNorm of the input projections)")
    if m.sqr != "off" and not cfg.loss.aux_loss:
        raise ConfigError(f"{source}: model.sqr={m.sqr} supervises every decoder layer's query sets; it needs "
                          "loss.aux_loss=true")
    if (m.mixed_selection or m.look_forward_twice) and not (m.two_stage and m.with_box_refine):
        raise ConfigError(f"{source}: model.mixed_selection and model.look_forward_twice need model.two_stage=true "
                          "and model.with_box_refine=true (Deformable-DETR++)")


def build_model(cfg):
    """:class:`DeformableDETR` with the ``model`` section's settings."""
    from e2edet.models.detr.deformable_detr import DeformableDETR

    m = cfg.model
    return DeformableDETR(backbone_name=m.backbone, num_classes=m.num_classes, pretrained=m.pretrained,
                          freeze_at=m.freeze_at, hidden_dim=m.fpn_channels, num_queries=m.num_queries,
                          num_feature_levels=m.num_feature_levels, enc_layers=m.enc_layers, dec_layers=m.dec_layers,
                          num_heads=m.num_heads, dim_feedforward=m.dim_feedforward, dropout=m.dropout,
                          enc_points=m.enc_points, dec_points=m.dec_points, with_box_refine=m.with_box_refine,
                          two_stage=m.two_stage, mixed_selection=m.mixed_selection,
                          look_forward_twice=m.look_forward_twice, ms_detr=m.ms_detr, aux_ffn=m.aux_ffn,
                          recollection=build_recollection(m, m.dec_layers),
                          lr_multipliers={r"^backbone\.": m.lr_backbone_mult,
                                          r"reference_points|sampling_offsets": m.lr_linear_proj_mult})


def build_criterion(cfg):
    """The set criterion of Deformable DETR (official ``SetCriterion`` + ``HungarianMatcher``, ``specs/detr.md``
    §1.3-1.4): prediction sets ``stage{i}`` (every decoder layer; only the last without ``aux_loss``), in two-stage
    ``enc`` (class-agnostic), and with ``model.ms_detr`` ``stage{i}_o2m`` (the one-to-many tap of every layer,
    :class:`~e2edet.assign.o2m.OneToManyAssigner`, MS-DETR ``models/deformable_detr.py`` ``SetCriterion.forward``).
    With SQR the per-layer sets cover every recollected set (summed per layer)."""
    from e2edet.assign.o2m import OneToManyAssigner
    from e2edet.assign.set_matcher import HungarianMatcher
    from e2edet.losses.set_criterion import PredictionSet, SetCriterion

    loss, m = cfg.loss, cfg.model
    focal = dict(focal_alpha=loss.focal_alpha, focal_gamma=loss.focal_gamma)
    common = dict(boxes_key="pred_boxes_norm", box_format="cxcywh_norm", box_space="cxcywh_norm",
                  normalizer="num_gt", **focal)

    def matcher(cost_class=loss.cost_class):
        return HungarianMatcher(cost_class=cost_class, cost_l1=loss.cost_l1, cost_giou=loss.cost_giou,
                                box_space="cxcywh_norm", **focal)

    weights = dict(cls_weight=loss.cls_weight, l1_weight=loss.l1_weight, giou_weight=loss.giou_weight)
    if loss.aux_loss:
        sets = [PredictionSet("stage{i}", source="stages", matcher=matcher(), **weights, **common)]
    else:
        sets = [PredictionSet(f"stage{m.dec_layers - 1}", source=None, matcher=matcher(), **weights, **common)]
    if m.two_stage and loss.aux_loss:
        sets.append(PredictionSet(
            "enc", source="enc_outputs", matcher=matcher(loss.enc_cost_class), label_mode="class_agnostic",
            match_boxes_key="anchors_norm" if loss.enc_match_anchors else None, cls_weight=loss.enc_cls_weight,
            l1_weight=loss.enc_l1_weight, giou_weight=loss.enc_giou_weight, **common))
    if m.ms_detr:
        assigner = OneToManyAssigner(threshold=loss.o2m_threshold, k=loss.o2m_k, coef_box=loss.o2m_coef_box,
                                     coef_cls=1.0 - loss.o2m_coef_box, positive_fraction=loss.o2m_pos_fraction)
        o2m = dict(logits_key="pred_logits_o2m", matcher=assigner, cls_weight=loss.o2m_cls_weight,
                   l1_weight=loss.o2m_l1_weight, giou_weight=loss.o2m_giou_weight, **common)
        o2m["boxes_key"] = "pred_boxes_norm_o2m"
        if loss.aux_loss:
            sets.append(PredictionSet("stage{i}_o2m", source="stages", **o2m))
        else:
            sets.append(PredictionSet(f"stage{m.dec_layers - 1}_o2m", source=None, **o2m))
    return SetCriterion(m.num_classes, sets=sets)


ARCH = Architecture("deformable_detr", DeformableDETRModelSection, DeformableDETRLossSection, check, build_model,
                    build_criterion, query.build_postprocessor)
