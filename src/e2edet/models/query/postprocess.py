"""Post-processing shared by the query-based detectors (Sparse R-CNN, AdaMixer, D-RMM): flattened top-k, no NMS.

Spec ``query.md`` §1.5 (MMDetection 2.x ``SparseRoIHead.simple_test``), §2.5 (AdaMixer, same), §3.5 (D-RMM
``DRMMHead.get_bboxes``: score ``softmax(cls) · sigmoid(fg)``) and "Design notes for one codebase" (one
post-processor: score function -> flatten N x K -> top-k -> label = idx mod K, query = idx div K -> per-axis rescale).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import ops as tv_ops

from e2edet.ops.boxes import as_image_sizes, rescale_boxes

__all__ = ["QUERY_SCORE_MODES", "QueryPostProcessor", "query_scores"]

QUERY_SCORE_MODES = ("sigmoid", "drmm")


def query_scores(outputs: dict, score: str) -> Tensor:
    """Per-(query, class) scores ``float32 [B, N, K]`` of the last stage.

    ``"sigmoid"``: ``sigmoid(pred_logits)`` (Sparse R-CNN / AdaMixer, §1.5). ``"drmm"``:
    ``softmax(pred_logits, -1) · sigmoid(pred_fg)[..., None]``, the raw sigmoid foreground, **not** the mixing weight
    ``π = fg / Σ fg`` (§3.5: same ranking within an image, different calibration across images).

    Raises:
        ValueError: unknown ``score``; ``"drmm"`` without ``pred_fg`` ``[B, N]`` in ``outputs``.
    """
    logits = outputs["pred_logits"].float()
    if score == "sigmoid":
        return logits.sigmoid()
    if score == "drmm":
        if "pred_fg" not in outputs:
            raise ValueError("score mode 'drmm' needs 'pred_fg' [B, N] in the model outputs")
        fg = outputs["pred_fg"].float()
        if fg.shape != logits.shape[:2]:
            raise ValueError(f"pred_fg must be [B, N] = {tuple(logits.shape[:2])}, got shape {tuple(fg.shape)}")
        return logits.softmax(-1) * fg.sigmoid().unsqueeze(-1)
    raise ValueError(f"unknown score mode '{score}'; valid: {', '.join(QUERY_SCORE_MODES)}")


class QueryPostProcessor:
    """Turn a query-based model's output dict into per-image detections in original-image pixels.

    Per image: scores :func:`query_scores` ``[N, K]`` flattened to ``N·K`` entries; top-k with
    ``k = min(max_detections, N·K)`` and **no score threshold**, so every image gets exactly ``k`` detections;
    ``label = idx mod K``, ``query = idx div K``, ``box = pred_boxes[query]`` (one query may appear with several
    labels, §1.8 #7). Boxes are rescaled from the network-input size to the original size with per-axis factors and
    are **not clipped**: the official mmdet ``SparseRoIHead.simple_test`` and D-RMM ``get_bboxes`` only divide by the
    scale factor (clipping would also change AP compared with the reference numbers).

    With ``nms_iou`` (an optional comparison mode; the methods themselves never use NMS): the top
    ``min(N·K, max(max_detections, nms_candidates))`` entries (1000 by default, no score threshold) go through
    class-aware ``torchvision.ops.batched_nms``, and the ``max_detections`` best survivors are kept.

    Args:
        score: one of ``QUERY_SCORE_MODES``: ``"sigmoid"`` (Sparse R-CNN, AdaMixer) or ``"drmm"``.
        max_detections: detections per image (``max_per_img`` = number of queries, 100 or 300, in Sparse R-CNN /
            AdaMixer; D-RMM hard-codes 100).
        nms_candidates: candidate count before NMS (only with ``nms_iou``).
    Raises:
        ValueError: unknown ``score`` mode or a non-positive count.
    """

    def __init__(self, score: str = "sigmoid", max_detections: int = 100, nms_candidates: int = 1000):
        if score not in QUERY_SCORE_MODES:
            raise ValueError(f"unknown score mode '{score}'; valid: {', '.join(QUERY_SCORE_MODES)}")
        if int(max_detections) < 1 or int(nms_candidates) < 1:
            raise ValueError(f"max_detections and nms_candidates must be >= 1, got {max_detections}, {nms_candidates}")
        self.score = score
        self.max_detections = int(max_detections)
        self.nms_candidates = int(nms_candidates)

    @torch.no_grad()
    def __call__(
        self,
        outputs: dict,
        image_sizes: Tensor | Sequence,
        orig_sizes: Tensor | Sequence,
        nms_iou: float | None = None,
    ) -> list[dict[str, Tensor]]:
        """Post-process a batch.

        Args:
            outputs: model output dict (``docs/architecture.md``): last-stage ``pred_logits`` ``[B, N, K]``,
                ``pred_boxes`` ``[B, N, 4]`` xyxy pixels of the network input, and ``pred_fg`` ``[B, N]`` for ``"drmm"``.
            image_sizes: ``[B, 2]`` (h, w) of the resized, unpadded network input (``target["size"]``); a tensor,
                a nested list or a list of ``[2]`` tensors.
            orig_sizes: ``[B, 2]`` (h, w) of the original images (``target["orig_size"]``), same forms.
            nms_iou: IoU threshold of class-aware NMS; ``None`` (default) never runs NMS.
        Returns:
            one dict per image: ``boxes`` ``[k, 4]`` float32 xyxy pixels of the original image (not clipped),
            ``scores`` ``[k]`` float32 descending, ``labels`` ``[k]`` int64 in ``[0, K)``; ``k = min(max_detections,
            N·K)`` without NMS, at most that with NMS.
        Raises:
            ValueError: ``pred_boxes`` not ``[B, N, 4]``, missing ``pred_fg`` for ``"drmm"``, or sizes not matching B.
        """
        prob = query_scores(outputs, self.score)
        batch, num_queries, num_classes = prob.shape
        pred_boxes = outputs["pred_boxes"]
        if pred_boxes.shape != (batch, num_queries, 4):
            raise ValueError(f"pred_boxes must be [B, N, 4] = {(batch, num_queries, 4)}, got {tuple(pred_boxes.shape)}")
        image_sizes = as_image_sizes(image_sizes, batch, "image_sizes")
        orig_sizes = as_image_sizes(orig_sizes, batch, "orig_sizes")

        total = num_queries * num_classes
        k = min(total, self.max_detections if nms_iou is None else max(self.max_detections, self.nms_candidates))
        scores, index = prob.reshape(batch, total).topk(k, dim=1)  # sorted descending
        labels = index % num_classes
        query = torch.div(index, num_classes, rounding_mode="floor")
        boxes = pred_boxes.float().gather(1, query.unsqueeze(-1).expand(-1, -1, 4))

        results = []
        for b in range(batch):
            img_boxes, img_scores, img_labels = boxes[b], scores[b], labels[b]
            if nms_iou is not None:
                keep = tv_ops.batched_nms(img_boxes, img_scores, img_labels, float(nms_iou))[: self.max_detections]
                img_boxes, img_scores, img_labels = img_boxes[keep], img_scores[keep], img_labels[keep]
            img_boxes = rescale_boxes(img_boxes, image_sizes[b].tolist(), orig_sizes[b].tolist())
            results.append({"boxes": img_boxes, "scores": img_scores, "labels": img_labels.to(torch.int64)})
        return results
