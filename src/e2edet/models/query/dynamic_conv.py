"""Sparse R-CNN's dynamic instance interaction (``DynamicConv``) and one decoder stage (``DIIStage``).

Spec ``query.md`` 1.2 "DIIHead" (MMDetection 2.x ``mmdet/models/utils/transformer.py: DynamicConv`` and
``mmdet/models/roi_heads/bbox_heads/dii_head.py: DIIHead``); D-RMM (spec 3.2) keeps this trunk and only widens the
two output layers (``common.StageOutput(drmm=True)``).
"""

from __future__ import annotations

from torch import Tensor, nn

from e2edet.models.query.common import FFN, StageOutput

__all__ = ["DynamicConv", "DIIStage"]


class DynamicConv(nn.Module):
    """Dynamic instance interaction: per-proposal 1x1 "convolutions" whose weights are generated from the query.

    ``params = Linear(d -> 2·d·m)(q)`` is split per proposal into ``P1`` (d x m) and ``P2`` (m x d), m =
    ``dynamic_dim`` (64 in Sparse R-CNN). With ``X`` the RoI features reshaped to ``[S·S, d]`` (S = ``pooler_size``):
    ``X = ReLU(LN_m(X·P1))``; ``X = ReLU(LN_d(X·P2))``; flatten to ``S·S·d`` (position-major, as mmdet's
    ``[B·N, 49, d].flatten(1)``) -> ``ReLU(LN_d(Linear(S·S·d -> d)))``.
    At d = 256, m = 64, S = 7: generator output width 32768, ``fc_layer`` input 12544 (spec 1.8 #1).

    Args:
        dim: query / RoI feature width ``d``. dynamic_dim: ``m``. pooler_size: RoIAlign output side ``S``.
    """

    def __init__(self, dim: int = 256, dynamic_dim: int = 64, pooler_size: int = 7):
        super().__init__()
        self.dim, self.dynamic_dim = dim, dynamic_dim
        self.num_params = dim * dynamic_dim
        self.dynamic_layer = nn.Linear(dim, 2 * self.num_params)
        self.norm_in = nn.LayerNorm(dynamic_dim)
        self.norm_out = nn.LayerNorm(dim)
        self.activation = nn.ReLU(inplace=True)
        self.fc_layer = nn.Linear(dim * pooler_size * pooler_size, dim)
        self.fc_norm = nn.LayerNorm(dim)

    def forward(self, query: Tensor, roi_feats: Tensor) -> Tensor:
        """``query`` ``[R, d]`` (R = B·N proposals), ``roi_feats`` ``[R, d, S, S]`` -> ``[R, d]``.

        Raises:
            ValueError: mismatched numbers of proposals or channels.
        """
        if query.shape[0] != roi_feats.shape[0] or roi_feats.shape[1] != self.dim:
            raise ValueError(f"DynamicConv: query {tuple(query.shape)} and RoI features {tuple(roi_feats.shape)} "
                             f"must be [R, {self.dim}] and [R, {self.dim}, S, S]")
        params = self.dynamic_layer(query)
        param_in = params[:, : self.num_params].view(-1, self.dim, self.dynamic_dim)
        param_out = params[:, self.num_params:].view(-1, self.dynamic_dim, self.dim)
        x = roi_feats.flatten(2).transpose(1, 2)  # [R, S·S, d]
        x = self.activation(self.norm_in(x @ param_in))
        x = self.activation(self.norm_out(x @ param_out))
        return self.activation(self.fc_norm(self.fc_layer(x.flatten(1))))


