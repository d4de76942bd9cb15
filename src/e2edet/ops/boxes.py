"""Box transforms and coders: pure tensor functions, with the source of each formula.

Box formats: ``xyxy`` pixels (x1, y1, x2, y2) of the network input unless stated otherwise; ``cxcywh`` (centre,
width, height), here normalised by the image size when the name says so; ``ltrb`` distances (pixels) from an anchor
point to the four sides; ``xyzr`` (AdaMixer) centre x, y in pixels, z = log2(sqrt(w·h)), r = log2(h / w).
Image sizes are ``(h, w)`` pairs, as in the collate contract (``docs/architecture.md``).

This module imports nothing from e2edet: models, assigners and losses all build on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert

__all__ = [
    "encode_ltrb", "decode_ltrb", "centerness_target", "MAX_LOG_RATIO", "delta_xywh_decode", "delta_xywh_encode",
    "square_boxes", "xyzr_to_xyxy",
    "xyxy_to_xyzr", "refine_xyzr", "normalized_cxcywh_to_xyxy", "inverse_sigmoid", "image_whwh", "as_image_sizes",
    "rescale_boxes",
]


# ---------------------------------------------------------------------------------------------------- ltrb (FCOS)
def encode_ltrb(points: Tensor, boxes: Tensor) -> Tensor:
    """Distances from anchor points to box sides (cvpods ``Shift2BoxTransform``, weights 1; spec ``dense.md`` 1.2:
    pixels, never divided by the stride).

    Args:
        points: ``[..., 2]`` (x, y) pixels.
        boxes: ``[..., 4]`` xyxy pixels; broadcast against ``points``.
    Returns:
        ``[..., 4]`` (l, t, r, b) = (x - x1, y - y1, x2 - x, y2 - y) in pixels; all > 0 iff the point is strictly
        inside the box.
    """
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], dim=-1)


def decode_ltrb(points: Tensor, ltrb: Tensor) -> Tensor:
    """Inverse of :func:`encode_ltrb`.

    Args:
        points: ``[..., 2]`` (x, y) pixels.
        ltrb: ``[..., 4]`` distances (l, t, r, b) in pixels; broadcast against ``points``.
    Returns:
        ``[..., 4]`` xyxy pixels = (x - l, y - t, x + r, y + b).
    """
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]], dim=-1)


def centerness_target(ltrb: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b))`` (spec ``dense.md`` 1.3, FCOS
    ``compute_centerness_targets``).

    Args:
        ltrb: ``[..., 4]`` (l, t, r, b) regression targets in pixels (of points inside their box).
    Returns:
        ``[...]`` in [0, 1]: 1 at the box centre, 0 on an edge. Points outside the box (a negative distance) and
        degenerate boxes give 0 (numerators are clamped at 0 and denominators at 1e-12), never NaN.
    """
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    ratio_x = lr.min(dim=-1).values.clamp(min=0) / lr.max(dim=-1).values.clamp(min=1e-12)
    ratio_y = tb.min(dim=-1).values.clamp(min=0) / tb.max(dim=-1).values.clamp(min=1e-12)
    return torch.sqrt(ratio_x * ratio_y)


# ---------------------------------------------------------------------- DeltaXYWH (Sparse R-CNN, DeFCN Anchor)
MAX_LOG_RATIO = abs(math.log(16.0 / 1000.0))  # 4.135: mmdet ``delta2bbox`` wh_ratio_clip = 16 / 1000


