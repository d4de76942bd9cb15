"""Dense one-stage detector (FCOS / POTO / DeFCN): backbone -> FPN P3-P7 -> ``DenseHead`` -> predictions dict.

Spec ``dense.md`` 1.2 and "Design notes for one codebase" (one FCOS-style model with switches). The output dict is
the "Model output" contract of ``docs/architecture.md``; no loss code lives here.
"""

from __future__ import annotations

import torch
from torch import nn

from e2edet.models.backbone import build_backbone
from e2edet.ops.boxes import decode_ltrb, delta_xywh_decode, square_boxes
from e2edet.ops.dynamic_mask import num_dynamic_params
from e2edet.models.dense.head import DenseHead
from e2edet.models.dense.mask_branch import MaskBranch
from e2edet.models.dense.points import anchor_points
from e2edet.models.fpn import FPN
from e2edet.models.inputs import check_inputs

__all__ = ["DenseDetector", "flatten_levels"]


def flatten_levels(per_level: list[torch.Tensor]) -> torch.Tensor:
    """``[B, C, H_l, W_l]`` per level -> ``[B, sum_l H_l·W_l, C]`` (cvpods ``permute_to_N_HWA_K`` with A = 1, then
    concatenation over levels), matching the row-major point order of ``anchor_points``."""
    return torch.cat([x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]) for x in per_level], dim=1)


