"""CondInst dynamic mask head as pure tensor functions: parameter split, relative coordinates, the dynamic 1x1
convolutions and ``aligned_bilinear`` (used by the criterion in training and by the post-processor at test time).

Source: ``specs/dense.md`` §3.10; official ``strongwolf/o2f`` ``condinst_head.py`` (``E2ECondInstHead._init_layers``
``weight_nums``/``bias_nums``, ``parse_dynamic_params``, ``get_mask_head_inputs``, ``forward_mask_decode`` and the
module-level ``aligned_bilinear``), which follow AdelaiDet ``adet/modeling/condinst/dynamic_mask_head.py`` and
``adet/utils/comm.py::aligned_bilinear``.

The head of one instance is a chain of ``num_layers`` 1x1 convolutions whose weights and biases are that instance's
controller output: input ``num_bases + 2`` channels (the 2 relative coordinates first, then the mask bases), hidden
``channels`` channels with ReLU, output 1 channel (a mask logit). With the official 8 bases, 8 channels and 3 layers
that is ``(10·8 + 8·8 + 8·1) + (8 + 8 + 1) = 152 + 17 = 169`` parameters, laid out **all weights first** (80, 64, 8,
each row-major ``[out, in]``), then all biases (8, 8, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["aligned_bilinear", "dynamic_mask_logits", "dynamic_param_counts", "num_dynamic_params",
           "parse_dynamic_params", "relative_coordinates"]


def dynamic_param_counts(num_bases: int = 8, channels: int = 8, num_layers: int = 3) -> tuple[list[int], list[int]]:
    """``(weight_nums, bias_nums)`` of the dynamic layers: ``[(num_bases + 2)·channels, channels², ..., channels]`` and
    ``[channels, ..., channels, 1]`` (official ``E2ECondInstHead._init_layers``); ``([80, 64, 8], [8, 8, 1])`` by
    default.

    Raises:
        ValueError: ``num_layers < 2`` (the official head needs a first and a last layer) or a non-positive size.
    """
    if num_layers < 2 or num_bases < 1 or channels < 1:
        raise ValueError(f"dynamic mask head needs num_layers >= 2 and positive sizes, got {num_layers}, "
                         f"{num_bases}, {channels}")
    weight_nums = [(num_bases + 2) * channels] + [channels * channels] * (num_layers - 2) + [channels]
    bias_nums = [channels] * (num_layers - 1) + [1]
    return weight_nums, bias_nums


def num_dynamic_params(num_bases: int = 8, channels: int = 8, num_layers: int = 3) -> int:
    """Parameters per instance, the controller's output channels (169 by default)."""
    weight_nums, bias_nums = dynamic_param_counts(num_bases, channels, num_layers)
    return sum(weight_nums) + sum(bias_nums)


def parse_dynamic_params(params: Tensor, num_bases: int = 8, channels: int = 8,
                         num_layers: int = 3) -> tuple[list[Tensor], list[Tensor]]:
    """Split the controller outputs of ``N`` instances into per-layer weights and biases.

    Args:
        params: ``[N, P]`` with ``P = num_dynamic_params(...)``, laid out ``[w_0, ..., w_{L-1}, b_0, ..., b_{L-1}]``.
    Returns:
        ``(weights, biases)``: ``weights[l]`` ``[N, out_l, in_l]`` (``in_0 = num_bases + 2``, ``out_{L-1} = 1``),
        ``biases[l]`` ``[N, out_l]``. The official code reshapes the same memory to grouped-conv kernels
        ``[N·out_l, in_l, 1, 1]``; the row-major ``[out, in]`` order is identical.
    Raises:
        ValueError: ``params`` is not ``[N, P]``.
    """
    weight_nums, bias_nums = dynamic_param_counts(num_bases, channels, num_layers)
    if params.dim() != 2 or params.shape[1] != sum(weight_nums) + sum(bias_nums):
        raise ValueError(f"expected dynamic params [N, {sum(weight_nums) + sum(bias_nums)}], got {tuple(params.shape)}")
    n = params.shape[0]
    splits = torch.split_with_sizes(params, weight_nums + bias_nums, dim=1)
    outs = [channels] * (num_layers - 1) + [1]
    ins = [num_bases + 2] + [channels] * (num_layers - 1)
    weights = [w.reshape(n, out, c_in) for w, out, c_in in zip(splits[:num_layers], outs, ins)]
    biases = [b.reshape(n, out) for b, out in zip(splits[num_layers:], outs)]
    return weights, biases


def relative_coordinates(points: Tensor, strides: Tensor, height: int, width: int, feat_stride: int) -> Tensor:
    """Relative coordinates of the mask-feature locations to each instance's anchor point, the first two input
    channels of its dynamic head.

    Location ``(i, j)`` of the ``height`` x ``width`` mask feature (stride ``feat_stride``) is the pixel
    ``((j + 0.5)·feat_stride, (i + 0.5)·feat_stride)`` (official ``_get_points_single``: ``x·s + s // 2``). The
    coordinates are ``(point - location) / (8·stride)`` with the instance's own FPN stride (official
    ``get_mask_head_inputs``: instance minus location, divided by ``stride·8``; AdelaiDet divides by the sizes of
    interest 64, 128, ..., the same numbers on P3-P7).

    Args:
        points: ``[N, 2]`` (x, y) pixels of the instances' anchor points; strides: ``[N]`` their FPN strides.
    Returns:
        ``float32 [N, 2, height, width]`` (x then y).
    """
    ys = (torch.arange(height, device=points.device, dtype=torch.float32) + 0.5) * feat_stride
    xs = (torch.arange(width, device=points.device, dtype=torch.float32) + 0.5) * feat_stride
    scale = (strides.float() * 8.0).reshape(-1, 1, 1)
    rel_x = (points[:, 0].float().reshape(-1, 1, 1) - xs.reshape(1, 1, -1)) / scale
    rel_y = (points[:, 1].float().reshape(-1, 1, 1) - ys.reshape(1, -1, 1)) / scale
    return torch.stack((rel_x.expand(-1, height, -1), rel_y.expand(-1, -1, width)), dim=1)


