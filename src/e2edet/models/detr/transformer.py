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
    deformable cross-attention (query = tgt + pos) -> FFN, each with residual + dropout + LayerNorm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1, self.activation = nn.Linear(d_model, d_ffn), nn.ReLU()
        self.dropout3, self.linear2 = nn.Dropout(dropout), nn.Linear(d_ffn, d_model)
        self.dropout4, self.norm3 = nn.Dropout(dropout), nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor, shapes: Shapes,
                padding_mask: Tensor | None) -> Tensor:
        """``tgt``, ``query_pos`` ``[B, Q, C]``; ``reference_points`` ``[B, Q, L, 2|4]`` (times the valid ratios);
        ``memory`` ``[B, S, C]`` -> ``[B, Q, C]``."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


def refine_reference(delta: Tensor, reference: Tensor) -> Tensor:
    """``sigmoid(delta + inverse_sigmoid(reference))`` for a 4-d reference; for a 2-d one only (cx, cy) get the
    reference term and (w, h) = ``sigmoid(delta[..., 2:])`` (official ``DeformableTransformerDecoder.forward`` and
    ``DeformableDETR.forward``). ``delta`` ``[..., 4]``, ``reference`` ``[..., 2|4]`` normalised -> ``[..., 4]``."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


class DeformableDecoder(nn.Module):
    """``num_layers`` deep copies of ``layer``; returns every layer's output and the reference each layer's boxes are
    decoded against.

    With ``bbox_embed`` (iterative refinement: one box head per layer, set by the detector) the reference is refined
    after every layer and **detached** before the next; with ``look_forward_twice`` (H-DETR) the reference recorded for
    layer d+1 is the non-detached refined box, so layer d+1's box loss also trains layer d's box head.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, look_forward_twice: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, shapes: Shapes, ratios: Tensor,
                query_pos: Tensor, padding_mask: Tensor | None,
                bbox_embed: nn.ModuleList | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Run the layers.

        Args:
            tgt, query_pos: ``[B, Q, C]`` content and positional queries.
            reference_points: ``[B, Q, 2]`` or ``[B, Q, 4]`` normalised (cx, cy[, w, h]).
            memory: ``[B, S, C]`` encoder output; ``ratios`` ``[B, L, 2]``; ``padding_mask`` ``[B, S]``.
            bbox_embed: per-layer box heads (refinement) or None.
        Returns:
            ``(hs, references)``: per layer the output ``[B, Q, C]`` and the reference ``[B, Q, 2|4]`` that the
            **next** layer's boxes are decoded against (layer 0 decodes against the initial reference).
        """
        hs, refs = [], []
        for lid, layer in enumerate(self.layers):
            scale = torch.cat([ratios, ratios], -1) if reference_points.shape[-1] == 4 else ratios
            tgt = layer(tgt, query_pos, reference_points[:, :, None] * scale[:, None], memory, shapes, padding_mask)
            if bbox_embed is not None:
                refined = refine_reference(bbox_embed[lid](tgt), reference_points)
                reference_points = refined.detach()
                refs.append(refined if self.look_forward_twice else reference_points)
            else:
                refs.append(reference_points)
            hs.append(tgt)
        return hs, refs


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

