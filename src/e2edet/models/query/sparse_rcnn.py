"""Sparse R-CNN (MMDetection 2.x implementation) and, with ``drmm=True``, D-RMM + Sparse R-CNN.

Spec ``query.md`` 1.2 (model), 3.2 (D-RMM output layers, additive box update, grid proposals) and "Design notes for
one codebase" (one stage loop; boxes detached between stages, content not). The output dict follows
``docs/architecture.md``; losses, matching and post-processing live elsewhere (``e2edet.losses``, ``postprocess``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork, roi_align
from torchvision.ops.poolers import LevelMapper

from e2edet.models.backbone import build_backbone
from e2edet.models.query.common import proposal_init as make_proposals
from e2edet.models.query.dynamic_conv import DIIStage
from e2edet.models.inputs import check_inputs
from e2edet.models.query.recollection import Recollection, check_recollection, decode_stages
from e2edet.models.query.stages import QueryState
from e2edet.ops.boxes import delta_xywh_decode, normalized_cxcywh_to_xyxy

__all__ = ["SparseRCNN", "PyramidRoIAlign"]

class PyramidRoIAlign(nn.Module):
    """RoIAlign on FPN levels with torchvision's level mapper (the pooling of ``torchvision.ops.MultiScaleRoIAlign``).

    Level of a box: torchvision ``LevelMapper`` (canonical scale 224 at level 4, clamped to the given levels):
    ``floor(4 + log2(sqrt(w·h) / 224) + 1e-6)`` = ``floor(log2(sqrt(w·h) / 56) + 1e-6)`` relative to P2, which is
    mmdet ``map_roi_levels`` (finest_scale 56, ``floor(log2(scale / 56 + 1e-6))``) except where the eps sits: the
    two differ only for ``sqrt(w·h)`` within a relative ~1e-6 of 112, 224, 448 (spec 1.2 "RoI features", 1.8 #6).
    A box with one negative side (w·h < 0, possible with D-RMM's additive update) gets no level (NaN scale) and
    pools zeros; a zero-area box maps to the first level.

    Each level is pooled with ``torchvision.ops.roi_align(spatial_scale=1/stride, sampling_ratio, aligned)``.
    ``aligned=True`` by default, following the official code: mmcv ``RoIAlign`` (used by mmdet
    ``SingleRoIExtractor`` in the Sparse R-CNN / D-RMM configs) defaults to ``aligned=True`` (half-pixel shift),
    while ``MultiScaleRoIAlign`` always uses ``aligned=False``; ``aligned=False`` reproduces ``MultiScaleRoIAlign``
    exactly. Strides are given, not inferred from an image shape, so padding never changes the spatial scales.

    Args:
        strides: strides of the pooled levels in pixels, consecutive powers of two (P2..P5: 4, 8, 16, 32).
        output_size: pooled side S (7). sampling_ratio: bilinear samples per bin side (2).
        aligned: half-pixel aligned RoIAlign. canonical_scale, canonical_level: level-mapper constants (224, 4).

    Raises:
        ValueError: strides that are not consecutive powers of two.
    """

    def __init__(self, strides: tuple[int, ...] = (4, 8, 16, 32), output_size: int = 7, sampling_ratio: int = 2,
                 aligned: bool = True, canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__()
        logs = [math.log2(s) for s in strides]
        if any(lg != round(lg) for lg in logs) or any(b - a != 1 for a, b in zip(logs, logs[1:])):
            raise ValueError(f"PyramidRoIAlign strides must be consecutive powers of two, got {tuple(strides)}")
        self.strides = tuple(int(s) for s in strides)
        self.output_size, self.sampling_ratio, self.aligned = output_size, sampling_ratio, aligned
        self.mapper = LevelMapper(int(logs[0]), int(logs[-1]), canonical_scale, canonical_level)

    def levels(self, boxes: list[Tensor]) -> Tensor:
        """int64 ``[R]`` level index (0 = first level, e.g. P2) of every box of the per-image ``[N_b, 4]`` xyxy
        pixel boxes, concatenated in image order."""
        return self.mapper(boxes)

    def forward(self, features: list[Tensor], boxes: list[Tensor] | Tensor) -> Tensor:
        """``features``: per level ``[B, C, H_l, W_l]`` (strides ``self.strides``); ``boxes``: per image ``[N_b, 4]``
        xyxy pixels of the padded input, or one ``[B, N, 4]`` tensor (the same ``N`` per image) -> ``[sum_b N_b, C,
        S, S]`` in image-major order.

        The tensor form builds the RoI batch indices with tensor ops, so a traced (ONNX) graph keeps a dynamic batch
        size (a list taken with ``unbind`` would be traced as a split into a fixed number of images). No gradient
        reaches ``boxes`` (torchvision's ``roi_align`` has none for the boxes).

        Raises:
            ValueError: wrong number of levels or images.
        """
        num_images = boxes.shape[0] if isinstance(boxes, Tensor) else len(boxes)
        if len(features) != len(self.strides) or num_images != features[0].shape[0]:
            raise ValueError(f"PyramidRoIAlign: got {len(features)} levels for strides {self.strides} and "
                             f"{num_images} box lists for a batch of {features[0].shape[0]}")
        if isinstance(boxes, Tensor):
            boxes = boxes.detach()
            # image index of every box, [B, N, 1], from a cumulative sum so that the batch size stays symbolic
            image_index = torch.cumsum(torch.ones_like(boxes[..., :1]), dim=0) - 1
            rois = torch.cat([image_index, boxes], dim=-1).flatten(0, 1)
            levels = self.levels([rois[:, 1:]])
        else:
            boxes = [b.detach() for b in boxes]
            rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
            levels = self.levels(boxes)
        pooled = []
        for level, (feat, stride) in enumerate(zip(features, self.strides)):
            idx = torch.where(levels == level)[0]
            pooled.append((idx, roi_align(feat, rois[idx].to(feat.dtype), self.output_size, 1.0 / stride,
                                          self.sampling_ratio, self.aligned)))
        dtype = pooled[0][1].dtype
        result = rois.new_zeros((rois.shape[0], features[0].shape[1], self.output_size, self.output_size),
                                dtype=dtype)
        for idx, out in pooled:
            result[idx] = out.to(dtype)
        return result


class SparseRCNN(nn.Module):
    """Sparse R-CNN (spec ``query.md`` 1.2) or, with ``drmm=True``, D-RMM + Sparse R-CNN (spec 3.2).

    Backbone (C2..C5) -> FPN P2..P5 (``torchvision.ops.FeaturePyramidNetwork``, ``hidden_dim`` channels, no extra
    levels = mmdet FPN start_level 0, num_outs 4; xavier-uniform conv init as mmdet's FPN ``init_cfg``) ->
    learnable proposals (``init_proposal_boxes``: Embedding(N, 4) normalised cxcywh from ``common.proposal_init``;
    ``init_proposal_features``: Embedding(N, d), N(0, 1)) -> ``num_stages`` x [``PyramidRoIAlign`` 7x7 on the stage's
    input boxes -> ``DIIStage`` -> box update] (``stage_step``, run in order by the shared ``stages.run_stages``).

    Box update: Sparse R-CNN ``delta_xywh_decode`` against the stage's input box; D-RMM ``mu = roi + delta`` (plain
    additive pixel offset). The stage-0 input boxes are the proposals in pixels of the UNPADDED image size, not
    detached (the initial boxes learn through the decode); every later stage's input boxes are the previous
    stage's decoded boxes **detached**; the content (``obj_feat``) is not detached.

    Args:
        backbone_name: ``resnet18/34/50/101`` or ``mobilenet_v2``. num_classes: K. pretrained: ImageNet backbone.
        freeze_at: backbone stages to freeze (2 = stem + res2, mmdet frozen_stages 1). norm: backbone norm.
        hidden_dim: d (256). num_queries: N (100 / 300). num_stages: 6. num_heads: 8. dim_feedforward: 2048.
        dynamic_dim: DynamicConv width (64). pooler_size: RoIAlign side (7). dropout: 0.0.
        proposal_init: ``"whole"`` | ``"grid"``; None = ``"whole"`` (Sparse R-CNN) / ``"grid"`` (D-RMM, 15 x 20 for
            300 queries). drmm: D-RMM output layers and box update.
        stage_init: ``"official"`` | ``"adamixer"`` (zero DynamicConv generator weight and ``fc_reg``, see
            ``DIIStage``).
        recollection: SQR index lists (``recollection.Recollection``), used in training only; None = the plain
            stage loop. Adds no parameter (spec ``detr.md`` §2, through the shared stage loop).

    Attributes:
        num_classes, drmm, strides (``[4, 8, 16, 32]``), backbone, fpn, roi_pool, init_proposal_boxes, init_proposal_features, stages.

    Raises:
        ValueError: unknown backbone/norm/proposal init/stage init, a grid init whose N has no grid,
            ``num_stages < 1``.
    """

    def __init__(self, backbone_name: str = "resnet50", num_classes: int = 80, pretrained: bool = True,
                 freeze_at: int = 2, norm: str | None = None, hidden_dim: int = 256, num_queries: int = 100,
                 num_stages: int = 6, num_heads: int = 8, dim_feedforward: int = 2048, dynamic_dim: int = 64,
                 pooler_size: int = 7, dropout: float = 0.0, proposal_init: str | None = None, drmm: bool = False,
                 stage_init: str = "official", recollection: Recollection | None = None):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.num_classes, self.drmm, self.num_queries = num_classes, drmm, num_queries
        self.recollection = check_recollection(recollection, num_stages, drmm)
        self.backbone = build_backbone(backbone_name, pretrained=pretrained, norm=norm, freeze_at=freeze_at,
                                       with_c2=True)
        self.strides = list(self.backbone.strides)
        self.fpn = FeaturePyramidNetwork(list(self.backbone.out_channels), hidden_dim)
        for m in self.fpn.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.roi_pool = PyramidRoIAlign(tuple(self.strides), pooler_size, sampling_ratio=2, aligned=True)
        kind = proposal_init if proposal_init is not None else ("grid" if drmm else "whole")
        self.init_proposal_boxes = nn.Embedding(num_queries, 4)
        with torch.no_grad():
            self.init_proposal_boxes.weight.copy_(make_proposals(kind, num_queries))
        self.init_proposal_features = nn.Embedding(num_queries, hidden_dim)  # default N(0, 1)
        self.stages = nn.ModuleList(
            DIIStage(hidden_dim, num_classes, num_heads, dim_feedforward, dynamic_dim, pooler_size, dropout, drmm,
                     stage_init)
            for _ in range(num_stages))

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> dict:
        """Run the detector.

        Args:
            images: ``[B, 3, H, W]`` normalised RGB, ``H`` and ``W`` multiples of 32 (padded input).
            image_sizes: int64 ``[B, 2]`` (h, w) of the resized, UNPADDED images (``targets[b]["size"]``); None =
                the padded size. Scales the initial proposals (mmdet ``EmbeddingRPNHead`` uses ``img_shape``).

        Returns:
            the ``docs/architecture.md`` dict: ``"stages"``: list of ``num_stages`` dicts (stage 0 first) with
            ``pred_logits [B, N, K]`` (sigmoid logits; D-RMM: K-way softmax logits), ``pred_boxes`` float32
            ``[B, N, 4]`` xyxy pixels of the input (D-RMM: Cauchy location mu) and, for D-RMM, ``pred_fg [B, N]``
            foreground logits and ``pred_scales`` float32 ``[B, N, 4]`` softplus scales in pixels (before the
            0.04·size floor); the last stage's tensors are repeated at the top level (the same objects).

        Raises:
            ValueError: ``images`` not ``[B, 3, H, W]``, ``H``/``W`` not multiples of 32, ``image_sizes`` not
                ``[B, 2]`` or outside ``(0, H] x (0, W]``.
        """
        sizes = check_inputs(images, image_sizes)
        features = list(self.fpn(self.backbone(images)).values())  # P2..P5
        batch = images.shape[0]
        boxes = normalized_cxcywh_to_xyxy(self.init_proposal_boxes.weight.float(), sizes)  # [B, N, 4], keeps the grad
        content = self.init_proposal_features.weight.unsqueeze(0).expand(batch, -1, -1)
        return decode_stages(self.stages, self.stage_step, QueryState(content, boxes), features,
                             self.recollection if self.training else None)

    def stage_step(self, stage: DIIStage, state: QueryState,
                   features: list[Tensor]) -> tuple[QueryState, dict[str, Tensor]]:
        """One Sparse R-CNN / D-RMM stage (the ``stages.StageStep`` of this model; mmdet ``SparseRoIHead._bbox_forward``
        in ``mmdet/models/roi_heads/sparse_roi_head.py``): RoIAlign on the entering boxes -> ``DIIStage`` -> box update.

        Args:
            stage: one of ``self.stages``. state: content ``[B', N, d]`` and reference = the entering boxes float32
                ``[B', N, 4]`` xyxy pixels of the padded input. features: P2..P5 ``[B', d, H_l, W_l]``
                (``B'`` = B, or G·B for G query sets batched by ``stages.stage_pass``).

        Returns:
            ``(QueryState(new content, decoded boxes, not detached), outputs)``; outputs: ``pred_logits``
            ``[B', N, K]``, ``pred_boxes`` float32 ``[B', N, 4]`` xyxy pixels (Sparse R-CNN: ``delta_xywh_decode``
            against the entering box; D-RMM: entering box + pixel offset = mu), D-RMM also ``pred_fg`` ``[B', N]``
            and ``pred_scales`` float32 ``[B', N, 4]``.
        """
        boxes = state.reference
        roi_feats = self.roi_pool(features, boxes)
        content, head = stage(state.content, roi_feats)
        if self.drmm:
            new_boxes = boxes + head["box_deltas"].float()
        else:
            new_boxes = delta_xywh_decode(boxes, head["box_deltas"])
        out = {"pred_logits": head["pred_logits"], "pred_boxes": new_boxes}
        if self.drmm:
            out.update(pred_fg=head["pred_fg"], pred_scales=head["pred_scales"])
        return QueryState(content, new_boxes), out
