"""Instance masks of the kept detections of a CondInst-style dense detector, pasted into the original image.

Source: ``specs/dense.md`` §3.10 "Inference"; official ``strongwolf/o2f`` ``condinst_head.py``
``E2ECondInstHead._get_bboxes_single`` (after ``multiclass_nms``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from e2edet.ops.dynamic_mask import aligned_bilinear, dynamic_mask_logits

__all__ = ["instance_masks", "paste_masks"]


def instance_masks(outputs: dict, b: int, point_index: torch.Tensor, image_size: tuple[int, int],
                   orig_size: tuple[int, int], out_stride: int = 4, threshold: float = 0.5,
                   chunk: int = 32) -> torch.Tensor:
    """Binary masks in the original image of the detections of image ``b`` made at the anchor points
    ``point_index``.

    Per detection (official order): the dynamic mask head on the image's mask bases gives logits at stride
    ``out_stride`` (4) over the padded input; ``sigmoid``; :func:`~e2edet.ops.dynamic_mask.aligned_bilinear` x
    ``out_stride`` to input pixels; crop to the unpadded input ``image_size``; bilinear resize
    (``align_corners=False``) to ``orig_size``; ``> threshold`` (0.5). Computed ``chunk`` detections at a time, so
    the float maps of 100 detections of a large image never sit in memory together.

    Args:
        outputs: the model output dict with ``mask_feats [B, num_bases, Hm, Wm]``, ``pred_mask_params [B, R, P]``,
            ``mask_feat_stride``, ``points [R, 2]`` and ``strides [R]``.
        b: image index in the batch. point_index: ``int64 [k]`` anchor points of the detections (with repeats when
            one point gives several classes).
        image_size: ``(h, w)`` of the unpadded network input; orig_size: ``(H, W)`` of the original image.
    Returns:
        ``bool [k, H, W]``.
    """
    feats = outputs["mask_feats"][b]
    out = torch.zeros(point_index.numel(), int(orig_size[0]), int(orig_size[1]), dtype=torch.bool,
                      device=feats.device)
    for start in range(0, point_index.numel(), chunk):
        idx = point_index[start : start + chunk]
        logits = dynamic_mask_logits(feats, outputs["pred_mask_params"][b][idx], outputs["points"][idx],
                                     outputs["strides"][idx], int(outputs["mask_feat_stride"]), out_stride)
        out[start : start + idx.numel()] = paste_masks(logits.float().sigmoid()[:, 0], image_size, orig_size,
                                                       out_stride, threshold)
    return out


def paste_masks(probs: torch.Tensor, image_size: tuple[int, int], orig_size: tuple[int, int], out_stride: int = 4,
                threshold: float = 0.5) -> torch.Tensor:
    """Mask probabilities at stride ``out_stride`` over the padded network input -> binary masks in the original
    image: :func:`~e2edet.ops.dynamic_mask.aligned_bilinear` x ``out_stride``, crop to the unpadded input
    ``image_size`` ``(h, w)``, bilinear resize (``align_corners=False``) to ``orig_size`` ``(H, W)``,
    ``> threshold`` (official ``condinst_head.py`` ``_get_bboxes_single``).

    Args:
        probs: ``float [k, Hm, Wm]`` (sigmoid of the dynamic head's logits; the ONNX graph's ``masks`` output).
    Returns:
        ``bool [k, H, W]``.
    """
    h, w = int(image_size[0]), int(image_size[1])
    if probs.shape[0] == 0:
        return torch.zeros(0, int(orig_size[0]), int(orig_size[1]), dtype=torch.bool, device=probs.device)
    prob = aligned_bilinear(probs.float()[:, None], out_stride)[:, :, :h, :w]
    prob = F.interpolate(prob, size=(int(orig_size[0]), int(orig_size[1])), mode="bilinear", align_corners=False)
    return prob[:, 0] > threshold