class DIIStage(nn.Module):
    """One Sparse R-CNN decoder stage (mmdet ``DIIHead.forward``), spec ``query.md`` 1.2 steps 1-4.

    1. ``q = LN(q + MHSA(q))`` over the N proposals of each image (mmcv ``MultiheadAttention`` adds the residual
       internally; here it is added exactly once; ``dropout`` is the attention-weight dropout, as in mmcv).
    2. ``q = LN(q + Dropout(DynamicConv(q, RoI features)))``.
    3. ``q = FFN(q)`` (``common.FFN``: residual + LN inside). The result is the stage's content (mmdet ``obj_feat``).
    4. ``common.StageOutput`` (cls 1 layer, reg 3 layers, inner Linear without bias; D-RMM widths with ``drmm``).

    Init (``DIIHead.init_weights``): xavier-uniform on every parameter with more than one dimension; the output
    branches are initialised by ``StageOutput`` (cls prior bias -4.595 for Sparse R-CNN, zero biases for D-RMM).
    ``stage_init="adamixer"`` (not in the official code) then applies AdaMixer's two zero inits (spec 2.2 (e)): the
    weight of the DynamicConv parameter generator (its bias kept) and ``fc_reg``. With the official init and N(0, 1)
    proposal features every query starts with its own random dynamic filters, and every later stage with a random
    box update; until the generator bias outgrows the random part (it moves at most lr per step) a stage cannot
    learn a consistent refinement from its RoI features. Measured on BCCD at 800 iterations: the later stages only
    learned the identity (0.9 AP). With the zero inits every query starts from the same filters and every stage
    from the identity update; the later stages improve on stage 0 as AdaMixer's do (37.4 AP, issue-4 note). D-RMM
    does not need it (likely because every component gets a box gradient from every GT, not only matched ones): it
    trained worse with it on the same budget (15.4 against 39.5 AP), so its CPU recipe keeps ``official``.

    Args:
        dim: query width d. num_classes: K. num_heads: attention heads. dim_feedforward: FFN hidden width.
        dynamic_dim: DynamicConv width m. pooler_size: RoIAlign side S. dropout: dropout probability.
        drmm: D-RMM output layers (1 + K class channels, 8 regression channels).
        stage_init: ``"official"`` (mmdet) or ``"adamixer"`` (zero generator weight and ``fc_reg``, see above).

    Raises:
        ValueError: unknown ``stage_init``.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8, dim_feedforward: int = 2048,
                 dynamic_dim: int = 64, pooler_size: int = 7, dropout: float = 0.0, drmm: bool = False,
                 stage_init: str = "official"):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(dim)
        self.dynamic_conv = DynamicConv(dim, dynamic_dim, pooler_size)
        self.dynamic_dropout = nn.Dropout(dropout)
        self.dynamic_norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim, dim_feedforward, dropout)
        for module in (self.attention, self.dynamic_conv, self.ffn):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        if stage_init not in ("official", "adamixer"):
            raise ValueError(f"unknown stage_init '{stage_init}'; valid: official, adamixer")
        if stage_init == "adamixer":
            nn.init.zeros_(self.dynamic_conv.dynamic_layer.weight)
        self.output = StageOutput(dim, num_classes, cls_layers=1, reg_layers=3, bias=False, drmm=drmm,
                                  zero_init_reg=stage_init == "adamixer")

    def forward(self, query: Tensor, roi_feats: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the stage.

        Args:
            query: ``[B, N, d]`` proposal features (content) of the previous stage.
            roi_feats: ``[B·N, d, S, S]`` RoIAlign features of the stage's input boxes, image-major order.

        Returns:
            ``(content [B, N, d], head)`` with ``head`` from ``StageOutput.forward``: ``pred_logits [B, N, K]``,
            ``box_deltas [B, N, 4]`` and for D-RMM ``pred_fg [B, N]``, ``pred_scales [B, N, 4]``.
        """
        batch, num, dim = query.shape
        query = self.attention_norm(query + self.attention(query, query, query, need_weights=False)[0])
        flat = query.reshape(batch * num, dim)
        flat = self.dynamic_norm(flat + self.dynamic_dropout(self.dynamic_conv(flat, roi_feats)))
        content = self.ffn(flat).view(batch, num, dim)
        return content, self.output(content)
