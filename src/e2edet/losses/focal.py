"""Focal losses: on logits (RetinaNet/FCOS/POTO) and in probability space (DeFCN 3DMF product score).

Source: ``specs/dense.md`` §1.4, §2.4, §2.9; cvpods ``cvpods/modeling/losses/sigmoid_focal_loss.py``
``sigmoid_focal_loss_jit`` and DeFCN ``playground/detection/coco/poto...3dmf/fcos.py`` ``focal_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

_REDUCTIONS = ("none", "mean", "sum")


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """Sigmoid focal loss on **logits**, computed in fp32 (``torchvision.ops.sigmoid_focal_loss``).

    ``FL = BCE_with_logits(x, y) · (1 - p_t)^gamma · alpha_t`` with ``p = sigmoid(x)``,
    ``p_t = p·y + (1-p)(1-y)``, ``alpha_t = alpha·y + (1-alpha)(1-y)``; ``alpha < 0`` disables the alpha term.

    Args:
        logits: ``[...]`` any float dtype (cast to float32).
        targets: same shape, values in ``[0, 1]`` (one-hot class targets).
        alpha, gamma: focal parameters (0.25, 2.0 everywhere in DeFCN/FCOS).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
    Returns:
        float32 tensor, shape of ``logits`` for ``"none"``, else a scalar.
    Raises:
        ValueError: for an unknown ``reduction``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return _tv_sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction=reduction)


def prob_focal_loss(
    prob: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """Focal loss in **probability space**, for scores that are not a single sigmoid (e.g. ``sigmoid(cls)·
    sigmoid(filter)`` in DeFCN's 3DMF variants).

    ``FL = BCE(q, y) · (1 - q_t)^gamma · alpha_t`` with ``q_t = q·y + (1-q)(1-y)``,
    ``alpha_t = alpha·y + (1-alpha)(1-y)``; ``alpha < 0`` disables the alpha term. This is not the logit focal loss
    on ``logit(cls) + logit(filter)``.

    Computed in float32 with autocast disabled (``F.binary_cross_entropy`` refuses to run under CUDA autocast and
    is unsafe in half precision). As in ``F.binary_cross_entropy``, each log term is clamped at ``-100``, so the
    BCE of a saturated wrong prediction is at most 100 per entry (the logit focal loss has no such clamp; the two
    agree when the second factor is 1, up to this clamp).

    Args:
        prob: ``[...]`` probabilities in ``[0, 1]``, any float dtype.
        targets: same shape, values in ``[0, 1]``.
        alpha, gamma: focal parameters.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
    Returns:
        float32 tensor, shape of ``prob`` for ``"none"``, else a scalar.
    Raises:
        ValueError: for an unknown ``reduction``; RuntimeError (from PyTorch) if ``prob`` leaves ``[0, 1]``.
    Source: ``specs/dense.md`` §2.4 "Classification (one-to-one), 3DMF variants"; DeFCN 3DMF ``fcos.py``
    ``focal_loss``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    with torch.autocast(device_type=prob.device.type, enabled=False):
        prob = prob.float()
        targets = targets.float()
        loss = F.binary_cross_entropy(prob, targets, reduction="none")
        q_t = prob * targets + (1 - prob) * (1 - targets)
        loss = loss * (1 - q_t).pow(gamma)
        if alpha >= 0:
            loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            return loss.mean()
        return loss


def soft_focal_loss_with_prob(
    prob: Tensor, labels: Tensor, soft_targets: Tensor, weights: Tensor, beta: float = 2.0, neg_weight: float = 0.75
) -> Tensor:
    """O2F classification loss on the joint probability ``q = sigmoid(cls)·sigmoid(ctr)``, summed (not normalised).

    Every (point, class) entry starts as the negative term ``neg_weight · q^beta · BCE(q, 0)``; for each foreground
    point the entry at its label is **replaced** by ``w · BCE(q, s)`` with its soft target ``s`` and weight ``w`` (no
    ``|s - q|^beta`` modulation and no alpha: not GFL's QFL). In float32 with autocast disabled; each BCE log term is
    clamped at -100 as in ``F.binary_cross_entropy``.

    Args:
        prob: ``[..., K]`` probabilities in ``[0, 1]``.
        labels: ``int64 [...]`` class of each point, ``K`` for background.
        soft_targets, weights: ``float [...]`` (used at foreground points only).
        beta: negative focal exponent (2.0); neg_weight: negative scale (0.75, hard-coded in the official code).
    Returns:
        float32 scalar, the sum over all entries.
    Source: ``specs/dense.md`` §3.4; ``strongwolf/o2f`` ``sfl.py`` ``quality_focal_loss_with_prob``.
    """
    with torch.autocast(device_type=prob.device.type, enabled=False):
        prob = prob.float()
        num_classes = prob.shape[-1]
        neg = F.binary_cross_entropy(prob, torch.zeros_like(prob), reduction="none") * prob.pow(beta) * neg_weight
        pos = labels < num_classes
        q_pos = prob[pos].gather(-1, labels[pos].unsqueeze(-1)).squeeze(-1)
        pos_loss = F.binary_cross_entropy(q_pos, soft_targets[pos].float(), reduction="none") * weights[pos].float()
        neg_at_label = neg[pos].gather(-1, labels[pos].unsqueeze(-1)).squeeze(-1)
        return neg.sum() - neg_at_label.sum() + pos_loss.sum()
