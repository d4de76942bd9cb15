"""MS-DETR's one-to-many assigner: up to ``k`` queries per GT from the top of a combined IoU + class score.

Spec ``detr.md`` §3.3 (o2m) and §3.8 (properties 1-6). Reference: ``Atten4Vis/MS-DETR`` (commit ``c015d65``)
``models/matcher_o2m.py`` → ``Stage2Assigner.forward`` / ``get_cost_matrix``, ``Matcher`` (threshold labels and
``set_low_quality_matches_``), ``subsample_labels`` and ``sample_topk_per_gt`` (itself modified from DETA's
``models/assigner.py`` and detectron2's ``Matcher`` / ``subsample_labels``). Per image, with Q queries and G GTs:

1. ``S[g, q] = coef_box · IoU(box_q, gt_g) + coef_cls · sigmoid(logit_q)[label_g]`` (plain IoU on xyxy);
2. each query takes its best GT ``m_q = argmax_g S[g, q]``; positive when ``max_g S[g, q] >= threshold``;
3. each GT's single best query (top-1 over q) is forced positive (its GT stays ``m_q``);
4. at most ``floor(positive_fraction · Q)`` positives, chosen by ``torch.randperm`` when there are more;
5. GT g with ``c_g`` surviving positives gets the first ``min(c_g, k)`` of its top-k queries of row ``S[g, :]``
   over **all** queries (not necessarily those assigned to g in step 2; a query may serve two GTs);
6. pairs sorted by ``S`` ascending (stable), so a query listed twice gets its highest-scoring GT's class target
   (the set criterion keeps the last pair of a query);
7. no GT: no pairs.

This module imports nothing from ``e2edet.models``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

__all__ = ["OneToManyAssigner"]


class OneToManyAssigner:
    """MS-DETR's ``Stage2Assigner`` (defaults threshold 0.4, k 6, coef_box 0.7, coef_cls 0.3, positive fraction
    0.25); a matcher of :class:`e2edet.losses.set_criterion.PredictionSet` (returns duplicates).

    Args:
        threshold: positive threshold on the combined score. k: at most ``k`` queries per GT (``min(k, Q)`` when a
            set has fewer queries; the official code needs ``Q >= k``). coef_box, coef_cls: score weights.
        positive_fraction: cap on positives as a fraction of the queries (detectron2 ``subsample_labels`` with
            ``num_samples = Q``).
        generator: optional ``torch.Generator`` for the subsampling (None: the global generator, like the
            official ``torch.randperm``).

    Raises:
        ValueError: ``k < 1``, a fraction outside [0, 1] or a negative or non-finite coefficient or threshold.
    """

    def __init__(self, threshold: float = 0.4, k: int = 6, coef_box: float = 0.7, coef_cls: float = 0.3,
                 positive_fraction: float = 0.25, generator: torch.Generator | None = None):
        for name, value in (("threshold", threshold), ("coef_box", coef_box), ("coef_cls", coef_cls)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"OneToManyAssigner: {name} must be finite and >= 0, got {value}")
        if int(k) < 1 or not 0 <= positive_fraction <= 1:
            raise ValueError(f"OneToManyAssigner: need k >= 1 and positive_fraction in [0, 1], got k={k}, "
                             f"positive_fraction={positive_fraction}")
        self.threshold, self.k = float(threshold), int(k)
        self.coef_box, self.coef_cls = float(coef_box), float(coef_cls)
        self.positive_fraction, self.generator = float(positive_fraction), generator

    def scores(self, pred_logits: Tensor, pred_boxes_xyxy: Tensor, gt_boxes_xyxy: Tensor, gt_labels: Tensor) -> Tensor:
        """``S`` ``[G, Q]`` of one image (step 1): ``pred_logits`` ``[Q, K]``, boxes xyxy in one frame (pixels or
        normalised) ``[Q, 4]`` / ``[G, 4]``, ``gt_labels`` int64 ``[G]``."""
        iou = box_iou(gt_boxes_xyxy.float(), pred_boxes_xyxy.float())  # [G, Q]
        prob = pred_logits.float().sigmoid()[:, gt_labels].T  # [G, Q]
        return self.coef_box * iou + self.coef_cls * prob

    def assign(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 2-7 on one image's ``S`` ``[G, Q]``: ``(pred_idx, gt_idx)`` int64, sorted by score ascending."""
        num_gt, num_queries = scores.shape
        device = scores.device
        empty = torch.empty(0, dtype=torch.int64, device=device)
        if num_gt == 0 or num_queries == 0:
            positive = torch.zeros(num_queries, dtype=torch.bool, device=device)
            best_gt = torch.zeros(num_queries, dtype=torch.int64, device=device)
        else:
            best_score, best_gt = scores.max(0)  # per query
            positive = best_score >= self.threshold
            positive[scores.topk(1, dim=1).indices.flatten()] = True  # each GT's best query (low-quality matches)
        candidates = positive.nonzero().flatten()
        cap = min(int(num_queries * self.positive_fraction), candidates.numel())
        # the official random draws, in its order (positives, then the negatives it samples but MS-DETR ignores),
        # also for an image without GT, so that a seeded run consumes the generator as the official code does
        rng = dict(generator=self.generator, device="cpu" if self.generator is not None else device)
        order = torch.randperm(candidates.numel(), **rng)[:cap]
        torch.randperm(num_queries - candidates.numel(), **rng)
        if num_gt == 0 or cap == 0:
            return empty, empty.clone()
        candidates = candidates[order.to(device)]
        gts, counts = best_gt[candidates].unique(return_counts=True)
        k = min(self.k, num_queries)
        top_scores, top_queries = scores[gts].topk(k, dim=1)  # [G', k], descending
        keep = torch.arange(k, device=device)[None, :] < counts[:, None]  # the first min(c_g, k) of each row
        pred_idx = top_queries[keep]
        gt_idx = gts[:, None].expand(-1, k)[keep]
        order = top_scores[keep].argsort(stable=True)  # ascending: a duplicated query's best GT comes last
        return pred_idx[order], gt_idx[order]

    @torch.no_grad()
    def __call__(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict],
                 box_format: str = "xyxy") -> list[tuple[Tensor, Tensor]]:
        """Assign every image of a batch.

        Args:
            pred_logits: ``[B, Q, K]`` sigmoid logits. pred_boxes: ``[B, Q, 4]``, xyxy pixels of the network input
                (``box_format="xyxy"``) or normalised cxcywh of the unpadded image (``"cxcywh_norm"``, DETR).
            targets: B dicts with ``boxes`` xyxy pixels ``[G_b, 4]``, ``labels`` int64 ``[G_b]`` and ``size``
                ``(h, w)`` of the unpadded input.
        Returns:
            per image ``(pred_idx, gt_idx)`` int64 tensors, sorted by score ascending; a query may appear more
            than once.
        Raises:
            ValueError: an unknown ``box_format``, shapes that do not fit, or a label outside ``[0, K)``.
        """
        if box_format not in ("xyxy", "cxcywh_norm"):
            raise ValueError(f"OneToManyAssigner: box_format must be 'xyxy' or 'cxcywh_norm', got {box_format!r}")
        if pred_logits.dim() != 3 or pred_boxes.shape != (*pred_logits.shape[:2], 4) or len(targets) != len(pred_logits):
            raise ValueError(f"OneToManyAssigner: need pred_logits [B, Q, K], pred_boxes [B, Q, 4] and B targets, got "
                             f"{tuple(pred_logits.shape)}, {tuple(pred_boxes.shape)} and {len(targets)} targets")
        results = []
        num_classes = pred_logits.shape[-1]
        for logits, boxes, target in zip(pred_logits, pred_boxes, targets):
            gt_boxes = target["boxes"].to(boxes.device).float().reshape(-1, 4)
            labels = target["labels"].to(boxes.device).reshape(-1)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(f"OneToManyAssigner: labels must lie in [0, {num_classes}), got "
                                 f"{sorted(set(labels.tolist()))}")
            if box_format == "cxcywh_norm":
                h, w = (float(v) for v in target["size"])
                gt_boxes = gt_boxes / gt_boxes.new_tensor([w, h, w, h])
                boxes = box_convert(boxes.float(), "cxcywh", "xyxy")
            results.append(self.assign(self.scores(logits, boxes, gt_boxes, labels)))
        return results