def aligned_bilinear(tensor: Tensor, factor: int) -> Tensor:
    """Upsample ``[N, C, H, W]`` by an integer ``factor`` to ``[N, C, factor·H, factor·W]`` keeping pixel centres
    aligned (CondInst ``aligned_bilinear``): replicate-pad one row/column at the bottom/right, bilinear resize with
    ``align_corners=True`` to ``factor·H + 1`` x ``factor·W + 1``, replicate-pad ``factor // 2`` at the top/left and
    crop to ``factor·H`` x ``factor·W``. ``factor == 1`` returns the input.

    Raises:
        ValueError: ``tensor`` is not 4-D or ``factor`` is not a positive integer.
    """
    if tensor.dim() != 4 or int(factor) != factor or factor < 1:
        raise ValueError(f"aligned_bilinear needs a [N, C, H, W] tensor and an integer factor >= 1, got "
                         f"{tuple(tensor.shape)} and {factor}")
    factor = int(factor)
    if factor == 1:
        return tensor
    h, w = tensor.shape[-2:]
    tensor = F.pad(tensor, pad=(0, 1, 0, 1), mode="replicate")
    tensor = F.interpolate(tensor, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    tensor = F.pad(tensor, pad=(factor // 2, 0, factor // 2, 0), mode="replicate")
    return tensor[:, :, : factor * h, : factor * w]


def dynamic_mask_logits(mask_feats: Tensor, params: Tensor, points: Tensor, strides: Tensor, feat_stride: int,
                        out_stride: int = 4, num_layers: int = 3, channels: int = 8) -> Tensor:
    """Mask logits of ``N`` instances of one image (or of each image of a batch): each instance's dynamic head on
    [relative coordinates, bases], then ``aligned_bilinear`` from the feature stride to ``out_stride`` (official
    ``forward_mask_decode``).

    The dynamic 1x1 convolutions are batched matrix products (the official grouped ``F.conv2d`` with ``groups=N``
    computes the same sums); the first layer applies its base columns to the shared bases once, without copying them
    per instance. Only tensor operations on shapes: the batched form traces into an ONNX graph with dynamic batch,
    instance count and size (:class:`e2edet.export.EndToEndDetector`).

    Args:
        mask_feats: ``[num_bases, h, w]`` mask bases of the image (stride ``feat_stride``, 8 = P3), or
            ``[B, num_bases, h, w]`` for a batch.
        params: ``[N, P]`` (batch: ``[B, N, P]``) controller outputs of the instances (see
            :func:`parse_dynamic_params`).
        points: ``[N, 2]`` (batch: ``[B, N, 2]``) anchor points (x, y) pixels; strides: ``[N]`` (``[B, N]``) their
            FPN strides.
        feat_stride: stride of ``mask_feats``; out_stride: stride of the returned logits (4); ``feat_stride`` must be
            a multiple of it.
    Returns:
        ``[N, 1, h·f, w·f]`` (batch: ``[B, N, 1, h·f, w·f]``) logits, ``f = feat_stride // out_stride``, in
        ``params``' dtype promoted with the features'.
    Raises:
        ValueError: ``feat_stride`` not a multiple of ``out_stride``, or mismatched shapes.
    """
    if feat_stride % out_stride:
        raise ValueError(f"feat_stride {feat_stride} is not a multiple of the mask out_stride {out_stride}")
    batched = mask_feats.dim() == 4
    if not batched:
        mask_feats, params, points, strides = mask_feats[None], params[None], points[None], strides[None]
    batch, num_bases, h, w = mask_feats.shape
    n = params.shape[1]
    weights, biases = parse_dynamic_params(params.reshape(-1, params.shape[-1]), num_bases, channels, num_layers)
    dtype = torch.promote_types(params.dtype, mask_feats.dtype)
    coords = relative_coordinates(points.reshape(-1, 2), strides.reshape(-1), h, w, feat_stride)
    coords = coords.to(dtype).reshape(batch, n, 2, h * w)
    w0 = weights[0].to(dtype).reshape(batch, n, channels, num_bases + 2)
    bases = mask_feats.to(dtype).reshape(batch, 1, num_bases, h * w)
    x = w0[..., :2] @ coords + w0[..., 2:] @ bases + biases[0].to(dtype).reshape(batch, n, channels, 1)
    x = x.reshape(-1, channels, h * w)
    for weight, bias in zip(weights[1:], biases[1:]):
        x = torch.baddbmm(bias.to(dtype)[:, :, None], weight.to(dtype), F.relu(x))
    logits = aligned_bilinear(x.reshape(-1, 1, h, w), feat_stride // out_stride)
    return logits.reshape(batch, n, 1, *logits.shape[-2:]) if batched else logits
