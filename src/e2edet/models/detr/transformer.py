"""The deformable transformer of Deformable DETR: encoder, decoder, valid ratios and two-stage proposals.

Source: ``fundamentalvision/Deformable-DETR`` ``models/deformable_transformer.py`` (``DeformableTransformerEncoderLayer``,
``DeformableTransformerEncoder.get_reference_points``, ``DeformableTransformerDecoderLayer``,
``DeformableTransformerDecoder``, ``DeformableTransformer.get_valid_ratio`` / ``gen_encoder_output_proposals``) and,
for ``look_forward_twice``, H-DETR (``HDETR/H-Deformable-DETR``) ``models/deformable_transformer.py``
(``specs/detr.md`` §1.2, §1.6). Parameter names follow the official modules so that their checkpoints load by name.

Boxes and reference points are normalised to the **unpadded** image (x, y order; ``[0, 1]``) unless said otherwise;
before sampling they are multiplied by the valid ratios of each level (the unpadded fraction of the padded map).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from e2edet.models.detr.ms_deform_attn import MSDeformAttn
from e2edet.ops.boxes import inverse_sigmoid

__all__ = ["DeformableDecoder", "DeformableDecoderLayer", "DeformableEncoder", "DeformableEncoderLayer",
           "encoder_proposals", "refine_reference", "valid_ratios"]

Shapes = list[tuple[int, int]]


def valid_ratios(mask: Tensor) -> Tensor:
    """``[B, H, W]`` padding mask (True = padding) -> float32 ``[B, 2]`` (valid W / W, valid H / H), x then y; read
    from row 0 and column 0 of the mask as the official ``get_valid_ratio``."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: multi-scale deformable self-attention (query = src + pos, value = src), residual +
    dropout + LayerNorm, then FFN ``d_model -> d_ffn -> d_model`` (ReLU), residual + dropout + LayerNorm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1, self.activation = nn.Linear(d_model, d_ffn), nn.ReLU()
        self.dropout2, self.linear2 = nn.Dropout(dropout), nn.Linear(d_ffn, d_model)
        self.dropout3, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: Shapes,
                padding_mask: Tensor | None) -> Tensor:
        """``src``, ``pos`` ``[B, S, C]``; ``reference_points`` ``[B, S, L, 2]`` (already times the valid ratios);
        ``padding_mask`` ``[B, S]`` -> ``[B, S, C]``."""
        src2 = self.self_attn(src + pos, reference_points, src, shapes, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableEncoder(nn.Module):
    """``num_layers`` deep copies of ``layer`` (no final norm)."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: Shapes, ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalised by the valid size of their level, then multiplied by every
        level's valid ratio: float32 ``[B, S, L, 2]`` (x, y). ``ratios``: ``[B, L, 2]`` from :func:`valid_ratios`."""
        refs = []
        device = ratios.device
        for lvl, (h, w) in enumerate(shapes):
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                          torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * ratios[:, None]

    def forward(self, src: Tensor, shapes: Shapes, ratios: Tensor, pos: Tensor,
                padding_mask: Tensor | None) -> Tensor:
        """``src``/``pos`` ``[B, S, C]`` (levels flattened and concatenated), ``ratios`` ``[B, L, 2]`` -> memory
        ``[B, S, C]``."""
        reference_points = self.reference_points(shapes, ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, shapes, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention (``nn.MultiheadAttention``, q = k = tgt + pos, v = tgt) ->
    deformable cross-attention (query = tgt + pos) -> FFN, each with residual + dropout + LayerNorm.

    ``ms_detr`` (MS-DETR, spec ``detr.md`` §3.2; ``Atten4Vis/MS-DETR`` ``models/deformable_transformer.py``
    ``DeformableTransformerDecoderLayer.forward`` with ``use_ms_detr``): the order becomes cross-attention ->
    self-attention -> FFN, and the one-to-many tap is taken after cross-attention, through the auxiliary FFN
    (``linear3``, ``linear4``, ``norm4``; ``aux_ffn``) or as it is (``aux_ffn=False``). Parameter names are the
    official ones.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, ms_detr: bool = False, aux_ffn: bool = True):
        super().__init__()
        self.ms_detr, self.aux_ffn = ms_detr, ms_detr and aux_ffn
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1, self.activation = nn.Linear(d_model, d_ffn), nn.ReLU()
        self.dropout3, self.linear2 = nn.Dropout(dropout), nn.Linear(d_ffn, d_model)
        self.dropout4, self.norm3 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        if self.aux_ffn:
            self.linear3, self.dropout5 = nn.Linear(d_model, d_ffn), nn.Dropout(dropout)
            self.linear4, self.dropout6 = nn.Linear(d_ffn, d_model), nn.Dropout(dropout)
            self.norm4 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor, shapes: Shapes,
                padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``tgt``, ``query_pos`` ``[B, Q, C]``; ``reference_points`` ``[B, Q, L, 2|4]`` (times the valid ratios);
        ``memory`` ``[B, S, C]`` -> ``(out [B, Q, C], o2m tap [B, Q, C] or None)`` (the tap only with ``ms_detr``, in
        training)."""
        if not self.ms_detr:
            tgt = self._self_attention(tgt, query_pos)
            tgt = self._cross_attention(tgt, query_pos, reference_points, memory, shapes, padding_mask)
            return self._ffn(tgt), None
        tgt = self._cross_attention(tgt, query_pos, reference_points, memory, shapes, padding_mask)
        if not self.training:  # the tap is training-only (the official code computes it in eval too, then drops it)
            tap = None
        elif self.aux_ffn:
            tap = self.norm4(tgt + self.dropout6(self.linear4(self.dropout5(self.activation(self.linear3(tgt))))))
        else:
            tap = tgt
        return self._ffn(self._self_attention(tgt, query_pos)), tap

    def _self_attention(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = k = tgt + query_pos
        return self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))

    def _cross_attention(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                         shapes: Shapes, padding_mask: Tensor | None) -> Tensor:
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, padding_mask)
        return self.norm1(tgt + self.dropout1(tgt2))

    def _ffn(self, tgt: Tensor) -> Tensor:
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(self.activation(self.linear1(tgt))))))


def refine_reference(delta: Tensor, reference: Tensor) -> Tensor:
    """``sigmoid(delta + inverse_sigmoid(reference))`` for a 4-d reference; for a 2-d one only (cx, cy) get the
    reference term and (w, h) = ``sigmoid(delta[..., 2:])`` (official ``DeformableTransformerDecoder.forward`` and
    ``DeformableDETR.forward``). ``delta`` ``[..., 4]``, ``reference`` ``[..., 2|4]`` normalised -> ``[..., 4]``."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


class DeformableDecoder(nn.Module):
    """``num_layers`` deep copies of ``layer``, run one layer at a time by :meth:`step` (the detector drives them
    through the shared stage loop ``models/query/stages.py``, so SQR recollection applies to them as to the other
    query detectors).

    With iterative refinement (``step(..., bbox_embed=...)``) the reference is refined after every layer and
    **detached** before the next; with ``look_forward_twice`` (H-DETR) the reference layer d+1's boxes are decoded
    against is the non-detached refined box, so layer d+1's box loss also trains layer d's box head. Official
    ``DeformableTransformerDecoder.forward`` (Deformable-DETR ``models/deformable_transformer.py``; H-DETR for
    ``look_forward_twice``).
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, look_forward_twice: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice

    def step(self, lid: int, tgt: Tensor, reference: Tensor, carry: Tensor | None, memory: Tensor, shapes: Shapes,
             ratios: Tensor, query_pos: Tensor, padding_mask: Tensor | None,
             bbox_embed: nn.Module | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None]:
        """Run layer ``lid``.

        Args:
            tgt, query_pos: ``[B, Q, C]`` content and positional queries.
            reference: ``[B, Q, 2|4]`` normalised (cx, cy[, w, h]) reference entering the layer (detached after layer
                0 with refinement). carry: the reference the layer's boxes are decoded against when it keeps a
                gradient (look-forward-twice: the previous layer's refined box; without refinement: the learned
                initial reference, which the attention also uses), else None.
            memory: ``[B, S, C]`` encoder output; ``ratios`` ``[B, L, 2]``; ``padding_mask`` ``[B, S]``.
            bbox_embed: this layer's box head (refinement) or None.
        Returns:
            ``(hs, hs_o2m, box_reference, next_reference, next_carry)``: the layer output ``[B, Q, C]``, the
            one-to-many tap (MS-DETR layers; None otherwise), the reference this layer's boxes are decoded against,
            the reference entering the next layer (refined, not yet detached) and the next carry.
        """
        attn_ref = carry if (bbox_embed is None and carry is not None) else reference
        scale = torch.cat([ratios, ratios], -1) if attn_ref.shape[-1] == 4 else ratios
        hs, hs_o2m = self.layers[lid](tgt, query_pos, attn_ref[:, :, None] * scale[:, None], memory, shapes,
                                      padding_mask)
        box_reference = attn_ref if carry is None else carry
        if bbox_embed is None:
            return hs, hs_o2m, box_reference, reference, carry
        refined = refine_reference(bbox_embed(hs), reference)
        return hs, hs_o2m, box_reference, refined, refined if self.look_forward_twice else None


def encoder_proposals(memory: Tensor, padding_mask: Tensor, shapes: Shapes) -> tuple[Tensor, Tensor]:
    """Two-stage proposals: one box per encoder position (official ``gen_encoder_output_proposals``).

    Level ``l`` position ``(i, j)`` gives centre ``((j + 0.5) / valid_W, (i + 0.5) / valid_H)`` and ``w = h = 0.05 *
    2**l``. A proposal is valid when all 4 coordinates lie in (0.01, 0.99) and the position is not padding.

    Args:
        memory: ``[B, S, C]``; padding_mask: bool ``[B, S]`` (True = padding); shapes: ``(H_l, W_l)`` per level.
    Returns:
        ``(memory, proposals)``: the memory with padded/invalid positions zeroed, and float32 ``[B, S, 4]`` proposal
        logits (inverse sigmoid of normalised cxcywh), ``+inf`` at padded/invalid positions.
    """
    batch = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        mask = padding_mask[:, start:start + h * w].view(batch, h, w)
        valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=memory.device),
                                        torch.arange(w, dtype=torch.float32, device=memory.device), indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2).float()
        grid = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
        wh = torch.full_like(grid, 0.05 * (2.0 ** lvl))
        proposals.append(torch.cat([grid, wh], -1).view(batch, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask.unsqueeze(-1) | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals

