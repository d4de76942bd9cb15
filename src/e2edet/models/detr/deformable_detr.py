"""Deformable DETR (Zhu et al., ICLR 2021) and its published variants: iterative box refinement, two-stage, and
Deformable-DETR++ (two-stage + refinement + mixed query selection + look-forward-twice, as H-DETR / MS-DETR use it).

Source: ``fundamentalvision/Deformable-DETR`` ``models/deformable_detr.py`` (``DeformableDETR``, ``MLP``) and
``models/deformable_transformer.py`` (``DeformableTransformer``); H-DETR ``models/deformable_transformer.py``
(``mixed_selection``, ``look_forward_twice``); ``specs/detr.md`` §1.2. Module and parameter names follow the official
code (``backbone``, ``input_proj``, ``transformer.encoder/decoder/level_embed/reference_points/enc_output/pos_trans``,
``query_embed``, ``class_embed``, ``bbox_embed``) so that :mod:`e2edet.models.detr.convert` maps checkpoints simply.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from e2edet.models.backbone import build_backbone
from e2edet.models.detr.ms_deform_attn import MSDeformAttn
from e2edet.models.detr.position import box_sine_embedding, sine_position_encoding
from e2edet.models.detr.transformer import (DeformableDecoder, DeformableDecoderLayer, DeformableEncoder,
                                            DeformableEncoderLayer, encoder_proposals, refine_reference, valid_ratios)
from e2edet.models.inputs import check_inputs
from e2edet.models.query.recollection import Recollection, check_recollection, decode_stages
from e2edet.models.query.stages import QueryState

__all__ = ["MLP", "DeformableDETR", "DeformableTransformer"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (official ``MLP``; the box head is 256 -> 256 -> 256 -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class DeformableTransformer(nn.Module):
    """Encoder, decoder, level embedding and the query initialisation (learned, or two-stage proposals).

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: transformer sizes (256, 8,
            6, 6, 1024, 0.1).
        num_feature_levels, enc_n_points, dec_n_points: levels L and sampling points per head and level (4, 4, 4).
        two_stage: queries from the top-``num_queries`` encoder proposals; mixed_selection: with two-stage, the
            content query is a learned embedding and only the positional query comes from the proposals;
        look_forward_twice: see :class:`~e2edet.models.detr.transformer.DeformableDecoder`.
        ms_detr, aux_ffn: MS-DETR decoder layers (see :class:`~e2edet.models.detr.transformer.DeformableDecoderLayer`).

    :meth:`forward` encodes and initialises the queries; the detector runs the decoder layers one by one
    (:meth:`DeformableDecoder.step`).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 enc_n_points: int = 4, dec_n_points: int = 4, two_stage: bool = False, num_queries: int = 300,
                 mixed_selection: bool = False, look_forward_twice: bool = False, ms_detr: bool = False,
                 aux_ffn: bool = True):
        super().__init__()
        self.d_model, self.two_stage, self.num_queries = d_model, two_stage, num_queries
        self.mixed_selection = mixed_selection
        self.encoder = DeformableEncoder(DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                                nhead, enc_n_points), num_encoder_layers)
        self.decoder = DeformableDecoder(DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                                nhead, dec_n_points, ms_detr, aux_ffn),
                                         num_decoder_layers, look_forward_twice)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init: Xavier-uniform for every matrix, then the deformable attention's own init, the reference
        projection Xavier with bias 0, and ``level_embed`` ~ N(0, 1)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor], query_embed: Tensor | None,
                class_embed: nn.ModuleList, bbox_embed: nn.ModuleList) -> dict:
        """Encode the levels and initialise the decoder queries.

        Args:
            srcs: per level ``[B, C, H_l, W_l]``; masks: per level bool ``[B, H_l, W_l]`` (True = padding);
            pos_embeds: per level ``[B, C, H_l, W_l]``.
            query_embed: ``[Q, 2C]`` learned (positional, content) queries; ``[Q, C]`` content queries with mixed
                selection; None for plain two-stage.
            class_embed, bbox_embed: the detector's heads (index ``num_decoder_layers`` = the encoder head in
                two-stage).
        Returns:
            dict with ``memory`` ``[B, S, C]``, ``mask_flat`` bool ``[B, S]``, ``shapes`` (``(H_l, W_l)`` ints),
            ``ratios`` ``[B, L, 2]``, the decoder queries ``tgt``/``query_pos`` ``[B, Q, C]`` and ``init_reference``
            ``[B, Q, 2|4]`` (learned: not detached; two-stage: the detached top-k proposals), and in two-stage
            ``enc_logits`` ``[B, S, K]``, ``enc_boxes`` ``[B, S, 4]`` (sigmoid of the encoder box logits; 1 at
            invalid positions) and ``enc_anchors`` ``[B, S, 4]`` (the fixed proposals, normalised cxcywh, the boxes
            MS-DETR matches the encoder set on).
        Raises:
            ValueError: two-stage with fewer encoder positions than queries.
        """
        shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        memory = self.encoder(src_flat, shapes, ratios, pos_flat, mask_flat)
        batch, c = memory.shape[0], self.d_model
        out: dict = {}
        if self.two_stage:
            if memory.shape[1] < self.num_queries:
                raise ValueError(f"two-stage needs at least num_queries={self.num_queries} encoder positions, the "
                                 f"input gives {memory.shape[1]}: use larger images or fewer queries")
            output_memory, proposals = encoder_proposals(memory, mask_flat, shapes)
            output_memory = self.enc_output_norm(self.enc_output(output_memory))
            n = self.decoder.num_layers
            enc_logits = class_embed[n](output_memory)
            enc_coord = bbox_embed[n](output_memory) + proposals
            topk = torch.topk(enc_logits[..., 0], self.num_queries, dim=1)[1]  # channel 0: binary encoder targets
            topk_coords = torch.gather(enc_coord, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach()
            reference_points = topk_coords.sigmoid()
            embed = box_sine_embedding(topk_coords, c // 2)  # 128 features per coordinate at d = 256 (official)
            pos_trans = self.pos_trans_norm(self.pos_trans(embed.to(memory.dtype)))
            if self.mixed_selection:
                query_pos, tgt = pos_trans[..., :c], query_embed.unsqueeze(0).expand(batch, -1, -1)
            else:
                query_pos, tgt = torch.split(pos_trans, c, dim=2)
            out.update(enc_logits=enc_logits, enc_boxes=enc_coord.sigmoid(), enc_anchors=proposals.sigmoid())
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        out.update(memory=memory, mask_flat=mask_flat, shapes=shapes, ratios=ratios, tgt=tgt, query_pos=query_pos,
                   init_reference=reference_points)
        return out


class DeformableDETR(nn.Module):
    """Deformable DETR: backbone C3-C5 (+ stride-2 extra levels), input projections with GroupNorm, sine position
    encoding + level embedding, deformable encoder/decoder, focal class head (``num_classes`` logits, no background)
    and 3-layer box MLP on every decoder layer.

    Args:
        backbone_name, num_classes, pretrained, freeze_at, norm: backbone (ResNet-50, stem + layer1 frozen, FrozenBN)
            and class count K (91 for the official COCO checkpoints: max category id + 1).
        hidden_dim, num_queries, num_feature_levels, enc_layers, dec_layers, num_heads, dim_feedforward, dropout,
            enc_points, dec_points: 256, 300, 4, 6, 6, 8, 1024, 0.1, 4, 4 (``main.py`` defaults).
        with_box_refine: iterative box refinement (one class/box head per layer); two_stage: encoder proposals;
        mixed_selection, look_forward_twice: the H-DETR tricks of Deformable-DETR++ (need ``two_stage``).
        ms_detr, aux_ffn: MS-DETR decoder layers (cross-attention -> self-attention -> FFN) with the one-to-many tap
            after cross-attention, through the auxiliary FFN (``aux_ffn``; spec ``detr.md`` §3.2). The tap's outputs
            are computed in training only (the official code computes them in eval too and ignores them).
        recollection: SQR index lists (``models/query/recollection.py``), used in training only (spec ``detr.md``
            §2): every recollected set keeps its own reference (so refinement works, unlike the official
            ``QRDeformableDetrTransformerDecoder``) and is predicted by the consuming layer's heads.
        lr_multipliers: ``{regex: multiplier}`` of parameter names for the optimizer (first match wins; the
            official recipe: backbone 0.1, ``reference_points|sampling_offsets`` 0.1), kept as ``lr_multipliers``.

    Call ``model(images, image_sizes)`` (``docs/architecture.md``): ``images`` ``[B, 3, H, W]`` padded to multiples
    of 32, ``image_sizes`` ``[B, 2]`` (h, w) unpadded (None = the padded size). Returns the query-detector dict:
    ``stages`` (one per decoder layer) each with ``pred_logits`` ``[B, Q, K]``, ``pred_boxes_norm`` ``[B, Q, 4]``
    normalised (cx, cy, w, h) of the unpadded image (the DETR convention, used by the loss) and ``pred_boxes``
    ``[B, Q, 4]`` xyxy pixels of the network input; the last layer's entries at the top level; with two-stage
    ``enc_outputs`` = ``{pred_logits [B, S, K], pred_boxes_norm [B, S, 4], pred_boxes, anchors_norm [B, S, 4]}`` of
    the encoder proposals (``anchors_norm``: the fixed proposals, normalised cxcywh). With ``ms_detr``, in training,
    every stage also has ``pred_logits_o2m``, ``pred_boxes_norm_o2m`` and ``pred_boxes_o2m``; in training with
    ``recollection`` also ``recollected`` / ``recollected_stages`` (``recollection.decode_stages``).

    Raises:
        ValueError: ``mixed_selection``/``look_forward_twice`` without ``two_stage`` and refinement, or an unknown
            backbone.
    """

    def __init__(self, backbone_name: str = "resnet50", num_classes: int = 91, pretrained: bool = True,
                 freeze_at: int = 2, norm: str | None = None, hidden_dim: int = 256, num_queries: int = 300,
                 num_feature_levels: int = 4, enc_layers: int = 6, dec_layers: int = 6, num_heads: int = 8,
                 dim_feedforward: int = 1024, dropout: float = 0.1, enc_points: int = 4, dec_points: int = 4,
                 with_box_refine: bool = False, two_stage: bool = False, mixed_selection: bool = False,
                 look_forward_twice: bool = False, ms_detr: bool = False, aux_ffn: bool = True,
                 recollection: Recollection | None = None, lr_multipliers: dict[str, float] | None = None):
        super().__init__()
        self.lr_multipliers = dict(lr_multipliers or {})
        self.recollection = check_recollection(recollection, dec_layers)
        if (mixed_selection or look_forward_twice) and not (two_stage and with_box_refine):
            raise ValueError("mixed_selection and look_forward_twice need two_stage=True and with_box_refine=True")
        self.num_classes, self.num_queries, self.hidden_dim = num_classes, num_queries, hidden_dim
        self.with_box_refine, self.two_stage = with_box_refine, two_stage
        self.backbone = build_backbone(backbone_name, pretrained=pretrained, norm=norm, freeze_at=freeze_at)
        channels = list(self.backbone.out_channels)
        self.num_backbone_levels = min(len(channels), num_feature_levels)
        used = channels[-self.num_backbone_levels:]
        proj = [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(32, hidden_dim)) for c in used]
        in_ch = channels[-1]
        for _ in range(num_feature_levels - self.num_backbone_levels):
            proj.append(nn.Sequential(nn.Conv2d(in_ch, hidden_dim, 3, stride=2, padding=1),
                                      nn.GroupNorm(32, hidden_dim)))
            in_ch = hidden_dim
        self.input_proj = nn.ModuleList(proj)
        self.transformer = DeformableTransformer(hidden_dim, num_heads, enc_layers, dec_layers, dim_feedforward,
                                                 dropout, num_feature_levels, enc_points, dec_points, two_stage,
                                                 num_queries, mixed_selection, look_forward_twice, ms_detr,
                                                 aux_ffn)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        elif mixed_selection:
            self.query_embed = nn.Embedding(num_queries, hidden_dim)
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)
        num_pred = dec_layers + 1 if two_stage else dec_layers
        if with_box_refine:  # one head per layer (deep copies); only the first box head starts at w = h = sigmoid(-2)
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:  # the same head shared by every layer
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> dict:
        """See the class docstring. Raises ValueError for malformed inputs
        (:func:`e2edet.models.inputs.check_inputs`)."""
        sizes = check_inputs(images, image_sizes)
        h_pad, w_pad = images.shape[-2:]
        ys = torch.arange(h_pad, device=images.device)[None, :, None]
        xs = torch.arange(w_pad, device=images.device)[None, None, :]
        mask = (ys >= sizes[:, 0, None, None]) | (xs >= sizes[:, 1, None, None])  # [B, H, W], True = padding
        feats = list(self.backbone(images).values())[-self.num_backbone_levels:]
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for lvl in range(len(srcs), len(self.input_proj)):
            srcs.append(self.input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1]))
        masks = [F.interpolate(mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
        pos = [sine_position_encoding(m, self.hidden_dim // 2).to(s.dtype) for m, s in zip(masks, srcs)]
        query = self.query_embed.weight if hasattr(self, "query_embed") else None
        t = self.transformer(srcs, masks, pos, query, self.class_embed, self.bbox_embed)
        reference = t["init_reference"]
        # without refinement every layer attends from and decodes against the learned reference, gradient kept
        queries = QueryState(t["tgt"], reference, None if self.with_box_refine else reference)
        features = [t["memory"], t["query_pos"], t["ratios"], t["mask_flat"], sizes]
        step = functools.partial(self.stage_step, shapes=t["shapes"])
        layers = list(range(self.transformer.decoder.num_layers))
        out = decode_stages(layers, step, queries, features, self.recollection if self.training else None)
        if self.two_stage:
            out["enc_outputs"] = {**_pack(t["enc_logits"], t["enc_boxes"], sizes),
                                  "anchors_norm": t["enc_anchors"]}
        return out

    def stage_step(self, lid: int, state: QueryState, features: list[Tensor],
                   shapes: list[tuple[int, int]]) -> tuple[QueryState, dict[str, Tensor]]:
        """Decoder layer ``lid`` and its heads (the ``stages.StageStep`` of this model, with the level ``shapes``
        bound): ``class_embed[lid]`` and ``bbox_embed[lid]`` on the layer output, boxes decoded against the
        reference that entered the layer (official ``DeformableDETR.forward``); with MS-DETR layers the same heads
        and reference on the one-to-many tap (``pred_logits_o2m``, ``pred_boxes_norm_o2m``, ``pred_boxes_o2m``).

        Args:
            lid: decoder layer index. state: content ``[B', Q, C]``, reference ``[B', Q, 2|4]`` and carry (see
                :meth:`DeformableDecoder.step`). features: ``memory`` ``[B', S, C]``, ``query_pos`` ``[B', Q, C]``,
                ``ratios`` ``[B', L, 2]``, padding mask ``[B', S]`` and image ``sizes`` ``[B', 2]`` (``B'`` = B, or
                G·B for G query sets batched by ``stages.stage_pass``).
        """
        memory, query_pos, ratios, mask, sizes = features
        refine = self.bbox_embed[lid] if self.with_box_refine else None
        hs, hs_o2m, box_ref, next_ref, carry = self.transformer.decoder.step(
            lid, state.content, state.reference, state.carry, memory, shapes, ratios, query_pos, mask, refine)
        out = _pack(self.class_embed[lid](hs), refine_reference(self.bbox_embed[lid](hs), box_ref), sizes)
        if hs_o2m is not None:
            o2m = _pack(self.class_embed[lid](hs_o2m), refine_reference(self.bbox_embed[lid](hs_o2m), box_ref), sizes)
            out.update({f"{k}_o2m": v for k, v in o2m.items()})
        return QueryState(hs, next_ref, carry), out


def _pack(logits: Tensor, boxes_norm: Tensor, sizes: Tensor) -> dict[str, Tensor]:
    """Output dict of one prediction set: logits, normalised cxcywh and xyxy pixels (``sizes`` float ``[B, 2]``
    (h, w) of the unpadded inputs)."""
    whwh = sizes.flip(-1).repeat(1, 2)[:, None].to(boxes_norm.dtype)
    return {"pred_logits": logits, "pred_boxes_norm": boxes_norm,
            "pred_boxes": box_convert(boxes_norm, "cxcywh", "xyxy") * whwh}
