"""FCOS-style dense head shared by FCOS, POTO and DeFCN (3DMF), applied to every FPN level.

Spec ``dense.md`` 1.2 (cvpods ``fcos.py`` ``FCOSHead`` with ``NORM_REG_TARGETS=True``, ``CENTERNESS_ON_REG=True``),
2.2 (DeFCN ``fcos.py`` ``FCOSHead`` with ``max3d`` and ``filter``) and 3.2 (O2F ``o2f_head.py`` ``O2FHead._init_layers``:
three 64-channel convs before the centerness/objectness map).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from e2edet.models.dense.layers import Scale, group_norm, init_head_modules
from e2edet.models.dense.max_filter import MaxFiltering3D

__all__ = ["BOX_CODERS", "DenseHead"]

#: Box regression of the head: FCOS (l, t, r, b) distances, or DeFCN Anchor's (dx, dy, dw, dh) deltas of one square
#: anchor per location (``anchor.res50.fpn.coco.800size.3x_ms``: ``Box2BoxTransform``, no ``Scale``).
BOX_CODERS = ("ltrb", "anchor_deltas")


def _tower(channels: int, num_convs: int, out_channels: int | None = None) -> nn.Sequential:
    """``num_convs`` x [3x3 conv (bias) -> GroupNorm(32) -> ReLU], ``channels -> out_channels -> ... -> out_channels``
    (``out_channels`` defaults to ``channels``)."""
    out_channels = channels if out_channels is None else out_channels
    layers: list[nn.Module] = []
    for i in range(num_convs):
        c_in = channels if i == 0 else out_channels
        layers += [nn.Conv2d(c_in, out_channels, 3, padding=1), group_norm(out_channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DenseHead(nn.Module):
    """Classification + (l, t, r, b) regression head with optional centerness or 3DMF filter branch.

    Structure (weights shared across levels): a cls tower and a reg tower, each ``num_convs`` x [3x3 conv,
    GroupNorm(32 groups; fewer for narrow models, see ``layers.group_norm``), ReLU]; ``cls_score`` 3x3 conv -> K on
    the cls tower; ``bbox_pred`` 3x3 conv -> 4 on the reg tower, box = ReLU(Scale_l · conv) · stride_l in pixels
    (``box_coder="ltrb"``, ``NORM_REG_TARGETS=True``) or the raw conv output as anchor deltas (``"anchor_deltas"``:
    no ``Scale``, no ReLU, no stride; DeFCN ``anchor.res50.fpn.coco.800size.3x_ms/fcos.py`` ``FCOSHead``);
    optional ``centerness`` 3x3 conv -> 1 on the **reg** tower (FCOS imprv), optionally preceded by ``ctr_convs`` x
    [3x3 conv, GN, ReLU] of ``ctr_channels`` (O2F: 3 x 64, the "lightweight convs before the centerness map");
    optional 3DMF (``MaxFiltering3D`` on the reg tower outputs of all levels) followed by the ``filter`` 3x3 conv -> 1
    (DeFCN); optional ``controller`` 3x3 conv -> ``mask_params`` on the **reg** tower (CondInst: the 169 parameters
    of each point's dynamic mask head, official ``condinst_head.py`` ``self.controller``).

    Init: every conv N(0, 0.01) with bias 0 (3DMF conv included), GN weight 1 bias 0, ``cls_score`` bias
    ``-log((1 - prior_prob) / prior_prob)`` (= -4.595 for 0.01), ``Scale`` 1.0.

    Args:
        in_channels: FPN channels ``C``.
        num_classes: ``K``.
        num_levels: number of FPN levels (one ``Scale`` each).
        num_convs: tower depth (4 in FCOS).
        prior_prob: initial foreground probability of the cls branch.
        centerness: add the FCOS centerness branch.
        ctr_convs, ctr_channels: extra convs (and their width) between the reg tower and the centerness conv (O2F: 3,
            64; 0 = FCOS).
        max_filter: add 3DMF + filter branch (DeFCN).
        max_filter_gn: GroupNorm inside 3DMF (``False`` = ``3dmf_wo_gn``).
        strides: stride of each level in pixels.
        filter_kernel_size, filter_tau: 3DMF spatial kernel and scale extent (3 and 2).
        box_coder: ``"ltrb"`` or ``"anchor_deltas"`` (:data:`BOX_CODERS`).
        mask_params: output channels of the CondInst controller (0 = no controller).

    Raises:
        ValueError: when ``len(strides) != num_levels`` or for an unknown ``box_coder``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int = 5,
        num_convs: int = 4,
        prior_prob: float = 0.01,
        centerness: bool = False,
        max_filter: bool = False,
        max_filter_gn: bool = True,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        filter_kernel_size: int = 3,
        filter_tau: int = 2,
        ctr_convs: int = 0,
        ctr_channels: int = 64,
        box_coder: str = "ltrb",
        mask_params: int = 0,
    ):
        super().__init__()
        if len(strides) != num_levels:
            raise ValueError(f"{len(strides)} strides given for {num_levels} levels")
        if box_coder not in BOX_CODERS:
            raise ValueError(f"box_coder must be one of {BOX_CODERS}, got {box_coder!r}")
        self.box_coder = box_coder
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.strides = [int(s) for s in strides]
        self.cls_tower = _tower(in_channels, num_convs)
        self.reg_tower = _tower(in_channels, num_convs)
        self.cls_score = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        # no Scale with anchor deltas: it would get no gradient (and DDP would report unused parameters)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)]) if box_coder == "ltrb" else None
        self.ctr_tower = _tower(in_channels, ctr_convs, ctr_channels) if centerness and ctr_convs > 0 else None
        ctr_in = ctr_channels if self.ctr_tower is not None else in_channels
        self.centerness = nn.Conv2d(ctr_in, 1, 3, padding=1) if centerness else None
        if max_filter:
            self.max3d = MaxFiltering3D(in_channels, filter_kernel_size, filter_tau, use_gn=max_filter_gn)
            self.filter = nn.Conv2d(in_channels, 1, 3, padding=1)
        else:
            self.max3d, self.filter = None, None
        self.controller = nn.Conv2d(in_channels, mask_params, 3, padding=1) if mask_params > 0 else None
        init_head_modules(list(self.children()))
        nn.init.constant_(self.cls_score.bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, features: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Apply the head to FPN levels.

        Args:
            features: ``[P3, ..., P7]``, each ``[B, C, H_l, W_l]``.

        Returns:
            dict of per-level lists: ``cls_logits`` ``[B, K, H_l, W_l]``; ``bbox_ltrb`` ``[B, 4, H_l, W_l]``
            (l, t, r, b) pixels >= 0 (``box_coder="ltrb"``) or ``bbox_deltas`` ``[B, 4, H_l, W_l]`` (dx, dy, dw, dh)
            (``"anchor_deltas"``), always float32; ``centerness`` ``[B, 1, H_l, W_l]`` logits (only with
            ``centerness``); ``filter`` ``[B, 1, H_l, W_l]`` logits (only with ``max_filter``); ``mask_params``
            ``[B, P, H_l, W_l]`` (only with a controller).

        Raises:
            ValueError: when the number of levels differs from ``num_levels``.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"head built for {self.num_levels} levels, got {len(features)}")
        box_key = "bbox_ltrb" if self.box_coder == "ltrb" else "bbox_deltas"
        out: dict[str, list[torch.Tensor]] = {"cls_logits": [], box_key: []}
        if self.centerness is not None:
            out["centerness"] = []
        if self.controller is not None:
            out["mask_params"] = []
        reg_features = []
        for level, x in enumerate(features):
            cls_x = self.cls_tower(x)
            reg_x = self.reg_tower(x)
            out["cls_logits"].append(self.cls_score(cls_x))
            # float32 so pixel distances keep their precision under bf16/fp16 autocast
            box = self.bbox_pred(reg_x).float()
            if self.scales is not None:
                box = F.relu(self.scales[level](box)) * self.strides[level]
            out[box_key].append(box)
            if self.centerness is not None:
                ctr_x = self.ctr_tower(reg_x) if self.ctr_tower is not None else reg_x
                out["centerness"].append(self.centerness(ctr_x))
            if self.controller is not None:
                out["mask_params"].append(self.controller(reg_x))
            reg_features.append(reg_x)
        if self.max3d is not None:
            out["filter"] = [self.filter(y) for y in self.max3d(reg_features)]
        return out
