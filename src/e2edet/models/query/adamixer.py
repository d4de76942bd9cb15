"""AdaMixer detector (CVPR 2022) and its D-RMM variant: backbone C2-C5 -> ``ChannelMapping`` -> fixed whole-image
xyzr queries -> 6 ``AdaMixerStage``s (run in order by the shared ``stages.run_stages``) -> per-stage predictions
(``docs/architecture.md``).

Spec ``query.md`` section 2 (AdaMixer) and 3.10 (D-RMM on AdaMixer); reference behaviour ``MCG-NJU/AdaMixer``
(``necks/identity_fpn.py``, ``dense_heads/query_generator.py``, ``roi_heads/adamixer_decoder.py``,
``roi_heads/bbox_heads/adamixer_decoder_stage.py``). No loss, matcher or post-processing lives here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2edet.models.backbone import build_backbone
from e2edet.models.query.adamixer_ops import (AdaptiveMixing, grid_offsets, initial_xyzr, iof_attn_bias,
                                              make_sample_points, position_embedding, sampling_3d)
from e2edet.models.query.common import FFN, StageOutput, proposal_init as make_proposals
from e2edet.models.inputs import check_inputs
from e2edet.models.query.recollection import Recollection, check_recollection, decode_stages
from e2edet.models.query.stages import QueryState
from e2edet.ops.boxes import refine_xyzr, xyzr_to_xyxy

__all__ = ["AdaMixer", "AdaMixerStage", "ChannelMapping"]

_CONTRACT_KEYS = ("pred_logits", "pred_boxes", "pred_fg", "pred_scales")


class ChannelMapping(nn.Module):
    """AdaMixer neck (``ChannelMapping``, no FPN): per level a 1x1 conv to ``dim`` (xavier-uniform weight, zero bias,
    no norm/activation), then ONE ``GroupNorm`` module shared by all levels.

    GroupNorm groups: 32 (the published ``GroupNorm(32, 256)``) when ``dim`` is a multiple of 32, otherwise
    ``gcd(32, dim)`` so narrow test widths still divide evenly.

    Input: list of ``[B, C_l, H_l, W_l]``; output: list of ``[B, dim, H_l, W_l]`` (same order).
    """

    def __init__(self, in_channels: list[int], dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in in_channels)
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.norm = nn.GroupNorm(math.gcd(32, dim), dim)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        if len(features) != len(self.convs):
            raise ValueError(f"ChannelMapping expects {len(self.convs)} feature maps, got {len(features)}")
        return [self.norm(conv(x)) for conv, x in zip(self.convs, features)]


class AdaMixerStage(nn.Module):
    """One AdaMixer decoder stage (``AdaMixerDecoderStage``, spec 2.2 (a)-(f)).

    (a) IoF-biased MHSA with the sinusoidal PE of xyzr added to query, key, value AND residual (acknowledged quirk,
    issue #6), then LN; (b) adaptive 3D sampling (``offset_generator``: Linear(dim -> G·P_in·3)); (c) adaptive
    mixing, ``q = LN(q + mixing)``; (d) FFN (internal residual + LN); (e) ``StageOutput`` heads (1 cls / 1 reg layer,
    biased inner Linears, zero-init ``fc_reg``); (f) xyzr refinement.

    Init (``init_weights`` of the official stage, in this order, nothing runs after it): xavier-uniform on every
    parameter with more than one dim (attention, generators, FFN; the heads do the same inside ``StageOutput``,
    then cls bias prior and zero ``fc_reg``); ``iof_tau`` ~ U(0, 4); offset generator weight 0, bias (x, y) ~
    U(-0.5, 0.5) (a regular grid of cell centers when P_in is a perfect square, as the official code does), bias
    z = -1; mixing-parameter generator weight 0 (its bias keeps the default uniform init).
    """

    def __init__(self, dim: int = 256, num_classes: int = 80, num_heads: int = 8, dim_feedforward: int = 2048,
                 num_groups: int = 4, in_points: int = 32, out_points: int = 128, dropout: float = 0.0,
                 drmm: bool = False):
        super().__init__()
        self.num_groups, self.in_points = num_groups, in_points
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_norm = nn.LayerNorm(dim)
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self.offset_generator = nn.Linear(dim, num_groups * in_points * 3)
        self.mixing = AdaptiveMixing(dim, dim, in_points, out_points, num_groups)
        self.mixing_norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim, dim_feedforward, dropout)
        self.head = StageOutput(dim, num_classes, cls_layers=1, reg_layers=1, bias=True, drmm=drmm,
                                zero_init_reg=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init order (see the class docstring); the heads keep ``StageOutput``'s own init."""
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("head."):
                nn.init.xavier_uniform_(p)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)
        nn.init.zeros_(self.offset_generator.weight)
        bias = self.offset_generator.bias.view(self.num_groups, self.in_points, 3)
        grid = grid_offsets(self.in_points)
        if grid is None:
            nn.init.uniform_(bias[..., :2], -0.5, 0.5)
        else:
            bias[..., :2] = grid
        bias[..., 2] = -1.0
        self.mixing.reset_generator()

    def self_attention(self, query: Tensor, xyzr: Tensor) -> Tensor:
        """(a) ``LN(t + MHSA(t, t, t, attn_mask=iof_attn_bias))`` with ``t = query + PE(xyzr)``; ``[B, N, dim]``."""
        attn_bias = iof_attn_bias(xyzr, self.iof_tau)
        with torch.no_grad():
            pe = position_embedding(xyzr, query.shape[-1] // 4)
        t = query + pe.to(query.dtype)  # PE in query, key, value and residual (official quirk, issue #6)
        attn = self.attention(t, t, t, attn_mask=attn_bias.to(t.dtype), need_weights=False)[0]
        return self.attention_norm(t + self.attention_dropout(attn))

    def forward(self, query: Tensor, xyzr: Tensor, features: list[Tensor],
                strides: list[int] | tuple[int, ...]) -> dict[str, Tensor]:
        """Run the stage.

        Args:
            query: content ``[B, N, dim]``.
            xyzr: float32 box states ``[B, N, 4]`` (detached by the caller).
            features: ``ChannelMapping`` maps ``[B, dim, H_l, W_l]``; strides: their strides in pixels.

        Returns:
            dict: ``content`` ``[B, N, dim]``; ``box_deltas`` ``[B, N, 4]`` (dx, dy, dz, dr); ``xyzr`` float32
            ``[B, N, 4]`` refined; ``pred_boxes`` float32 ``[B, N, 4]`` xyxy pixels of the refined xyzr;
            ``pred_logits`` ``[B, N, K]``; D-RMM also ``pred_fg`` ``[B, N]`` and ``pred_scales`` ``[B, N, 4]``.
        """
        query = self.self_attention(query, xyzr)
        points = make_sample_points(self.offset_generator(query).float(), xyzr, self.num_groups)
        sampled = sampling_3d(points, features, strides)
        query = self.mixing_norm(query + self.mixing(sampled, query))
        query = self.ffn(query)

        out = self.head(query)
        new_xyzr = refine_xyzr(xyzr, out["box_deltas"].float())
        out.update(content=query, xyzr=new_xyzr, pred_boxes=xyzr_to_xyxy(new_xyzr))
        return out


class AdaMixer(nn.Module):
    """AdaMixer detector; ``drmm=True`` gives D-RMM + AdaMixer.

    D-RMM + AdaMixer is an UNVERIFIED port (spec 3.10: the official code is not released): the AdaMixer stage is
    kept unchanged except ``fc_cls`` -> 1 + K (channel 0 = foreground logit, then K softmax class logits, zero
    biases, no prior) and ``fc_reg`` -> 8; the first 4 regression outputs refine xyzr exactly as in AdaMixer and the
    decoded xyxy box is the Cauchy location mu (``pred_boxes``); ``pred_scales`` = softplus of the other 4 (pixels;
    the 0.04·size floor is the loss's job). The next stage starts from the detached refined xyzr. AdaMixer's zero
    ``fc_reg`` init is kept; the stage-0 boxes default to D-RMM's grid (``proposal_init``), not AdaMixer's whole
    image (the unreleased code's choice is unknown): from whole-image boxes with zero-initialised deltas and scales
    every GT is ~10 floored Cauchy scales (0.04·image size) from every component, its likelihood (~1e-17) sits under
    the official 1e-12 floor and the loss has almost no gradient (measured: 0.0 AP on BCCD, see the issue-4 note).

    Args:
        backbone_name, pretrained, freeze_at, norm: see ``build_backbone`` (built with C2, strides 4/8/16/32).
        num_classes: ``K``. hidden_dim: query and feature width (256; multiple of 8, of ``num_heads`` and of
        ``num_groups``). num_queries: ``N`` (100 or 300). num_stages: 6. num_heads: attention heads (8).
        dim_feedforward: FFN width (2048). num_groups: sampling/mixing groups G (4). in_points: P_in (32).
        out_points: P_out (128). dropout: attention/FFN dropout (0). drmm: D-RMM output heads.
        proposal_init: fixed stage-0 boxes, ``"whole"`` | ``"grid"`` (``common.proposal_init``, turned into xyzr
            by ``adamixer_ops.initial_xyzr``); None = ``"whole"`` (AdaMixer) / ``"grid"`` (D-RMM + AdaMixer).
        recollection: SQR index lists (``recollection.Recollection``), used in training only; None = the plain
            stage loop. Adds no parameter (SQR-AdaMixer, spec ``detr.md`` §2).

    Attributes:
        num_classes, drmm, strides
        (``[4, 8, 16, 32]``), backbone, neck (``ChannelMapping``), content (``Embedding(N, hidden_dim)``, default
        N(0, 1) init), stages (``ModuleList`` of ``AdaMixerStage``), init_proposals (``[N, 4]`` normalised
        (cx, cy, w, h) buffer of ``proposal_init``, not saved). The stage-0 xyzr is not a parameter.

    Raises:
        ValueError: widths that do not divide as required, an unknown ``proposal_init`` or a grid ``N`` cannot fill.
    """

    def __init__(self, backbone_name: str = "resnet50", num_classes: int = 80, pretrained: bool = True,
                 freeze_at: int = 2, norm: str | None = None, hidden_dim: int = 256, num_queries: int = 100,
                 num_stages: int = 6, num_heads: int = 8, dim_feedforward: int = 2048, num_groups: int = 4,
                 in_points: int = 32, out_points: int = 128, dropout: float = 0.0, drmm: bool = False,
                 proposal_init: str | None = None, recollection: Recollection | None = None):
        super().__init__()
        if hidden_dim % 8 or hidden_dim % num_heads or hidden_dim % num_groups:
            raise ValueError(f"hidden_dim {hidden_dim} must be a multiple of 8 (position embedding), of num_heads "
                             f"{num_heads} and of num_groups {num_groups}")
        if min(num_queries, num_stages, in_points, out_points) < 1:
            raise ValueError("num_queries, num_stages, in_points and out_points must be >= 1")
        self.num_classes, self.drmm = num_classes, drmm
        self.recollection = check_recollection(recollection, num_stages, drmm)
        self.proposal_init = proposal_init if proposal_init is not None else ("grid" if drmm else "whole")
        # normalised (cx, cy, w, h) [N, 4]; not saved (derived from the constructor arguments), raises for an unknown kind / N
        self.register_buffer("init_proposals", make_proposals(self.proposal_init, num_queries), persistent=False)
        self.backbone = build_backbone(backbone_name, pretrained=pretrained, norm=norm, freeze_at=freeze_at,
                                       with_c2=True)
        self.strides = list(self.backbone.strides)
        self.neck = ChannelMapping(self.backbone.out_channels, hidden_dim)
        self.content = nn.Embedding(num_queries, hidden_dim)
        self.stages = nn.ModuleList(
            AdaMixerStage(hidden_dim, num_classes, num_heads, dim_feedforward, num_groups, in_points, out_points,
                          dropout, drmm)
            for _ in range(num_stages))

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> dict:
        """Run the detector.

        Args:
            images: ``[B, 3, H, W]`` normalised RGB, H and W multiples of 32 (padded batch).
            image_sizes: int64 ``[B, 2]`` (h, w) of the unpadded resized images (``targets[b]["size"]``); None =
                the padded size. The stage-0 boxes cover the unpadded image; sampling coordinates are normalised
                w.r.t. the padded feature maps.

        Returns:
            dict (``docs/architecture.md``): ``stages``: list of ``num_stages`` dicts (stage 0 first) with
            ``pred_logits`` ``[B, N, K]`` (sigmoid logits; D-RMM: softmax class logits) and ``pred_boxes`` float32
            ``[B, N, 4]`` xyxy pixels of the network input (D-RMM: mu), D-RMM also ``pred_fg`` ``[B, N]`` and
            ``pred_scales`` float32 ``[B, N, 4]`` > 0; plus the last stage's tensors at the top level.

        Raises:
            ValueError: ``images`` not ``[B, 3, H, W]`` with H, W multiples of 32, ``image_sizes`` not ``[B, 2]`` or
                outside ``(0, H] x (0, W]`` (``models.inputs.check_inputs``).
        """
        sizes = check_inputs(images, image_sizes)
        features = self.neck(list(self.backbone(images).values()))
        weight = self.content.weight
        query = F.layer_norm(weight, weight.shape[-1:]).unsqueeze(0).expand(images.shape[0], -1, -1)
        xyzr = initial_xyzr(sizes, self.init_proposals)
        return decode_stages(self.stages, self.stage_step, QueryState(query, xyzr), features,
                             self.recollection if self.training else None)

    def stage_step(self, stage: AdaMixerStage, state: QueryState,
                   features: list[Tensor]) -> tuple[QueryState, dict[str, Tensor]]:
        """One AdaMixer stage (the ``stages.StageStep`` of this model; the body of the stage loop of
        ``AdaMixerDecoder.forward_train`` / ``simple_test`` in ``mmdet/models/roi_heads/adamixer_decoder.py``).

        Args:
            stage: one of ``self.stages``. state: content ``[B', N, dim]`` and reference = the entering xyzr float32
                ``[B', N, 4]``. features: ``ChannelMapping`` maps ``[B', dim, H_l, W_l]`` at ``self.strides``
                (``B'`` = B, or G·B for G query sets batched by ``stages.stage_pass``).

        Returns:
            ``(QueryState(new content, refined xyzr, not detached), outputs)``; outputs: ``pred_logits``
            ``[B', N, K]``, ``pred_boxes`` float32 ``[B', N, 4]`` xyxy pixels of the padded input (of the refined
            xyzr), D-RMM also ``pred_fg`` ``[B', N]`` and ``pred_scales`` float32 ``[B', N, 4]``.
        """
        res = stage(state.content, state.reference, features, self.strides)
        return QueryState(res["content"], res["xyzr"]), {k: res[k] for k in _CONTRACT_KEYS if k in res}
