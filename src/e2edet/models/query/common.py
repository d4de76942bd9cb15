"""Pieces shared by the query-based detectors (Sparse R-CNN, AdaMixer, and D-RMM on both).

Spec ``query.md`` "Design notes for one codebase": pluggable feature reader / interaction / box parameterisation,
output heads of width K (sigmoid) or 1 + K and 8 (D-RMM), named proposal initialisers. The one stage loop and the
input checks are in ``stages``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FFN", "StageOutput", "mlp_layers", "proposal_init"]


def mlp_layers(dim: int, num_layers: int, bias: bool) -> nn.Sequential:
    """``num_layers`` x [Linear(dim, dim, bias), LayerNorm(dim), ReLU] (mmdet ``DIIHead`` cls/reg fcs)."""
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers += [nn.Linear(dim, dim, bias=bias), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FFN(nn.Module):
    """mmcv ``FFN`` + LayerNorm: ``LN(x + Drop(Linear(Drop(ReLU(Linear(x))))))``, ``dim -> hidden -> dim``.

    The residual is inside, as in mmcv (spec ``query.md`` 1.9: do not add it twice). Input/output ``[..., dim]``.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.net(x))


class StageOutput(nn.Module):
    """Classification and box-regression branches of one decoder stage.

    Sparse R-CNN / AdaMixer: cls ``cls_layers`` x [Linear, LN, ReLU] -> Linear(dim, K) (sigmoid logits, bias
    ``-log((1 - prior) / prior)`` = -4.595); reg ``reg_layers`` x [...] -> Linear(dim, 4).
    D-RMM (``drmm=True``, spec ``query.md`` 3.2): ``fc_cls`` -> 1 + K (channel 0 = foreground logit f, then K
    softmax class logits, both biases 0, no prior), ``fc_reg`` -> 8 (4 box outputs, 4 raw scales).

    Init: xavier-uniform on every parameter with more than one dim (mmdet ``DIIHead.init_weights``), then the cls
    bias prior (not for D-RMM) and ``fc_reg`` zeros when ``zero_init_reg`` (AdaMixer, spec 2.2 (e)).

    Args:
        dim: query width. num_classes: ``K``. cls_layers, reg_layers: fc depth (Sparse R-CNN 1 / 3, AdaMixer 1 / 1).
        bias: bias of the inner Linear layers (Sparse R-CNN False, AdaMixer True).
        drmm: D-RMM output widths. prior_prob: initial sigmoid of the class logits (sigmoid heads only).
        zero_init_reg: zero weight and bias of ``fc_reg``.
    """

    def __init__(self, dim: int, num_classes: int, cls_layers: int = 1, reg_layers: int = 3, bias: bool = False,
                 drmm: bool = False, prior_prob: float = 0.01, zero_init_reg: bool = False):
        super().__init__()
        self.num_classes, self.drmm = num_classes, drmm
        self.cls_fcs = mlp_layers(dim, cls_layers, bias)
        self.reg_fcs = mlp_layers(dim, reg_layers, bias)
        self.fc_cls = nn.Linear(dim, num_classes + 1 if drmm else num_classes)
        self.fc_reg = nn.Linear(dim, 8 if drmm else 4)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.fc_reg.bias)
        if drmm:
            nn.init.zeros_(self.fc_cls.bias)
        else:
            nn.init.constant_(self.fc_cls.bias, -math.log((1.0 - prior_prob) / prior_prob))
        if zero_init_reg:
            nn.init.zeros_(self.fc_reg.weight)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x`` ``[B, N, dim]`` -> ``pred_logits [B, N, K]``, ``box_deltas [B, N, 4]`` (the method's box update),
        and for D-RMM also ``pred_fg [B, N]`` (foreground logit) and ``pred_scales [B, N, 4]`` =
        softplus(raw scale) in pixels (the 0.04·size floor is applied in the loss)."""
        cls = self.fc_cls(self.cls_fcs(x))
        reg = self.fc_reg(self.reg_fcs(x))
        if not self.drmm:
            return {"pred_logits": cls, "box_deltas": reg}
        return {"pred_fg": cls[..., 0], "pred_logits": cls[..., 1:], "box_deltas": reg[..., :4],
                "pred_scales": F.softplus(reg[..., 4:].float())}


def proposal_init(kind: str, num: int) -> Tensor:
    """Initial proposal boxes ``[num, 4]`` in normalised (cx, cy, w, h).

    ``"whole"``: every box (0.5, 0.5, 1, 1) (mmdet ``EmbeddingRPNHead``; AdaMixer's fixed xyzr init).
    ``"grid"``: D-RMM ``preset`` init (spec ``query.md`` 3.2): centers on a regular rows x cols grid with
    rows x cols = ``num``, 15 x 20 for 300 (in general rows = the divisor of ``num`` nearest to sqrt(num·3/4)),
    cx = (j + 0.5) / cols, cy = (i + 0.5) / rows, w = h = 0.5.

    Raises:
        ValueError: unknown ``kind``, or ``num`` that does not factor into the grid.
    """
    if kind == "whole":
        return torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(num, 1)
    if kind != "grid":
        raise ValueError(f"unknown proposal init '{kind}'; valid: whole, grid")
    target = math.sqrt(num * 3 / 4)
    rows = min((d for d in range(1, num + 1) if num % d == 0), key=lambda d: (abs(d - target), d))
    cols = num // rows
    if rows == 1 and num > 3:
        raise ValueError(f"grid proposal init needs a number of proposals with a rows x cols grid, got {num}")
    cy, cx = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
    half = torch.full_like(cx, 0.5)
    return torch.stack([cx, cy, half, half], dim=-1).reshape(-1, 4)