class DenseDetector(nn.Module):
    """FCOS-style detector with optional centerness (FCOS) or 3DMF + filter (DeFCN) branch.

    Args:
        backbone_name: ``resnet18/34/50/101`` or ``mobilenet_v2`` (see ``build_backbone``).
        num_classes: ``K`` foreground classes.
        pretrained: load torchvision ImageNet weights for the backbone (warns and falls back when unavailable).
        fpn_channels: FPN and head width (256 in FCOS).
        num_convs: head tower depth (4 in FCOS).
        centerness: FCOS centerness branch (on the regression tower).
        ctr_convs, ctr_channels: O2F's extra convs before the centerness conv (3 x 64; 0 = plain FCOS branch).
        max_filter: DeFCN 3DMF + filter branch.
        max_filter_gn: GroupNorm inside 3DMF.
        box_coder: ``"ltrb"`` (FCOS distances, pixels) or ``"anchor_deltas"`` (DeFCN's Anchor baseline: (dx, dy, dw,
            dh) of one square anchor per location, decoded as cvpods ``Box2BoxTransform`` with weights (1, 1, 1, 1)
            and its ``dw, dh <= log(1000 / 16)`` clamp).
        anchor_size: anchor side in strides (``"anchor_deltas"``): 4 gives cvpods ``ANCHOR_GENERATOR.SIZES``
            32, 64, 128, 256, 512 on P3..P7 (aspect ratio 1, offset 0.5: centred on the anchor points).
        freeze_at: backbone stages to freeze (cvpods ``FREEZE_AT``).
        norm: backbone norm (``None`` = FrozenBN when pretrained, BN otherwise).
        masks: the CondInst instance-mask head of O2F's segmentation variant (``specs/dense.md`` §3.10): a
            ``controller`` on the reg tower (169 dynamic parameters per point for ``mask_bases`` = 8) and a
            :class:`~e2edet.models.dense.mask_branch.MaskBranch` on P3-P5 (width ``mask_channels``, ``mask_convs``
            tower convs, ``mask_bases`` bases, semantic head over the ``num_classes`` classes).
        channels_last: keep the 4D weights in NHWC (``torch.channels_last``) memory layout and convert the input to
            it: the same function, faster convolutions on CPU (oneDNN); the layout survives ``load_state_dict``,
            ``.to(device)`` and the optimizer's state.

    Attributes:
        num_classes, strides (``[8, 16, 32, 64, 128]``), backbone, fpn, head. A trained model is rebuilt from the
        config stored with its weights (:func:`e2edet.build.build_model`), not from the model.
    """

    def __init__(
        self,
        backbone_name: str = "resnet50",
        num_classes: int = 80,
        pretrained: bool = True,
        fpn_channels: int = 256,
        num_convs: int = 4,
        centerness: bool = False,
        max_filter: bool = False,
        max_filter_gn: bool = True,
        freeze_at: int = 2,
        norm: str | None = None,
        ctr_convs: int = 0,
        ctr_channels: int = 64,
        box_coder: str = "ltrb",
        anchor_size: float = 4.0,
        masks: bool = False,
        mask_channels: int = 128,
        mask_convs: int = 4,
        mask_bases: int = 8,
        channels_last: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone_name, pretrained=pretrained, norm=norm, freeze_at=freeze_at)
        self.fpn = FPN(self.backbone.out_channels, fpn_channels)
        self.strides = list(self.fpn.strides)
        self.head = DenseHead(
            fpn_channels,
            num_classes,
            num_levels=len(self.strides),
            num_convs=num_convs,
            centerness=centerness,
            max_filter=max_filter,
            max_filter_gn=max_filter_gn,
            strides=tuple(self.strides),
            ctr_convs=ctr_convs,
            ctr_channels=ctr_channels,
            box_coder=box_coder,
            mask_params=num_dynamic_params(mask_bases) if masks else 0,
        )
        self.box_coder = box_coder
        self.anchor_size = float(anchor_size)
        self.mask_branch = MaskBranch(fpn_channels, mask_channels, mask_convs, mask_bases, num_levels=3,
                                      num_classes=num_classes) if masks else None
        self._point_cache: dict[tuple, tuple] = {}
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def _anchor_points(self, sizes: list[tuple[int, int]], device: torch.device) -> tuple:
        """float32 ``anchor_points`` for these level sizes, cached per (sizes, device); no caching while tracing or
        exporting (the tensors would belong to the trace). float32 even under bf16 autocast, where 8 mantissa bits
        could not represent pixel coordinates exactly."""
        dtype = torch.float32
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return anchor_points(sizes, self.strides, device=device, dtype=dtype)
        key = (tuple(sizes), str(device))
        if key not in self._point_cache:
            if len(self._point_cache) >= 32:  # multi-scale training: keep the cache bounded
                self._point_cache.clear()
            self._point_cache[key] = anchor_points(sizes, self.strides, device=device, dtype=dtype)
        return self._point_cache[key]

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None) -> dict:
        """Run the detector.

        Args:
            images: ``[B, 3, H, W]`` normalised RGB, ``H`` and ``W`` multiples of 32 (padded input).
            image_sizes: ``[B, 2]`` (h, w) of the unpadded inputs or None; only checked (every detector has the same
                call, see ``docs/architecture.md``): a dense detector predicts at every anchor point.

        Returns:
            dict (``docs/architecture.md`` "Model output"), ``R`` = anchor points over P3..P7:
            ``pred_logits`` ``[B, R, K]``; ``pred_boxes`` ``[B, R, 4]`` xyxy pixels of the padded input, float32;
            ``pred_ltrb`` ``[B, R, 4]`` pixels >= 0 (``box_coder="ltrb"``) or ``pred_deltas`` ``[B, R, 4]`` and
            ``anchors`` ``[R, 4]`` xyxy pixels (``"anchor_deltas"``); ``pred_ctr`` ``[B, R]`` logits (only with
            ``centerness``); ``pred_filter`` ``[B, R]`` logits (only with ``max_filter``); ``points`` ``[R, 2]``
            (x, y) pixels; ``strides`` ``[R]`` float; ``levels`` ``[R]`` int64 (0 = P3); ``num_points_per_level``
            ``list[int]``. With ``masks``: ``pred_mask_params`` ``[B, R, P]`` (dynamic mask-head parameters per
            point, P = 169), ``mask_feats`` ``[B, num_bases, H/8, W/8]`` (mask bases), ``mask_feat_stride`` ``int``
            (8) and, in training mode only, ``pred_semantic`` ``[B, K, H/8, W/8]`` logits of the auxiliary semantic
            loss.

        Raises:
            ValueError: ``images`` is not ``[B, 3, H, W]`` with ``H``/``W`` multiples of 32, or bad ``image_sizes``
                (:func:`e2edet.models.inputs.check_inputs`).
        """
        check_inputs(images, image_sizes)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.fpn(self.backbone(images))
        head_out = self.head(features)
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        points, strides, levels, counts = self._anchor_points(sizes, images.device)

        out = {"pred_logits": flatten_levels(head_out["cls_logits"])}
        if self.box_coder == "ltrb":
            out["pred_ltrb"] = flatten_levels(head_out["bbox_ltrb"])
        else:
            out["pred_deltas"] = flatten_levels(head_out["bbox_deltas"])
            out["anchors"] = self.anchor_boxes(points, strides)
        out["pred_boxes"] = self.decode_boxes(points, strides, out)
        if "centerness" in head_out:
            out["pred_ctr"] = flatten_levels(head_out["centerness"]).squeeze(-1)
        if "filter" in head_out:
            out["pred_filter"] = flatten_levels(head_out["filter"]).squeeze(-1)
        out.update(points=points, strides=strides, levels=levels, num_points_per_level=list(counts))
        if self.mask_branch is not None:
            mask_feats, semantic = self.mask_branch(features)
            out.update(pred_mask_params=flatten_levels(head_out["mask_params"]), mask_feats=mask_feats,
                       mask_feat_stride=self.strides[0])
            if semantic is not None:
                out["pred_semantic"] = semantic
        return out

    def anchor_boxes(self, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
        """``[R, 4]`` xyxy square anchors of side ``anchor_size · stride`` centred on ``points`` ``[R, 2]`` (cvpods
        ``DefaultAnchorGenerator``, one size and aspect ratio 1 per level, offset 0.5)."""
        return square_boxes(points, strides * self.anchor_size)

    def decode_boxes(self, points: torch.Tensor, strides: torch.Tensor, out: dict) -> torch.Tensor:
        """``[B, R, 4]`` xyxy pixels from the regression output of ``out`` (``pred_ltrb`` or ``pred_deltas``) at
        ``points`` ``[R, 2]`` / ``strides`` ``[R]``; export calls it with points rebuilt from the traced sizes."""
        if self.box_coder == "ltrb":
            return decode_ltrb(points.unsqueeze(0), out["pred_ltrb"])
        anchors = self.anchor_boxes(points, strides).unsqueeze(0)
        return delta_xywh_decode(anchors, out["pred_deltas"], stds=(1.0, 1.0, 1.0, 1.0), clamp_below=False)
