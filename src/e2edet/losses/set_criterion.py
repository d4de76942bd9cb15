"""Set-prediction criterion of Sparse R-CNN and AdaMixer: per stage Hungarian matching, then focal + L1 + GIoU.

Source: ``specs/query.md`` §1.4, §2.4 and "Design notes for one codebase" (set criterion shared with DETR);
MMDetection 2.x ``mmdet/models/roi_heads/sparse_roi_head.py`` ``SparseRoIHead.forward_train`` and
``mmdet/models/roi_heads/bbox_heads/dii_head.py`` ``DIIHead.loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from e2edet.assign.set_matcher import HungarianMatcher
from e2edet.ops.boxes import image_whwh
from e2edet.losses.focal import sigmoid_focal_loss
from e2edet.utils.dist import reduce_mean

__all__ = ["SetCriterion"]


class SetCriterion(nn.Module):
    """Hungarian matching + named losses for every stage of a query-based detector. No parameters.

    Per stage ``s`` (``outputs["stages"][s]``, stage 0 first; each stage weighs 1):

    - match the **detached** predictions with ``matcher`` (default :class:`~e2edet.assign.set_matcher.
      HungarianMatcher` with costs 2 / 5 / 2 on normalised xyxy and this criterion's focal parameters; its
      ``match_stages`` solves all stages with one device-to-host copy per training step);
    - ``stage{s}_loss_cls`` = ``cls_weight`` · sigmoid focal loss (:func:`e2edet.losses.focal.sigmoid_focal_loss`)
      summed over all ``N`` queries x ``K`` classes, one-hot targets for matched queries, all-zero rows for the
      unmatched ones (background);
    - ``stage{s}_loss_bbox`` = ``l1_weight`` · L1 between matched predicted and GT boxes, both divided by
      ``(W, H, W, H)`` of ``targets[b]["size"]`` (unpadded), summed over the 4 coordinates;
    - ``stage{s}_loss_iou`` = ``giou_weight`` · ``torchvision.ops.generalized_box_iou_loss`` on matched pixel xyxy;
    - ``stage{s}_pos_acc`` (statistic, detached): percent of matched queries whose argmax class is the GT class
      (mmdet ``accuracy``; 0 when nothing is matched).

    All three losses are divided by one ``avg_factor = max(reduce_mean(#matched GTs), 1)`` computed once per forward
    and shared by the stages. ``#matched GTs = Σ_b min(N, G_b)``, mmdet's ``num_pos`` (= the number of GTs of the
    batch whenever ``N >= G_b``, always the case with 100/300 queries); the clamp avoids the inf/NaN of mmdet 2.12
    on GT-free batches (§1.9). Losses are computed in float32 with autocast off. With no matched GT the box losses
    are exact zeros that stay connected to the graph.

    Args:
        num_classes: ``K``.
        matcher: a callable ``(pred_logits, pred_boxes, targets) -> [(pred_idx, gt_idx)]`` per image.
        cls_weight, l1_weight, giou_weight: loss weights (2.0, 5.0, 2.0).
        focal_alpha, focal_gamma: focal parameters (0.25, 2.0).
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
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.matcher = matcher if matcher is not None else HungarianMatcher(
            focal_alpha=focal_alpha, focal_gamma=focal_gamma
        )
        self.cls_weight = float(cls_weight)
        self.l1_weight = float(l1_weight)
        self.giou_weight = float(giou_weight)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def forward(self, outputs: dict, targets: list[dict], epoch: int = 0, max_epoch: int = 1) -> dict[str, Tensor]:
        """Compute the losses of one batch.

        Args:
            outputs: model output dict (``docs/architecture.md``): ``"stages"``, a list of per-stage dicts with
                ``pred_logits`` ``[B, N, K]`` sigmoid logits and ``pred_boxes`` ``[B, N, 4]`` xyxy pixels of the
                network input.
            targets: B dicts with ``boxes`` float32 ``[G_b, 4]`` xyxy pixels, ``labels`` int64 ``[G_b]`` and
                ``size`` ``(h, w)`` of the unpadded network input (``G_b = 0`` allowed).
            epoch, max_epoch: unused (interface shared with schedule-driven criteria).
        Returns:
            ``stage{s}_loss_cls``, ``stage{s}_loss_bbox``, ``stage{s}_loss_iou`` (weighted float32 scalars to sum) and
            ``stage{s}_pos_acc`` for every stage, plus ``num_gt`` (detached float32, this process's batch).
        Raises:
            ValueError: no ``"stages"`` list, ``pred_logits`` without ``K`` classes, a target count other than B, or
                malformed targets (see
                :meth:`~e2edet.assign.set_matcher.HungarianMatcher.cost_matrices`).
        """
        del epoch, max_epoch
        stages = outputs.get("stages")
        if not stages:
            raise ValueError("outputs must hold a non-empty 'stages' list of per-stage dicts")
        first = stages[0]["pred_logits"]
        device, num_queries = first.device, first.shape[1]
        if len(targets) != first.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {first.shape[0]} images")
        counts = [int(t["boxes"].shape[0]) for t in targets]
        gt_boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(device=device, dtype=torch.float32)
        gt_labels = torch.cat([t["labels"].reshape(-1) for t in targets]).to(device=device, dtype=torch.int64)
        whwh = image_whwh(targets, device)
        offsets = [sum(counts[:b]) for b in range(len(counts))]
        num_matched = sum(min(num_queries, g) for g in counts)
        avg_factor = reduce_mean(float(num_matched), device=device).clamp(min=1.0)

        for s, stage in enumerate(stages):
            if stage["pred_logits"].shape[-1] != self.num_classes:
                raise ValueError(f"stage {s}: pred_logits has {stage['pred_logits'].shape[-1]} classes, criterion "
                                 f"expects {self.num_classes}")
        if hasattr(self.matcher, "match_stages"):  # all stages solved with one host round trip per step
            all_matches = self.matcher.match_stages(stages, targets)
        else:
            all_matches = [self.matcher(s["pred_logits"].detach(), s["pred_boxes"].detach(), targets) for s in stages]

        result: dict[str, Tensor] = {}
        for s, (stage, matches) in enumerate(zip(stages, all_matches)):
            logits, boxes = stage["pred_logits"], stage["pred_boxes"]
            batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)])
            query_idx = torch.cat([p for p, _ in matches])
            gt_idx = torch.cat([g + offsets[b] for b, (_, g) in enumerate(matches)])
            with torch.autocast(device_type=device.type, enabled=False):
                losses = self._stage_losses(logits, boxes, batch_idx, query_idx, gt_boxes[gt_idx],
                                            gt_labels[gt_idx], whwh[batch_idx], avg_factor)
            result.update({f"stage{s}_{k}": v for k, v in losses.items()})
        result["num_gt"] = torch.tensor(float(sum(counts)), device=device)
        return result

    def _stage_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        batch_idx: Tensor,
        query_idx: Tensor,
        tgt_boxes: Tensor,
        tgt_labels: Tensor,
        tgt_whwh: Tensor,
        avg_factor: Tensor,
    ) -> dict[str, Tensor]:
        """Losses of one stage from the matched ``(batch_idx, query_idx)`` pairs and their GT boxes / labels /
        image ``(W, H, W, H)`` (all ``[M]`` / ``[M, 4]``)."""
        logits = logits.float()
        cls_target = torch.zeros_like(logits)
        cls_target[batch_idx, query_idx, tgt_labels] = 1.0
        loss_cls = sigmoid_focal_loss(logits, cls_target, self.focal_alpha, self.focal_gamma, reduction="sum")

        matched = boxes.float()[batch_idx, query_idx]  # [M, 4] pixels; empty (still in the graph) when M = 0
        loss_bbox = F.l1_loss(matched / tgt_whwh, tgt_boxes / tgt_whwh, reduction="sum")
        loss_iou = generalized_box_iou_loss(matched, tgt_boxes, reduction="sum")
        if query_idx.numel():
            hits = logits.detach()[batch_idx, query_idx].argmax(-1) == tgt_labels
            pos_acc = hits.float().mean() * 100.0
        else:
            pos_acc = logits.new_zeros(())
        return {
            "loss_cls": self.cls_weight * loss_cls / avg_factor,
            "loss_bbox": self.l1_weight * loss_bbox / avg_factor,
            "loss_iou": self.giou_weight * loss_iou / avg_factor,
            "pos_acc": pos_acc,
        }
