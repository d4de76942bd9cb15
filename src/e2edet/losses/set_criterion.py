"""Set-prediction criterion of the query-based detectors: named prediction sets, each Hungarian-matched, then
focal + L1 + GIoU.

Source: ``specs/query.md`` §1.3, §1.4, §2.4 and ``specs/detr.md`` §1.3, §1.4, §3.3, §3.4 and "Design notes for one
codebase" (one set criterion shared with the DETR family); MMDetection 2.x
``mmdet/models/roi_heads/sparse_roi_head.py`` ``SparseRoIHead.forward_train`` and
``mmdet/models/roi_heads/bbox_heads/dii_head.py`` ``DIIHead.loss``; DETR ``models/detr.py`` ``SetCriterion`` and
Deformable DETR ``models/deformable_detr.py`` ``SetCriterion`` (``loss_labels``, ``loss_boxes``, the two-stage
``enc_outputs`` with labels zeroed).
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from e2edet.assign.set_matcher import BOX_FORMATS, BOX_SPACES, HungarianMatcher, MatchRequest, match_sets
from e2edet.losses.focal import sigmoid_focal_loss
from e2edet.ops.boxes import image_whwh
from e2edet.utils.dist import reduce_mean

__all__ = ["LABEL_MODES", "NORMALIZERS", "PredictionSet", "SetCriterion"]

#: ``"per_class"``: GT labels as they are, ``pred_logits`` with the criterion's ``K`` classes. ``"class_agnostic"``:
#: every GT label becomes 0 (Deformable DETR two-stage encoder proposals, ``bin_targets[...]["labels"] = 0``).
LABEL_MODES = ("per_class", "class_agnostic")
#: Loss normaliser of a set: ``"matched"`` = number of matched (prediction, GT) pairs of that set (mmdet
#: ``num_pos``; for a one-to-many set the number of pairs), ``"num_gt"`` = number of GTs of the batch (DETR
#: ``num_boxes``, also MS-DETR's one-to-many normaliser, ``specs/detr.md`` §3.4). Both all-reduced, clamped >= 1.
NORMALIZERS = ("matched", "num_gt")


@dataclass(frozen=True)
class PredictionSet:
    """One named prediction set of :class:`SetCriterion` and how to match and weigh it.

    Attributes:
        name: prefix of the set's loss keys (``{name}_loss_cls`` ...). With the field ``{i}`` (e.g. ``"stage{i}"``),
            ``outputs[source]`` must be a list of dicts and gives one set per entry (``stage0``, ``stage1``, ...);
            without it, ``outputs[source]`` must be one dict.
        source: key of the model outputs holding the set (``"stages"``, ``"enc_outputs"``), or ``None`` for the
            top-level ``outputs`` dict itself (the final layer).
        logits_key, boxes_key: keys of ``pred_logits`` ``[B, N, K]`` and ``pred_boxes`` ``[B, N, 4]`` in each dict
            (``"pred_logits_o2m"`` / ``"pred_boxes_o2m"`` for a one-to-many set on the same queries).
        match_boxes_key: key of the boxes given to the matcher instead of ``boxes_key`` (same format), e.g. the
            encoder anchors MS-DETR matches on (``specs/detr.md`` §3.3); ``None``: ``boxes_key``.
        matcher: :class:`~e2edet.assign.set_matcher.HungarianMatcher` holding the **matching-cost** weights
            (``cost_class``, ``cost_l1``, ``cost_giou``), or any matcher accepted by
            :class:`~e2edet.assign.set_matcher.MatchRequest` (a top-k one-to-many assigner returning the same
            ``[(pred_idx, gt_idx)]`` per image, duplicates allowed). ``None``: a ``HungarianMatcher`` with costs
            2 / 5 / 2, this set's ``box_space`` and focal parameters.
        label_mode: one of :data:`LABEL_MODES`. A class-agnostic set accepts ``pred_logits`` with 1 class or with
            the criterion's ``K`` (Deformable DETR's encoder head: target at column 0, the other columns negatives).
        box_format: format of the predicted boxes, one of :data:`~e2edet.assign.set_matcher.BOX_FORMATS`:
            ``"xyxy"`` pixels of the network input (Sparse R-CNN, AdaMixer) or ``"cxcywh_norm"`` in [0, 1] (DETR).
        box_space: space of the L1 term, one of :data:`~e2edet.assign.set_matcher.BOX_SPACES`: normalised
            ``"xyxy_norm"`` (mmdet ``DIIHead``) or ``"cxcywh_norm"`` (Deformable DETR ``loss_boxes``). The L1
            matching cost uses the matcher's own ``box_space`` (the default matcher takes this one).
        cls_weight, l1_weight, giou_weight: **loss** weights (2, 5, 2).
        focal_alpha, focal_gamma: focal-loss parameters (0.25, 2).
        normalizer: one of :data:`NORMALIZERS`.
    Raises:
        ValueError: an unknown mode / format / space / normaliser, a name with a field other than ``{i}``, an
            empty key, a negative or non-finite weight, or a matcher that is not callable.
    """

    name: str
    source: str | None = "stages"
    logits_key: str = "pred_logits"
    boxes_key: str = "pred_boxes"
    match_boxes_key: str | None = None
    matcher: Any = None
    label_mode: str = "per_class"
    box_format: str = "xyxy"
    box_space: str = "xyxy_norm"
    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    normalizer: str = "matched"

    def __post_init__(self) -> None:
        for field, value, allowed in (("label_mode", self.label_mode, LABEL_MODES),
                                      ("box_format", self.box_format, BOX_FORMATS),
                                      ("box_space", self.box_space, BOX_SPACES),
                                      ("normalizer", self.normalizer, NORMALIZERS)):
            if value not in allowed:
                raise ValueError(f"set {self.name!r}: {field} must be one of {allowed}, got {value!r}")
        fields = {f for _, f, _, _ in string.Formatter().parse(self.name) if f is not None}
        if not self.name or fields - {"i"}:
            raise ValueError(f"set name must be non-empty with no field other than {{i}}, got {self.name!r}")
        if not self.logits_key or not self.boxes_key or self.source == "" or self.match_boxes_key == "":
            raise ValueError(f"set {self.name!r}: empty source or key")
        for field in ("cls_weight", "l1_weight", "giou_weight", "focal_gamma"):
            value = float(getattr(self, field))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"set {self.name!r}: {field} must be finite and >= 0, got {value}")
            object.__setattr__(self, field, value)
        object.__setattr__(self, "focal_alpha", float(self.focal_alpha))
        if self.matcher is None:
            object.__setattr__(self, "matcher", HungarianMatcher(focal_alpha=self.focal_alpha,
                                                                 focal_gamma=self.focal_gamma,
                                                                 box_space=self.box_space))
        if not callable(self.matcher) and not hasattr(self.matcher, "cost_matrices"):
            raise ValueError(f"set {self.name!r}: matcher must be callable or have cost_matrices")

    @property
    def per_entry(self) -> bool:
        """``True`` when ``name`` holds ``{i}``: one set per entry of the list ``outputs[source]``."""
        return "{i}" in self.name


@dataclass(frozen=True)
class _Entry:
    """One concrete set of one forward pass (a :class:`PredictionSet`, for a list source one of its entries)."""

    name: str
    spec: PredictionSet
    logits: Tensor
    boxes: Tensor
    match_boxes: Tensor


class SetCriterion(nn.Module):
    """Hungarian matching + named losses for every prediction set of a query-based detector. No parameters.

    Each set is a :class:`PredictionSet`; the default (the constructor's arguments, or :meth:`for_stages`) is one
    set per decoder stage, ``outputs["stages"][s]`` named ``stage{s}`` (Sparse R-CNN / AdaMixer, each stage
    weighs 1). Per set:

    - match the **detached** predictions with the set's matcher, all sets' Hungarian problems in **one**
      :func:`~e2edet.assign.set_matcher.match_sets` call (one device-to-host copy per training step); the GT
      labels are checked once per step against ``K``; a class-agnostic set sees every label as 0;
    - ``{name}_loss_cls`` = ``cls_weight`` · sigmoid focal loss (:func:`e2edet.losses.focal.sigmoid_focal_loss`,
      torchvision's) summed over all ``N`` queries x ``K`` classes, one-hot targets for matched queries, all-zero
      rows for the unmatched ones (background). DETR-family ``loss_labels`` (``sigmoid_focal_loss(...) · Q`` after
      a mean over queries) is the same sum. When a matcher returns a query more than once (one-to-many), the
      **last** pair of that query sets its class target (MS-DETR sorts its pairs by ascending score);
    - ``{name}_loss_bbox`` = ``l1_weight`` · L1 between matched predicted and GT boxes, summed over the 4
      coordinates, in the set's ``box_space``: both divided by ``(W, H, W, H)`` of ``targets[b]["size"]``
      (unpadded) as xyxy (mmdet ``DIIHead.loss``), or as normalised cxcywh (Deformable DETR ``loss_boxes``);
    - ``{name}_loss_iou`` = ``giou_weight`` · ``torchvision.ops.generalized_box_iou_loss`` on matched xyxy boxes
      (pixels for ``"xyxy"`` predictions, normalised for ``"cxcywh_norm"`` ones; GIoU is invariant to per-axis
      scaling);
    - ``{name}_pos_acc`` (statistic, detached): percent of matched pairs whose argmax class is the GT class (mmdet
      ``accuracy``; 0 when nothing is matched).

    The three losses of a set are divided by its own ``avg_factor = max(reduce_mean(n), 1)`` with ``n`` its
    ``normalizer`` (:data:`NORMALIZERS`); all sets' factors go through one all-reduce. For Hungarian matching
    ``n = Σ_b min(N, G_b)`` (mmdet ``num_pos``; = the number of GTs of the batch whenever ``N >= G_b``); the clamp
    avoids the inf/NaN of mmdet 2.12 on GT-free batches (``specs/query.md`` §1.9). Losses are computed in float32
    with autocast off. With no matched GT the box losses are exact zeros that stay connected to the graph.

    SQR (``models/query/recollection.py``, spec ``detr.md`` §2.4): when ``outputs`` holds ``"recollected"`` (every
    recollected set's output dict, in order) and ``"recollected_stages"`` (the stage of each), a per-entry set over
    ``"stages"`` reads those instead: every recollected set is matched and normalised on its own, and the losses of
    the sets of stage ``s`` are **summed** into ``stage{s}_loss_*`` (``pos_acc`` averaged), as the loop version
    ``AdaMixerDecoder_Qrecycle`` accumulates them; no per-set weight (the official code has none).

    Args:
        num_classes: ``K``.
        matcher: the stages' matcher, a callable ``(pred_logits, pred_boxes, targets) -> [(pred_idx, gt_idx)]`` per
            image, with the matching-cost weights (default :class:`~e2edet.assign.set_matcher.HungarianMatcher`
            with costs 2 / 5 / 2 on normalised xyxy and this criterion's focal parameters).
        cls_weight, l1_weight, giou_weight: the stages' loss weights (2.0, 5.0, 2.0).
        focal_alpha, focal_gamma: focal parameters (0.25, 2.0).
        sets: keyword only: the prediction sets, instead of the stage set the other arguments describe (which
            must then keep their defaults).
    Raises:
        ValueError: ``sets`` together with other arguments, an empty ``sets``, or two sets with one name.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        cls_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        *,
        sets: Sequence[PredictionSet] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        if sets is None:
            if matcher is None:
                matcher = HungarianMatcher(focal_alpha=focal_alpha, focal_gamma=focal_gamma)
            sets = [PredictionSet("stage{i}", "stages", matcher=matcher, cls_weight=cls_weight, l1_weight=l1_weight,
                                  giou_weight=giou_weight, focal_alpha=focal_alpha, focal_gamma=focal_gamma)]
        elif matcher is not None or (cls_weight, l1_weight, giou_weight, focal_alpha, focal_gamma) != (
                2.0, 5.0, 2.0, 0.25, 2.0):
            raise ValueError("pass either sets= or the single-set arguments (matcher, weights), not both")
        self.sets = tuple(sets)
        if not self.sets:
            raise ValueError("sets must hold at least one PredictionSet")
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"set names must be distinct, got {names}")
        # the first set's settings, as attributes (the single-set criterion of Sparse R-CNN / AdaMixer)
        first = self.sets[0]
        self.matcher = first.matcher
        self.cls_weight, self.l1_weight, self.giou_weight = first.cls_weight, first.l1_weight, first.giou_weight
        self.focal_alpha, self.focal_gamma = first.focal_alpha, first.focal_gamma

    @classmethod
    def for_stages(
        cls,
        num_classes: int,
        *,
        cls_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        cost_class: float | None = None,
        cost_l1: float | None = None,
        cost_giou: float | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_format: str = "xyxy",
        box_space: str = "xyxy_norm",
    ) -> SetCriterion:
        """One per-class set per decoder stage (``outputs["stages"]``, keys ``stage{s}_*``) with loss weights and
        separate matching-cost weights; the builder the config layer calls with ``loss.cost_class/cost_l1/
        cost_giou``.

        Args:
            num_classes: ``K``.
            cls_weight, l1_weight, giou_weight: loss weights.
            cost_class, cost_l1, cost_giou: matching-cost weights of the
                :class:`~e2edet.assign.set_matcher.HungarianMatcher`; ``None``: the loss weight of the same term
                (Sparse R-CNN / AdaMixer use equal costs and weights, 2 / 5 / 2).
            focal_alpha, focal_gamma: focal parameters of the loss and of the cost.
            box_format, box_space: as in :class:`PredictionSet`.
        Raises:
            ValueError: as :class:`PredictionSet` and :class:`~e2edet.assign.set_matcher.HungarianMatcher`.
        """
        matcher = HungarianMatcher(
            cost_class=cls_weight if cost_class is None else cost_class,
            cost_l1=l1_weight if cost_l1 is None else cost_l1,
            cost_giou=giou_weight if cost_giou is None else cost_giou,
            focal_alpha=focal_alpha, focal_gamma=focal_gamma, box_space=box_space,
        )
        stage_set = PredictionSet("stage{i}", "stages", matcher=matcher, box_format=box_format, box_space=box_space,
                                  cls_weight=cls_weight, l1_weight=l1_weight, giou_weight=giou_weight,
                                  focal_alpha=focal_alpha, focal_gamma=focal_gamma)
        return cls(num_classes, sets=[stage_set])

    def forward(self, outputs: dict, targets: list[dict], epoch: int = 0, max_epoch: int = 1) -> dict[str, Tensor]:
        """Compute the losses of one batch.

        Args:
            outputs: model output dict (``docs/architecture.md``) holding every set's source, e.g. ``"stages"``, a
                list of per-stage dicts with ``pred_logits`` ``[B, N, K]`` sigmoid logits and ``pred_boxes``
                ``[B, N, 4]`` in the set's ``box_format`` (xyxy pixels of the network input by default).
            targets: B dicts with ``boxes`` float32 ``[G_b, 4]`` xyxy pixels, ``labels`` int64 ``[G_b]`` and
                ``size`` ``(h, w)`` of the unpadded network input (``G_b = 0`` allowed).
            epoch, max_epoch: unused (interface shared with schedule-driven criteria).
        Returns:
            ``{name}_loss_cls``, ``{name}_loss_bbox``, ``{name}_loss_iou`` (weighted float32 scalars to sum) and
            ``{name}_pos_acc`` for every set (``stage{s}_*`` for the stage sets), plus ``num_gt`` (detached float32,
            this process's batch).
        Raises:
            ValueError: a missing or malformed set source (no ``"stages"`` list, a missing key, not ``[B, N, K]``
                / ``[B, N, 4]``), ``pred_logits`` without ``K`` classes (1 or ``K`` for a class-agnostic set), a
                target count other than B, or malformed targets (see
                :meth:`~e2edet.assign.set_matcher.HungarianMatcher.cost_matrices`).
        """
        del epoch, max_epoch
        entries = self._entries(outputs)
        first = entries[0].logits
        device, batch = first.device, first.shape[0]
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        counts = [int(t["boxes"].shape[0]) for t in targets]
        gt_boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(device=device, dtype=torch.float32)
        gt_labels = torch.cat([t["labels"].reshape(-1) for t in targets]).to(device=device, dtype=torch.int64)
        whwh = image_whwh(targets, device)
        offsets = [sum(counts[:b]) for b in range(len(counts))]
        agnostic_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]

        requests, checked = [], False
        for e in entries:
            per_class = e.spec.label_mode == "per_class"
            check = per_class and not checked  # labels checked once per step (one device sync)
            checked = checked or check
            requests.append(MatchRequest(e.spec.matcher, e.logits, e.match_boxes,
                                         targets if per_class else agnostic_targets, e.spec.box_format, check))
        all_matches = match_sets(requests)  # all sets, one host round trip

        num_gt = float(sum(counts))
        sizes = [float(sum(int(p.numel()) for p, _ in m)) if e.spec.normalizer == "matched" else num_gt
                 for e, m in zip(entries, all_matches)]
        avg_factors = reduce_mean(torch.tensor(sizes), device=device).clamp(min=1.0)  # one all-reduce

        result: dict[str, Tensor] = {}
        for j, (e, matches) in enumerate(zip(entries, all_matches)):
            batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)])
            query_idx = torch.cat([p for p, _ in matches])
            gt_idx = torch.cat([g + offsets[b] for b, (_, g) in enumerate(matches)])
            labels = gt_labels[gt_idx] if e.spec.label_mode == "per_class" else torch.zeros_like(gt_idx)
            with torch.autocast(device_type=device.type, enabled=False):
                losses = self._set_losses(e.spec, e.logits, e.boxes, batch_idx, query_idx, gt_boxes[gt_idx], labels,
                                          whwh[batch_idx], avg_factors[j])
            for k, v in losses.items():  # recollected sets of one stage: losses summed, pos_acc averaged
                key = f"{e.name}_{k}"
                result[key] = result[key] + v if key in result else v
        repeats = Counter(e.name for e in entries)
        for name, count in repeats.items():
            if count > 1:
                result[f"{name}_pos_acc"] = result[f"{name}_pos_acc"] / count
        result["num_gt"] = torch.tensor(num_gt, device=device)
        return result

    def _entries(self, outputs: dict) -> list[_Entry]:
        """The concrete sets of ``outputs``, validated (see :meth:`forward` for the errors)."""
        entries: list[_Entry] = []
        for spec in self.sets:
            where = "outputs" if spec.source is None else f"outputs[{spec.source!r}]"
            if spec.source is not None and spec.source not in outputs:
                kind = "a non-empty list of dicts" if spec.per_entry else "a dict"
                raise ValueError(f"set {spec.name!r}: outputs has no {spec.source!r} entry ({kind})")
            value = outputs if spec.source is None else outputs[spec.source]
            recollected = spec.per_entry and spec.source == "stages" and "recollected" in outputs
            if recollected:
                value, where = outputs["recollected"], "outputs['recollected']"
                stage_of = list(outputs.get("recollected_stages", ()))
                if not isinstance(value, (list, tuple)) or not value or len(stage_of) != len(value):
                    raise ValueError(f"set {spec.name!r}: outputs['recollected'] must be a non-empty list of dicts "
                                     f"with one stage per entry in outputs['recollected_stages']")
            if spec.per_entry:
                if not isinstance(value, (list, tuple)) or not value:
                    raise ValueError(f"set {spec.name!r}: {where} must be a non-empty list of dicts")
                items = [(spec.name.format(i=stage_of[i] if recollected else i), f"{where}[{i}]", d)
                         for i, d in enumerate(value)]
            else:
                items = [(spec.name, where, value)]
            for name, path, d in items:
                entries.append(self._entry(spec, name, path, d))
        names = [e.name for e in entries]
        owners: dict[str, set] = {}
        for e in entries:
            owners.setdefault(e.name, set()).add(id(e.spec))
        repeated = [n for n in owners if names.count(n) > 1 and (len(owners[n]) > 1 or "recollected" not in outputs)]
        if repeated:  # only the recollected sets of one stage share a name (their losses are summed)
            raise ValueError(f"the prediction sets give repeated names: {names}")
        batch = entries[0].logits.shape[0]
        for e in entries:
            if e.logits.shape[0] != batch:
                raise ValueError(f"set {e.name!r} has batch {e.logits.shape[0]}, set {entries[0].name!r} {batch}")
        return entries

    def _entry(self, spec: PredictionSet, name: str, path: str, d: Any) -> _Entry:
        if not isinstance(d, dict):
            raise ValueError(f"set {name!r}: {path} must be a dict, got {type(d).__name__}")
        keys = [spec.logits_key, spec.boxes_key] + ([spec.match_boxes_key] if spec.match_boxes_key else [])
        for key in keys:
            if key not in d:
                raise ValueError(f"set {name!r}: {path} has no {key!r}")
        logits, boxes = d[spec.logits_key], d[spec.boxes_key]
        match_boxes = d[spec.match_boxes_key] if spec.match_boxes_key else boxes
        if logits.dim() != 3:
            raise ValueError(f"set {name!r}: {spec.logits_key} must be [B, N, K], got {tuple(logits.shape)}")
        for key, b in ((spec.boxes_key, boxes), (spec.match_boxes_key, match_boxes)):
            if b.shape != (*logits.shape[:2], 4):
                raise ValueError(f"set {name!r}: {key} must be [B, N, 4] = {(*logits.shape[:2], 4)}, got "
                                 f"{tuple(b.shape)}")
        num = logits.shape[-1]
        if spec.label_mode == "per_class" and num != self.num_classes:
            raise ValueError(f"set {name!r}: {spec.logits_key} has {num} classes, criterion expects "
                             f"{self.num_classes}")
        if spec.label_mode == "class_agnostic" and num not in (1, self.num_classes):
            raise ValueError(f"set {name!r} (class_agnostic): {spec.logits_key} has {num} classes, expected 1 or "
                             f"{self.num_classes}")
        return _Entry(name, spec, logits, boxes, match_boxes)

    @staticmethod
    def _set_losses(
        spec: PredictionSet,
        logits: Tensor,
        boxes: Tensor,
        batch_idx: Tensor,
        query_idx: Tensor,
        tgt_boxes: Tensor,
        tgt_labels: Tensor,
        tgt_whwh: Tensor,
        avg_factor: Tensor,
    ) -> dict[str, Tensor]:
        """Losses of one set from the matched ``(batch_idx, query_idx)`` pairs and their GT boxes (xyxy pixels) /
        labels / image ``(W, H, W, H)`` (all ``[M]`` / ``[M, 4]``)."""
        logits = logits.float()
        batch, num_queries = logits.shape[:2]
        # one-hot class targets; a query listed twice keeps its last pair's class (no device sync)
        order = torch.arange(query_idx.numel(), device=logits.device)
        flat = batch_idx * num_queries + query_idx
        last = torch.full((batch * num_queries,), -1, dtype=torch.int64, device=logits.device)
        last = last.scatter_reduce(0, flat, order, reduce="amax")
        cls_target = torch.zeros_like(logits)
        cls_target.index_put_((batch_idx, query_idx, tgt_labels), (last[flat] == order).float(), accumulate=True)
        loss_cls = sigmoid_focal_loss(logits, cls_target, spec.focal_alpha, spec.focal_gamma, reduction="sum")

        matched = boxes.float()[batch_idx, query_idx]  # [M, 4]; empty (still in the graph) when M = 0
        tgt_norm = tgt_boxes / tgt_whwh  # normalised xyxy
        if spec.box_format == "xyxy":  # pixels
            pred_norm, giou_pred, giou_tgt = matched / tgt_whwh, matched, tgt_boxes
            if spec.box_space == "cxcywh_norm":
                pred_norm = box_convert(pred_norm, "xyxy", "cxcywh")
        else:  # normalised cxcywh
            giou_pred, giou_tgt = box_convert(matched, "cxcywh", "xyxy"), tgt_norm
            pred_norm = matched if spec.box_space == "cxcywh_norm" else giou_pred
        if spec.box_space == "cxcywh_norm":
            tgt_norm = box_convert(tgt_norm, "xyxy", "cxcywh")
        loss_bbox = F.l1_loss(pred_norm, tgt_norm, reduction="sum")
        loss_iou = generalized_box_iou_loss(giou_pred, giou_tgt, reduction="sum")
        if query_idx.numel():
            hits = logits.detach()[batch_idx, query_idx].argmax(-1) == tgt_labels
            pos_acc = hits.float().mean() * 100.0
        else:
            pos_acc = logits.new_zeros(())
        return {
            "loss_cls": spec.cls_weight * loss_cls / avg_factor,
            "loss_bbox": spec.l1_weight * loss_bbox / avg_factor,
            "loss_iou": spec.giou_weight * loss_iou / avg_factor,
            "pos_acc": pos_acc,
        }
