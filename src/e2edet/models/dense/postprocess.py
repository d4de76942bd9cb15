"""Post-processing of dense-detector outputs: per-level top-k + score threshold, global sort, top-N, optional NMS.

Spec ``dense.md`` 1.5 (cvpods ``FCOS.inference_single_image``, ``postprocessing.py::detector_postprocess``), 2.5 (DeFCN
``FCOS.inference_single_image``: score cls·filter, no NMS), 3.5 (O2F: score cls·ctr) and 3.10 (O2F's CondInst
variant: threshold on cls, score cls·ctr, masks pasted into the original image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import ops as tv_ops

from e2edet.models.dense.mask_postprocess import instance_masks
from e2edet.ops.boxes import as_image_sizes, rescale_boxes

__all__ = ["DensePostProcessor", "SCORE_MODES", "class_probabilities"]

SCORE_MODES = ("cls", "cls_filter", "cls_ctr_sqrt", "cls_ctr", "cls_ctr_cls_thresh")


def class_probabilities(outputs: dict, score: str) -> torch.Tensor:
    """Per-(point, class) probabilities ``float32 [B, R, K]`` that a score mode thresholds and ranks.

    ``cls``: ``sigmoid(pred_logits)``; ``cls_filter``: times ``sigmoid(pred_filter)`` (DeFCN 3DMF, §2.5);
    ``cls_ctr``: times ``sigmoid(pred_ctr)`` (MMDetection / O2F); ``cls_ctr_sqrt`` and ``cls_ctr_cls_thresh``:
    ``sigmoid(pred_logits)`` only, since cvpods FCOS (§1.5) and the O2F CondInst head (§3.10) threshold the cls
    probability and apply the centerness afterwards.
    """
    prob = outputs["pred_logits"].float().sigmoid()
    if score == "cls_filter":
        prob = prob * outputs["pred_filter"].float().sigmoid().unsqueeze(-1)
    elif score == "cls_ctr":
        prob = prob * outputs["pred_ctr"].float().sigmoid().unsqueeze(-1)
    return prob


class DensePostProcessor:
    """Turn the dense model output dict into per-image detections in original-image pixels.

    Score modes (probabilities p = sigmoid(cls), per (point, class); one point may emit several classes):

    - ``"cls"``: p (POTO). Threshold and top-k on p.
    - ``"cls_filter"``: p · sigmoid(filter) (DeFCN 3DMF). Threshold and top-k on the product.
    - ``"cls_ctr_sqrt"``: FCOS (cvpods): threshold and top-k on p **before** centerness, final score
      sqrt(p · sigmoid(ctr)).
    - ``"cls_ctr"``: p · sigmoid(ctr) (O2F / MMDetection). Threshold and top-k on the product.
    - ``"cls_ctr_cls_thresh"``: O2F's CondInst head (§3.10, ``condinst_head.py`` ``_get_bboxes_single`` and its
      ``multiclass_nms``): per level the top-k **points** by their best product ``max_c p·sigmoid(ctr)``
      (``nms_pre``), then the (point, class) entries whose **cls probability** p > ``score_thresh``, scored
      p · sigmoid(ctr).

    Per image and per level: flatten (point, class), keep the top ``min(topk_candidates, #points in the level)``
    entries, keep those > ``score_thresh``. Then concatenate levels, apply class-aware ``torchvision.ops.batched_nms``
    only when ``nms_iou`` is given, sort by score (descending), keep ``max_detections``, rescale from the network input
    size to the original size (per-axis factors), clip to the original image and drop empty boxes (width or height 0).

    Models with instance masks (outputs holding ``mask_feats``) also get ``masks``: the kept detections' masks in the
    original image (:func:`~e2edet.models.dense.mask_postprocess.instance_masks`: dynamic head at stride 4, sigmoid,
    aligned-bilinear x4, crop to the input, resize to the original size, > 0.5).

    Args:
        score: one of ``SCORE_MODES``.
        score_thresh: candidate threshold (0.05).
        topk_candidates: per-level candidate cap (1000).
        max_detections: detections kept per image (100; 500 on CrowdHuman).

    Raises:
        ValueError: unknown ``score`` mode.
    """

    def __init__(
        self, score: str = "cls", score_thresh: float = 0.05, topk_candidates: int = 1000, max_detections: int = 100
    ):
        if score not in SCORE_MODES:
            raise ValueError(f"unknown score mode '{score}'; valid: {', '.join(SCORE_MODES)}")
        self.score = score
        self.score_thresh = float(score_thresh)
        self.topk_candidates = int(topk_candidates)
        self.max_detections = int(max_detections)

    def _candidates(
        self, outputs: dict, prob: torch.Tensor, b: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-level top-k + threshold for image ``b`` of ``prob`` (:func:`class_probabilities`) -> (boxes ``[n, 4]``,
        scores ``[n]``, labels ``[n]`` int64, anchor points ``[n]`` int64)."""
        prob = prob[b]
        num_points, num_classes = prob.shape
        if self.score in ("cls_ctr_sqrt", "cls_ctr_cls_thresh"):
            ctr = outputs["pred_ctr"][b].float().sigmoid()
        counts = outputs.get("num_points_per_level", [num_points])
        boxes, scores, labels, points = [], [], [], []
        start = 0
        for count in counts:
            if self.score == "cls_ctr_cls_thresh":
                level = prob[start : start + count]
                best = (level * ctr[start : start + count, None]).amax(dim=1)
                top = best.topk(min(self.topk_candidates, count)).indices
                keep = level[top] > self.score_thresh  # [k, K]
                rows, label = torch.nonzero(keep, as_tuple=True)
                point = start + top[rows]
                values, index = prob[point, label] * ctr[point], point * num_classes + label
            else:
                flat = prob[start : start + count].reshape(-1)
                values, index = flat.topk(min(self.topk_candidates, count, flat.numel()))
                keep = values > self.score_thresh
                values, index = values[keep], index[keep] + start * num_classes
                point = torch.div(index, num_classes, rounding_mode="floor")
            if self.score == "cls_ctr_sqrt":
                values = torch.sqrt(values * ctr[point])
            boxes.append(outputs["pred_boxes"][b][point].float())
            scores.append(values)
            labels.append(index % num_classes)
            points.append(point)
            start += count
        return torch.cat(boxes), torch.cat(scores), torch.cat(labels).to(torch.int64), torch.cat(points)

    @torch.no_grad()
    def __call__(
        self,
        outputs: dict,
        image_sizes: torch.Tensor | Sequence,
        orig_sizes: torch.Tensor | Sequence,
        nms_iou: float | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Post-process a batch.

        Args:
            outputs: model output dict (``docs/architecture.md``): ``pred_logits`` ``[B, R, K]``, ``pred_boxes``
                ``[B, R, 4]`` xyxy pixels of the network input, ``num_points_per_level``, and ``pred_filter``
                ``[B, R]`` / ``pred_ctr`` ``[B, R]`` logits for the modes that use them.
            image_sizes: ``[B, 2]`` (h, w) of the resized, unpadded network input (``target["size"]``); a tensor,
                a nested list or a list of ``[2]`` tensors.
            orig_sizes: ``[B, 2]`` (h, w) of the original images (``target["orig_size"]``), same forms.
            nms_iou: IoU threshold of class-aware NMS; ``None`` (default) never runs NMS.

        Returns:
            one dict per image: ``boxes`` ``[k, 4]`` float32 xyxy pixels of the original image, ``scores`` ``[k]``
            sorted descending, ``labels`` ``[k]`` int64 in ``[0, K)``; ``k <= max_detections``; for models with
            masks also ``masks`` ``bool [k, H, W]`` in the original image.

        Raises:
            ValueError: the score mode needs ``pred_filter``/``pred_ctr`` and it is missing, or sizes do not match B.
        """
        needed = {"cls_filter": "pred_filter", "cls_ctr": "pred_ctr", "cls_ctr_sqrt": "pred_ctr",
                  "cls_ctr_cls_thresh": "pred_ctr"}.get(self.score)
        if needed is not None and needed not in outputs:
            raise ValueError(f"score mode '{self.score}' needs '{needed}' in the model outputs")
        batch = outputs["pred_logits"].shape[0]
        image_sizes = as_image_sizes(image_sizes, batch, "image_sizes")
        orig_sizes = as_image_sizes(orig_sizes, batch, "orig_sizes")
        prob = class_probabilities(outputs, self.score)
        results = []
        for b in range(batch):
            boxes, scores, labels, points = self._candidates(outputs, prob, b)
            if nms_iou is not None:
                order = tv_ops.batched_nms(boxes, scores, labels, float(nms_iou))
            else:
                order = torch.sort(scores, descending=True, stable=True).indices
            order = order[: self.max_detections]
            boxes, scores, labels, points = boxes[order], scores[order], labels[order], points[order]

            orig_h, orig_w = orig_sizes[b].tolist()
            boxes = rescale_boxes(boxes, image_sizes[b].tolist(), (orig_h, orig_w))
            boxes = tv_ops.clip_boxes_to_image(boxes, (int(orig_h), int(orig_w)))
            nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            result = {"boxes": boxes[nonempty], "scores": scores[nonempty], "labels": labels[nonempty]}
            if "mask_feats" in outputs:
                result["masks"] = instance_masks(outputs, b, points[nonempty], image_sizes[b].tolist(),
                                                 (int(orig_h), int(orig_w)))
            results.append(result)
        return results
