"""Training criterion of the FCOS-style dense detectors: FCOS (with or without centerness), ATSS, POTO
(Hungarian/argmax), DeFCN's one-to-one baselines (Anchor, Center, Foreground loss), 3DMF product score, Aux, and O2F
(one-to-few with soft targets).

Source: ``specs/dense.md`` §1.4 (FCOS losses), §2.3-2.4 (DeFCN assignments and losses) and §3.4 (O2F losses); cvpods
``cvpods/modeling/meta_arch/fcos.py`` ``FCOS.losses``, DeFCN
``playground/detection/coco/poto.res50.fpn.coco.800size.3x_ms.3dmf.aux/fcos.py`` ``FCOS.losses`` /
``FCOS.aux_losses``, ``fcos.res50.fpn.coco.800size.3x_ms.wo_ctrness/fcos.py``, ``{anchor,center,loss}.res50...``,
``crowdhuman/atss.res50.fpn.crowdhuman.800size.30k/atss.py`` ``ATSS.losses`` and ``strongwolf/o2f`` ``o2f_head.py``
``O2FHead.loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from e2edet.assign.anchor import AnchorAssigner
from e2edet.assign.atss import ATSSAssigner
from e2edet.assign.auxiliary import AuxAssigner
from e2edet.assign.base import DenseAssignment
from e2edet.assign.center import CenterAssigner
from e2edet.assign.fcos import DEFAULT_SCALE_RANGES, FCOSAssigner
from e2edet.assign.fg_loss import ForegroundLossAssigner
from e2edet.assign.o2f import O2FAssigner, soft_target_scale
from e2edet.assign.poto import POTOAssigner
from e2edet.losses.focal import (
    prob_focal_loss,
    sigmoid_focal_loss,
    soft_focal_loss_with_prob,
)
from e2edet.ops.boxes import centerness_target, encode_ltrb
from e2edet.utils.dist import reduce_mean

ASSIGNERS = ("fcos", "atss", "poto", "poto_argmax", "anchor", "center", "fg_loss", "o2f")
SCORES = ("cls", "cls_filter", "cls_ctr")
#: One-to-many assigners trained with the FCOS losses (centerness-weighted GIoU and centerness BCE when the model has
#: a centerness branch).
ONE_TO_MANY = ("fcos", "atss")
#: DeFCN's one-to-one baselines (§2.3): plain logit focal + ``reg_weight`` · GIoU, like POTO on ``score="cls"``.
ONE_TO_ONE_BASELINES = ("anchor", "center", "fg_loss")


class DenseCriterion(nn.Module):
    """Assignment + named losses for a dense (one point per location) detector. No parameters.

    - ``assigner="fcos"`` (§1.4) or ``"atss"`` (:class:`~e2edet.assign.atss.ATSSAssigner`, DeFCN's CrowdHuman
      ``atss.py``): ``loss_cls`` = logit sigmoid focal over all points and classes / ``max(1, N_pos_avg)``;
      ``loss_box`` = ``reg_weight`` · GIoU on positives weighted by the centerness target
      / ``max(1, avg Σ centerness targets)``; ``loss_ctr`` = BCE-with-logits of ``pred_ctr`` on positives against the
      centerness target / ``max(1, N_pos_avg)``. With ``centerness=False`` (FCOS ``wo_ctrness``): no ``loss_ctr``
      and ``loss_box`` = ``reg_weight`` · GIoU / ``max(1, N_pos_avg)``, unweighted.
    - ``assigner="anchor"`` / ``"center"`` / ``"fg_loss"`` (§2.3 one-to-one baselines:
      :class:`~e2edet.assign.anchor.AnchorAssigner` on ``outputs["anchors"]``,
      :class:`~e2edet.assign.center.CenterAssigner`, :class:`~e2edet.assign.fg_loss.ForegroundLossAssigner` with the
      loss's own focal parameters and ``reg_weight`` in its cost): the losses of POTO on ``score="cls"``.
    - ``assigner="poto"`` / ``"poto_argmax"`` (§2.4): POTO one-to-one assignment on
      ``sigmoid(cls)`` (``score="cls"``) or ``sigmoid(cls)·sigmoid(filter)`` (``score="cls_filter"``);
      ``loss_cls`` = logit focal (``cls``) or probability-space focal on the product (``cls_filter``)
      / ``max(1, N_pos_avg)``; ``loss_box`` = ``reg_weight`` · GIoU on positives / ``max(1, N_pos_avg)``, no
      centerness weighting.
    - ``assigner="o2f"`` (§3.4, needs ``score="cls_ctr"``): :class:`~e2edet.assign.o2f.O2FAssigner` on the joint
      probability ``q = sigmoid(cls)·sigmoid(ctr)`` with the epoch schedule ``t(e)``; ``loss_cls`` =
      :func:`~e2edet.losses.focal.soft_focal_loss_with_prob` (negatives ``0.75·q²·BCE(q, 0)``, foreground points
      ``w·BCE(q, s)``) / ``max(1, N_fg_avg)`` counting certain **and** soft points; ``loss_box`` = ``reg_weight`` ·
      GIoU on all foreground points weighted by the centerness target / ``max(1e-6, avg Σ centerness targets)``.
      No centerness loss: the centerness branch learns only through ``q``.
    - ``aux=True`` (§2.4 Aux): ``loss_cls_aux`` = ``aux_weight`` · logit focal on the raw cls logits with the
      :class:`~e2edet.assign.auxiliary.AuxAssigner` one-to-many labels / ``max(1, N_pos_aux_avg)``; no aux regression.

    ``N_pos_avg`` is the positive count all-reduced and divided by the world size
    (:func:`e2edet.utils.dist.reduce_mean`). GIoU is ``torchvision.ops.generalized_box_iou_loss`` between the
    decoded predicted boxes and the matched GT boxes (xyxy pixels), equivalent to the ltrb GIoU of cvpods. With no
    positive the box and centerness losses are exact zeros that stay connected to the graph.

    Args:
        num_classes: ``K``.
        assigner: one of :data:`ASSIGNERS`.
        score: ``"cls"``, ``"cls_filter"`` (needs ``outputs["pred_filter"]``) or ``"cls_ctr"`` (needs
            ``outputs["pred_ctr"]``; O2F's joint score); the product scores use the probability-space focal loss with
            POTO.
        aux: add the auxiliary one-to-many classification loss.
        focal_alpha, focal_gamma: focal-loss parameters (0.25, 2.0).
        reg_weight: weight of ``loss_box``; default 1.0 for FCOS, 2.0 otherwise (``REG_WEIGHT``: POTO, the one-to-one
            baselines, ATSS, O2F).
        poto_alpha: IoU weight of the POTO and Aux quality (0.8).
        center_radius: center-prior radius in strides for FCOS, POTO, Foreground loss and O2F (1.5; 0 = inside the
            box).
        aux_topk: Aux candidates per GT per level (9).
        aux_weight: weight of ``loss_cls_aux`` (1.0).
        keep_infeasible: the Hungarian assigners (POTO, Foreground loss) keep matches outside the prior, as the
            official code does (default False: dropped; see :class:`~e2edet.assign.poto.POTOAssigner`).
        o2f_topk, soft_weight, max_soft_weight, max_t, min_t: O2F constants (7, 0.4, 1.0, 0.6, 0.2; see
            :class:`~e2edet.assign.o2f.O2FAssigner`); o2f_neg_weight: scale of the O2F negative term (0.75).
        scale_ranges: FCOS per-level ``(lo, hi)`` ranges in pixels (FCOS and Center).
        atss_topk, atss_anchor_scale: ATSS candidates per level per GT (9) and anchor side in strides (8).
        centerness: the model has a centerness branch, which FCOS/ATSS train and weight the GIoU with (default True;
            the dense architecture passes ``model.centerness``).
    Raises:
        ValueError: for an unknown ``assigner``/``score``, a product score with FCOS/ATSS or a one-to-one baseline,
            or O2F without ``score="cls_ctr"``.
    """

    def __init__(
        self,
        num_classes: int,
        assigner: str = "fcos",
        score: str = "cls",
        aux: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        reg_weight: float | None = None,
        poto_alpha: float = 0.8,
        center_radius: float = 1.5,
        aux_topk: int = 9,
        aux_weight: float = 1.0,
        keep_infeasible: bool = False,
        o2f_topk: int = 7,
        soft_weight: float = 0.4,
        max_soft_weight: float = 1.0,
        max_t: float = 0.6,
        min_t: float = 0.2,
        o2f_neg_weight: float = 0.75,
        scale_ranges: tuple[tuple[float, float], ...] = DEFAULT_SCALE_RANGES,
        atss_topk: int = 9,
        atss_anchor_scale: float = 8.0,
        centerness: bool = True,
    ) -> None:
        super().__init__()
        if assigner not in ASSIGNERS:
            raise ValueError(f"assigner must be one of {ASSIGNERS}, got {assigner!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if assigner in ONE_TO_MANY + ONE_TO_ONE_BASELINES and score != "cls":
            raise ValueError(f"assigner {assigner!r} trains the cls logits (score='cls'); product scores need a "
                             "POTO/O2F assigner")
        if assigner == "o2f" and score != "cls_ctr":
            raise ValueError("the O2F assigner works on the joint score: use score='cls_ctr'")
        self.num_classes = int(num_classes)
        self.assigner_name = assigner
        self.score = score
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.reg_weight = float(reg_weight if reg_weight is not None else (1.0 if assigner == "fcos" else 2.0))
        self.aux_weight = float(aux_weight)
        self.o2f_neg_weight = float(o2f_neg_weight)
        self.centerness = bool(centerness)
        if assigner == "fcos":
            self.assigner = FCOSAssigner(center_radius=center_radius, scale_ranges=scale_ranges)
        elif assigner == "atss":
            self.assigner = ATSSAssigner(topk=atss_topk, anchor_scale=atss_anchor_scale)
        elif assigner == "anchor":
            self.assigner = AnchorAssigner()
        elif assigner == "center":
            self.assigner = CenterAssigner(scale_ranges=scale_ranges)
        elif assigner == "fg_loss":
            self.assigner = ForegroundLossAssigner(center_radius, focal_alpha, focal_gamma, self.reg_weight,
                                                   keep_infeasible)
        elif assigner == "o2f":
            self.assigner = O2FAssigner(poto_alpha, center_radius, o2f_topk, soft_weight, max_soft_weight, max_t, min_t)
        else:
            mode = "argmax" if assigner == "poto_argmax" else "hungarian"
            self.assigner = POTOAssigner(poto_alpha, center_radius, mode=mode, keep_infeasible=keep_infeasible)
        self.aux_assigner = AuxAssigner(alpha=poto_alpha, topk=aux_topk) if aux else None

    def assign(self, outputs: dict, targets: list[dict], score_prob: Tensor | None = None, epoch: int = 0,
               max_epoch: int = 1, centers: list[Tensor] | None = None) -> DenseAssignment:
        """Run the main assigner on detached predictions; see :meth:`forward` for the arguments.

        ``score_prob`` (``[B, R, K]``, the one-to-one score: ``sigmoid(cls)``, times ``sigmoid(filter)`` or
        ``sigmoid(ctr)``) is computed from ``outputs`` when not given; it is detached here. ``centers``: per image
        ``[G, 2]`` centers of the GTs' priors (mask centroids, O2F only; None = box centers).

        Raises:
            ValueError: ``centers`` with an assigner other than O2F.
        """
        if centers is not None and self.assigner_name != "o2f":
            raise ValueError(f"prior centers (mask centroids) are implemented for the O2F assigner, not "
                             f"{self.assigner_name!r}")
        name, k = self.assigner_name, self.num_classes
        if name == "fcos":
            return self.assigner(outputs["points"], outputs["strides"], outputs["levels"], targets, k)
        if name == "atss":
            return self.assigner(outputs["points"], outputs["strides"], list(outputs["num_points_per_level"]),
                                 targets, k)
        if name == "anchor":
            return self.assigner(outputs["anchors"], targets, k)
        if name == "center":
            return self.assigner(outputs["points"], outputs["levels"], list(outputs["num_points_per_level"]),
                                 targets, k)
        if name == "fg_loss":
            return self.assigner(outputs["pred_logits"].detach(), outputs["pred_boxes"].detach(), outputs["points"],
                                 outputs["strides"], targets, k)
        if score_prob is None:
            score_prob = self._score_prob(outputs["pred_logits"].float().sigmoid(), outputs)
        args = (score_prob.detach(), outputs["pred_boxes"].detach(), outputs["points"], outputs["strides"], targets,
                self.num_classes)
        if self.assigner_name == "o2f":
            return self.assigner(*args, epoch=epoch, max_epoch=max_epoch, centers=centers)
        return self.assigner(*args)

    def _score_prob(self, cls_prob: Tensor, outputs: dict) -> Tensor:
        """The one-to-one score ``[B, R, K]``: ``cls_prob``, times ``sigmoid(pred_filter)`` (``cls_filter``) or
        ``sigmoid(pred_ctr)`` (``cls_ctr``)."""
        if self.score == "cls_filter":
            return cls_prob * outputs["pred_filter"].float().sigmoid().unsqueeze(-1)
        if self.score == "cls_ctr":
            return cls_prob * outputs["pred_ctr"].float().sigmoid().unsqueeze(-1)
        return cls_prob

    def _focal(self, logits: Tensor, target: Tensor) -> Tensor:
        return sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma, reduction="sum")

    def _giou(self, outputs: dict, pos: Tensor, box_target: Tensor) -> Tensor:
        """GIoU loss ``[P]`` of the positive points' decoded boxes against their GT boxes (xyxy pixels)."""
        return generalized_box_iou_loss(outputs["pred_boxes"][pos].float(), box_target, reduction="none")

    def forward(self, outputs: dict, targets: list[dict], epoch: int = 0, max_epoch: int = 1) -> dict[str, Tensor]:
        """Compute the losses of one batch (:meth:`losses_and_assignment` without the assignment)."""
        return self.losses_and_assignment(outputs, targets, epoch, max_epoch)[0]

    def losses_and_assignment(self, outputs: dict, targets: list[dict], epoch: int = 0, max_epoch: int = 1,
                              centers: list[Tensor] | None = None) -> tuple[dict[str, Tensor], DenseAssignment]:
        """Compute the losses of one batch, and return the main assignment they used.

        Args:
            outputs: model output dict (``docs/architecture.md``): ``pred_logits [B, R, K]``, ``pred_boxes
                [B, R, 4]`` (decoded xyxy pixels), ``points [R, 2]``, ``strides [R]``, ``levels [R]``,
                ``num_points_per_level`` (list[int], for ``aux``, ATSS and Center), ``pred_ctr [B, R]`` (FCOS/ATSS
                with ``centerness``, O2F), ``pred_filter [B, R]`` (``score="cls_filter"``) and ``anchors [R, 4]``
                (``assigner="anchor"``: the model's ``box_coder="anchor_deltas"``).
            targets: B dicts with ``boxes float32 [G, 4]`` xyxy pixels and ``labels int64 [G]`` (``G = 0`` allowed).
            epoch, max_epoch: 0-based epoch and number of epochs of the run (the trainer passes them every step,
                also for iteration-based schedules), for O2F's ``t(e)``; unused by FCOS/POTO/Aux.
            centers: optional per image ``[G, 2]`` prior centers (O2F; see :meth:`assign`).
        Returns:
            ``(losses, assignment)``. ``losses``: ``loss_cls``, ``loss_box`` (+ ``loss_ctr`` for FCOS/ATSS with
            ``centerness``, ``loss_cls_aux`` with ``aux``): weighted float32 scalars to sum; ``num_pos``, ``num_gt``,
            ``num_fg_per_gt`` (+ ``num_pos_aux``; + ``num_soft`` and ``soft_t`` for O2F): detached float32
            statistics of this process's batch. ``assignment``: the :class:`DenseAssignment` of the main assigner.
        Raises:
            KeyError: if a required output key is missing; ValueError: if ``pred_logits`` has not ``K`` classes.
        """
        logits = outputs["pred_logits"]
        pred_boxes = outputs["pred_boxes"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {logits.shape[-1]} classes, criterion expects {self.num_classes}")
        cls_prob = logits.float().sigmoid()  # shared by the loss, POTO and the aux assigner
        score_prob = self._score_prob(cls_prob, outputs)
        assignment = self.assign(outputs, targets, score_prob, epoch, max_epoch, centers)
        pos = assignment.pos_mask
        num_pos = pos.sum()
        normaliser = reduce_mean(num_pos).clamp(min=1.0)
        cls_target = assignment.one_hot(self.num_classes)

        if self.assigner_name == "o2f":
            loss_cls = soft_focal_loss_with_prob(score_prob, assignment.labels, assignment.soft_targets,
                                                 assignment.weights, neg_weight=self.o2f_neg_weight)
        elif self.score != "cls":
            loss_cls = prob_focal_loss(score_prob, cls_target, self.focal_alpha, self.focal_gamma, reduction="sum")
        else:
            loss_cls = self._focal(logits, cls_target)
        losses = {"loss_cls": loss_cls / normaliser}

        box_target = assignment.box_targets[pos]
        giou = self._giou(outputs, pos, box_target)
        one_to_many = self.assigner_name in ONE_TO_MANY
        if self.assigner_name == "o2f" or (one_to_many and self.centerness):
            points = outputs["points"].float().unsqueeze(0).expand(pos.shape[0], -1, -1)[pos]
            ctr_target = centerness_target(encode_ltrb(points, box_target))
            # cvpods FCOS/ATSS clamp the normaliser at 1, mmdet-based O2F at 1e-6 (o2f_head.py ``centerness_denorm``)
            floor = 1e-6 if self.assigner_name == "o2f" else 1.0
            ctr_normaliser = reduce_mean(ctr_target.sum()).clamp(min=floor)
            losses["loss_box"] = self.reg_weight * (giou * ctr_target).sum() / ctr_normaliser
            if one_to_many:
                pred_ctr = outputs["pred_ctr"][pos].float()
                losses["loss_ctr"] = (F.binary_cross_entropy_with_logits(pred_ctr, ctr_target, reduction="sum")
                                      / normaliser)
        else:  # POTO, the one-to-one baselines, FCOS without centerness (wo_ctrness/fcos.py)
            losses["loss_box"] = self.reg_weight * giou.sum() / normaliser

        num_gt = sum(int(t["boxes"].shape[0]) for t in targets)
        stats = {
            "num_pos": num_pos.detach().float(),
            "num_gt": torch.tensor(float(num_gt), device=logits.device),
            "num_fg_per_gt": num_pos.detach().float() / max(num_gt, 1),
        }
        if self.assigner_name == "o2f":
            # certain positives have (s, w) = (1, max_soft_weight); testing the weight alone would count no soft
            # anchor when soft_weight == max_soft_weight
            certain = (assignment.soft_targets == 1.0) & (assignment.weights == self.assigner.max_soft_weight)
            stats["num_soft"] = (pos & ~certain).sum().float()
            stats["soft_t"] = torch.tensor(soft_target_scale(epoch, max_epoch, self.assigner.max_t,
                                                             self.assigner.min_t), device=logits.device)
        if self.aux_assigner is not None:
            aux = self.aux_assigner(
                cls_prob.detach(),
                pred_boxes.detach(),
                outputs["points"],
                list(outputs["num_points_per_level"]),
                targets,
                self.num_classes,
            )
            aux_normaliser = reduce_mean(aux.num_pos).clamp(min=1.0)
            loss_aux = self._focal(logits, aux.one_hot(self.num_classes))
            losses["loss_cls_aux"] = self.aux_weight * loss_aux / aux_normaliser
            stats["num_pos_aux"] = aux.num_pos.detach().float()
        return {**losses, **stats}, assignment