def delta_xywh_decode(boxes: Tensor, deltas: Tensor, stds: tuple[float, ...] = (0.5, 0.5, 1.0, 1.0),
                      max_ratio: float = MAX_LOG_RATIO, clamp_below: bool = True) -> Tensor:
    """Apply (dx, dy, dw, dh) deltas to boxes: mmdet ``DeltaXYWHBBoxCoder.decode`` (means 0, ``clip_border=False``;
    spec ``query.md`` 1.2 "Box update") or, with ``clamp_below=False``, detectron2/cvpods
    ``Box2BoxTransform.apply_deltas`` (``stds`` = its ``weights`` inverted; DeFCN's Anchor baseline uses weights
    (1, 1, 1, 1), spec ``dense.md`` 2.3).

    ``(dx, dy, dw, dh) = deltas · stds``; ``dw, dh`` clamped to ``[-max_ratio, max_ratio]`` (mmdet) or only above at
    ``max_ratio`` (cvpods ``scale_clamp = log(1000 / 16)``, the same value); ``cx' = cx + w·dx``, ``cy' = cy + h·dy``,
    ``w' = w·exp(dw)``, ``h' = h·exp(dh)`` with ``w = x2 - x1`` (no +1); no clipping.

    Args:
        boxes: ``[..., 4]`` xyxy pixels (the stage's input boxes, or anchors). deltas: ``[..., 4]`` raw regression
            outputs. clamp_below: also clamp ``dw, dh`` at ``-max_ratio`` (mmdet; cvpods does not).
    Returns:
        ``[..., 4]`` xyxy pixels, float32 (computed in float32 whatever the input dtypes).
    """
    boxes, deltas = boxes.float(), deltas.float() * deltas.new_tensor(stds, dtype=torch.float32)
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx, cy = boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h
    dx, dy = deltas[..., 0], deltas[..., 1]
    low = -max_ratio if clamp_below else None
    dw, dh = deltas[..., 2].clamp(low, max_ratio), deltas[..., 3].clamp(low, max_ratio)
    cx, cy, w, h = cx + w * dx, cy + h * dy, w * dw.exp(), h * dh.exp()
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def delta_xywh_encode(boxes: Tensor, targets: Tensor, stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Deltas that :func:`delta_xywh_decode` (same ``stds``) turns ``boxes`` into ``targets`` (unless a ``dw, dh``
    passes the clamp): detectron2/cvpods ``Box2BoxTransform.get_deltas`` with ``weights = 1 / stds``.

    Args:
        boxes: ``[..., 4]`` xyxy pixels with positive width and height (anchors); targets: ``[..., 4]`` xyxy pixels
            with positive width and height, broadcast against ``boxes``.
    Returns:
        ``[..., 4]`` ``((tx - cx) / w, (ty - cy) / h, log(tw / w), log(th / h)) / stds``, float32.
    """
    boxes, targets = boxes.float(), targets.float()
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    tw, th = targets[..., 2] - targets[..., 0], targets[..., 3] - targets[..., 1]
    dx = (targets[..., 0] + 0.5 * tw - boxes[..., 0] - 0.5 * w) / w
    dy = (targets[..., 1] + 0.5 * th - boxes[..., 1] - 0.5 * h) / h
    deltas = torch.stack([dx, dy, torch.log(tw / w), torch.log(th / h)], dim=-1)
    return deltas / deltas.new_tensor(stds)


def square_boxes(points: Tensor, sides: Tensor) -> Tensor:
    """Axis-aligned squares centred on anchor points: cvpods ``DefaultAnchorGenerator`` with one size and aspect
    ratio 1 per level (DeFCN Anchor: sides 32..512 on P3..P7), or ATSS's ``anchor_scale · stride`` boxes.

    Args:
        points: ``[..., 2]`` (x, y) pixels; sides: ``[...]`` side lengths in pixels, broadcast against ``points``.
    Returns:
        ``[..., 4]`` xyxy pixels ``(x - side/2, y - side/2, x + side/2, y + side/2)``.
    """
    sides = sides.to(points.dtype).unsqueeze(-1).expand_as(points)
    return box_convert(torch.cat([points, sides], dim=-1), "cxcywh", "xyxy")


# --------------------------------------------------------------------------------------------- xyzr (AdaMixer)
def xyzr_to_xyxy(xyzr: Tensor) -> Tensor:
    """``[..., 4]`` (x, y, z, r) -> ``[..., 4]`` xyxy pixels: w = 2^(z - r/2), h = 2^(z + r/2) (AdaMixer
    ``adamixer_decoder_stage.py::decode_box``)."""
    x, y, z, r = xyzr.unbind(-1)
    w, h = torch.pow(2.0, z - 0.5 * r), torch.pow(2.0, z + 0.5 * r)
    return torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], dim=-1)


def xyxy_to_xyzr(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy pixels (w, h > 0) -> ``[..., 4]`` (x, y, z = log2 sqrt(w·h), r = log2(h/w)); the inverse of
    :func:`xyzr_to_xyxy` (AdaMixer ``InitialQueryGenerator._decode_init_proposals``)."""
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return torch.stack([0.5 * (boxes[..., 0] + boxes[..., 2]), 0.5 * (boxes[..., 1] + boxes[..., 3]),
                        0.5 * torch.log2(w * h), torch.log2(h / w)], dim=-1)


def refine_xyzr(xyzr: Tensor, delta: Tensor) -> Tensor:
    """AdaMixer box update (``refine_xyzr``): x += dx·2^z, y += dy·2^z, z += dz, r += dr. ``[..., 4]`` ->
    ``[..., 4]``; the centre moves in units of sqrt(w·h) = 2^z pixels."""
    scale = torch.pow(2.0, xyzr[..., 2:3])
    return torch.cat([xyzr[..., :2] + delta[..., :2] * scale, xyzr[..., 2:] + delta[..., 2:]], dim=-1)


# ------------------------------------------------------------------------------------ normalised boxes (DETR)
def normalized_cxcywh_to_xyxy(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Normalised (cx, cy, w, h) ``[N, 4]`` -> xyxy pixels ``[B, N, 4]`` for input sizes ``[B, 2]`` (h, w)
    (mmdet ``EmbeddingRPNHead``: multiply by (W, H, W, H) of ``img_shape``). Keeps the gradient to ``boxes``."""
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    whwh = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=-1)
    return xyxy.unsqueeze(0) * whwh.unsqueeze(1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both ``x`` and ``1 - x`` floored at ``eps``
    (Deformable DETR ``util/misc.py::inverse_sigmoid``); finite for every input in [0, 1]."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def image_whwh(targets: list[dict], device: torch.device) -> Tensor:
    """``float32 [B, 4]`` ``(w, h, w, h)`` of each image's **unpadded** network-input size ``targets[b]["size"]``
    (``(h, w)``, the collate contract), on ``device``: the divisor that normalises xyxy pixel boxes.

    Raises:
        ValueError: a target has no ``"size"`` or it is not two numbers.
    """
    sizes = []
    for b, t in enumerate(targets):
        if "size" not in t:
            raise ValueError(f"targets[{b}] has no 'size' (h, w) entry, needed to normalise boxes")
        size = torch.as_tensor(t["size"]).detach().reshape(-1)
        if size.numel() != 2:
            raise ValueError(f"targets[{b}]['size'] must hold (h, w), got shape {tuple(size.shape)}")
        sizes.append(size.to(device=device, dtype=torch.float32))
    if not sizes:
        return torch.zeros(0, 4, device=device)
    return torch.stack(sizes).flip(-1).repeat(1, 2)


def as_image_sizes(sizes: Tensor | Sequence, batch: int, name: str) -> Tensor:
    """``[B, 2]`` (h, w) image sizes given as a tensor, a nested list, or a list of ``[2]`` tensors (such as
    ``target["size"]``), as a float64 CPU tensor.

    Raises:
        ValueError: not ``batch`` rows of two numbers (the message names ``name``).
    """
    if not torch.is_tensor(sizes) and len(sizes) and torch.is_tensor(sizes[0]):
        sizes = torch.stack([torch.as_tensor(s).cpu() for s in sizes])
    t = torch.as_tensor(sizes, dtype=torch.float64, device="cpu").reshape(-1, 2)
    if t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} rows for a batch of {batch} images")
    return t


def rescale_boxes(boxes: Tensor, input_size: tuple[float, float], orig_size: tuple[float, float]) -> Tensor:
    """xyxy boxes ``[..., 4]`` in pixels of the network input (``input_size`` = (h, w), unpadded) -> pixels of the
    original image (``orig_size`` = (h, w)), with per-axis factors (detectron2 ``detector_postprocess``); no
    clipping."""
    (in_h, in_w), (orig_h, orig_w) = input_size, orig_size
    return boxes * boxes.new_tensor([orig_w / in_w, orig_h / in_h, orig_w / in_w, orig_h / in_h])
