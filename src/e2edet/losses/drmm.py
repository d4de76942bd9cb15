"""D-RMM mixture criterion (regularised mixture model): mixture NLL + MCM, for Sparse R-CNN and AdaMixer heads.

Source: ``specs/query.md`` §3.2 (scale floor, Cauchy box density), §3.4 (losses, 1e-12 floors, MCM, empty-GT case) and
the official ``lhj815/D-RMM`` ``mmdet/models/roi_heads/bbox_heads/dii_drmm_head.py`` (``DII_DRMMHead.loss``,
``cauchy_pdf``, ``gaussian_pdf``, ``log_student_t_pdf``). The official code multiplies densities in linear space; here
everything is in log space (and at least fp32, autocast off) with the same 1e-12 floors:
``NLL_i = -logaddexp(logsumexp_k log comp_ik, log 1e-12)`` and
``MCM_i = -logaddexp(log M_i - logaddexp(log S_i, log 1e-12), log 1e-12)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COORD_DISTS = ("cauchy", "gaussian", "student_t")
LOG_EPS = math.log(1e-12)  # the official "+ 1e-12" floors, in log space
# log comp values below this are clamped (comp < e^-1e4, i.e. far below any floor): keeps -inf (comp = 0, fp32
# underflow) out of logsumexp, whose backward would otherwise give NaN. Changes no value or gradient visibly.
MIN_LOG_COMP = -1.0e4


def cauchy_log_pdf(x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """Elementwise ``log Cauchy(x | loc, scale) = -log(pi·s) - log(1 + ((x - loc)/s)^2)`` (spec §3.2); broadcasts."""
    z = (x - loc) / scale
    return -math.log(math.pi) - torch.log(scale) - torch.log1p(z * z)


def gaussian_log_pdf(x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """Elementwise normal log density with std ``scale`` (official ``gaussian_pdf``, unused by the configs)."""
    z = (x - loc) / scale
    return -0.5 * z * z - torch.log(scale) - 0.5 * math.log(2.0 * math.pi)


def student_t_log_pdf(x: Tensor, loc: Tensor, scale: Tensor, dof: float = 1.0) -> Tensor:
    """Elementwise Student-t log density (``torch.distributions.StudentT(dof, loc, scale)``); ``dof = 1`` is Cauchy."""
    return torch.distributions.StudentT(dof, loc, scale, validate_args=False).log_prob(x)


def coord_log_density(
    gt_boxes: Tensor, pred_boxes: Tensor, scales: Tensor, coord_dist: str = "cauchy", dof: float = 1.0
) -> Tensor:
    """Log box density ``log B_k(g_i) = sum_d log p(g_id | mu_kd, s_kd)`` (factorised over x1, y1, x2, y2).

    Args:
        gt_boxes: ``[G, 4]`` GT boxes, xyxy pixels.
        pred_boxes: ``[N, 4]`` component locations mu, xyxy pixels.
        scales: ``[N, 4]`` final (floored) scales in pixels, > 0.
        coord_dist: ``"cauchy"`` (default, the configs), ``"gaussian"`` or ``"student_t"``.
        dof: degrees of freedom of ``"student_t"`` (official ``t_freedom``).
    Returns:
        ``[G, N]`` log densities, in the dtype of the inputs.
    Raises:
        ValueError: for an unknown ``coord_dist``.
    """
    x, loc, s = gt_boxes[:, None, :], pred_boxes[None, :, :], scales[None, :, :]
    if coord_dist == "cauchy":
        log_pdf = cauchy_log_pdf(x, loc, s)
    elif coord_dist == "gaussian":
        log_pdf = gaussian_log_pdf(x, loc, s)
    elif coord_dist == "student_t":
        log_pdf = student_t_log_pdf(x, loc, s, dof)
    else:
        raise ValueError(f"coord_dist must be one of {COORD_DISTS}, got {coord_dist!r}")
    return log_pdf.sum(dim=-1)


def floored_scales(pred_scales: Tensor, pred_boxes: Tensor, min_scale_ratio: float = 0.04) -> Tensor:
    """``s = max(pred_scales, min_scale_ratio · (w, h, w, h))`` of the predicted box mu (spec §3.2, ``min_sc_ratio``).

    Args:
        pred_scales: ``[..., 4]`` softplus scales in pixels.
        pred_boxes: ``[..., 4]`` mu, xyxy pixels; ``w = x2 - x1``, ``h = y2 - y1``. NOT detached: when the floor is
            active the scale gradient flows into the box (as in the official code).
    Returns:
        ``[..., 4]`` scales in pixels.
    """
    wh = pred_boxes[..., 2:4] - pred_boxes[..., 0:2]
    return torch.maximum(pred_scales, min_scale_ratio * torch.cat([wh, wh], dim=-1))


def mixture_log_components(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    pred_boxes: Tensor,
    scales: Tensor,
    fg_logits: Tensor,
    cls_logits: Tensor,
    prob_weight: float = 1.0,
    coord_dist: str = "cauchy",
    dof: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log mixture components of one image (spec §3.4).

    ``log comp_ik = log G + log pi_k + log B_k(g_i) + prob_weight · log p_k(c_i)`` with
    ``pi_k = sigmoid(f_k) / sum_j sigmoid(f_j)`` over the image's N components (``logsigmoid(f) -
    logsumexp(logsigmoid(f))``) and ``p_k = softmax`` over the K class logits (no background).

    Args:
        gt_boxes: ``[G, 4]`` xyxy pixels; gt_labels: ``[G]`` int64 in ``[0, K)``.
        pred_boxes: ``[N, 4]`` mu, xyxy pixels; scales: ``[N, 4]`` final scales (see :func:`floored_scales`).
        fg_logits: ``[N]`` foreground logits f; cls_logits: ``[N, K]`` softmax class logits.
        prob_weight, coord_dist, dof: see :class:`DRMMCriterion`.
    Returns:
        ``(log_comp, log_comp_mcm)``, both ``[G, N]``; ``log_comp_mcm`` is the same sum with the box-density term
        detached (official ``mcm_coord_detach=True``; mix and class terms keep their gradients).
    """
    num_gt = gt_boxes.shape[0]
    log_fg = F.logsigmoid(fg_logits)
    log_mix = log_fg - torch.logsumexp(log_fg, dim=0)
    log_cls = F.log_softmax(cls_logits, dim=-1)[:, gt_labels].T  # [G, N]
    base = math.log(num_gt) + log_mix[None, :] + prob_weight * log_cls
    log_box = coord_log_density(gt_boxes, pred_boxes, scales, coord_dist, dof)
    return base + log_box, base + log_box.detach()


def drmm_nll_mcm(log_comp: Tensor, log_comp_mcm: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-GT mixture NLL and MCM with the official 1e-12 floors, in log space (spec §3.4).

    ``NLL_i = -log(sum_k comp_ik + 1e-12)``; ``MCM_i = -log(M_i / (S_i + 1e-12) + 1e-12)`` with ``M_i = max_k
    comp'_ik``, ``S_i = sum_k comp'_ik``. Log comp values are clamped at ``MIN_LOG_COMP`` (so ``comp = 0``/``-inf``
    logs give finite values and gradients).

    Args:
        log_comp: ``[G, N]`` log comp (any float dtype; computed in it).
        log_comp_mcm: ``[G, N]`` log comp' for MCM (box density detached); ``None`` = ``log_comp``.
    Returns:
        ``(nll, mcm)``, both ``[G]``.
    Raises:
        ValueError: if the inputs are not 2-D of the same shape.
    """
    if log_comp_mcm is None:
        log_comp_mcm = log_comp
    if log_comp.dim() != 2 or log_comp_mcm.shape != log_comp.shape:
        raise ValueError(f"log_comp / log_comp_mcm must be [G, N] of one shape, got {tuple(log_comp.shape)} / "
                         f"{tuple(log_comp_mcm.shape)}")
    log_eps = log_comp.new_tensor(LOG_EPS)
    log_comp = log_comp.clamp_min(MIN_LOG_COMP)
    log_comp_mcm = log_comp_mcm.clamp_min(MIN_LOG_COMP)
    nll = -torch.logaddexp(torch.logsumexp(log_comp, dim=1), log_eps)
    log_ratio = log_comp_mcm.max(dim=1).values - torch.logaddexp(torch.logsumexp(log_comp_mcm, dim=1), log_eps)
    mcm = -torch.logaddexp(log_ratio, log_eps)
    return nll, mcm


class DRMMCriterion(nn.Module):
    """D-RMM loss on every stage: sum over all GTs of ``mm_weight · (NLL_i + mcm_weight · MCM_i)``. No parameters.

    Source: spec §3.4 / official ``DII_DRMMHead.loss`` with ``loss_reduction='sum'`` (no division by #GT, no
    all-reduce). Computed per image (pi is normalised over the image's N components), vectorised over GTs and
    components, in at least fp32 with autocast disabled.

    Empty-GT image: a fake GT with the (detached) box of the component with the largest fg and, as a deviation from
    the official random class drawn with ``torch.randint(...).cuda()``, the argmax class of that component
    (deterministic, device-agnostic); its loss is multiplied by 1e-12 so every output stays in the graph.

    Args:
        num_classes: K (class logits per component, no background).
        min_scale_ratio: scale floor ratio (0.04).
        mm_weight, mcm_weight, prob_weight: loss weights (1.0, 0.5) and class-term exponent (1.0).
        coord_dist: ``"cauchy"`` (default), ``"gaussian"`` or ``"student_t"``; dof: Student-t degrees of freedom.
    Raises:
        ValueError: for an unknown ``coord_dist``.
    """

    def __init__(
        self,
        num_classes: int,
        min_scale_ratio: float = 0.04,
        mm_weight: float = 1.0,
        mcm_weight: float = 0.5,
        prob_weight: float = 1.0,
        coord_dist: str = "cauchy",
        dof: float = 1.0,
    ) -> None:
        super().__init__()
        if coord_dist not in COORD_DISTS:
            raise ValueError(f"coord_dist must be one of {COORD_DISTS}, got {coord_dist!r}")
        self.num_classes = int(num_classes)
        self.min_scale_ratio = float(min_scale_ratio)
        self.mm_weight = float(mm_weight)
        self.mcm_weight = float(mcm_weight)
        self.prob_weight = float(prob_weight)
        self.coord_dist = coord_dist
        self.dof = float(dof)

    def _check(self, outputs: dict, targets: list[dict]) -> list[dict]:
        stages = outputs.get("stages") if isinstance(outputs, dict) else None
        if not isinstance(stages, (list, tuple)) or not stages:
            raise ValueError("outputs['stages'] must be a non-empty list of per-stage dicts")
        for s, stage in enumerate(stages):
            for key in ("pred_logits", "pred_fg", "pred_boxes", "pred_scales"):
                if key not in stage:
                    raise ValueError(f"outputs['stages'][{s}] has no {key!r}")
            bsz, n = stage["pred_fg"].shape[:2] if stage["pred_fg"].dim() == 2 else (-1, -1)
            expect = {"pred_logits": (bsz, n, self.num_classes), "pred_fg": (bsz, n),
                      "pred_boxes": (bsz, n, 4), "pred_scales": (bsz, n, 4)}
            for key, shape in expect.items():
                if bsz < 0 or tuple(stage[key].shape) != shape:
                    raise ValueError(f"outputs['stages'][{s}][{key!r}] has shape {tuple(stage[key].shape)}, "
                                     f"expected {'[B, N]' if bsz < 0 else shape} (K = {self.num_classes})")
            if bsz != len(targets):
                raise ValueError(f"outputs['stages'][{s}] has batch size {bsz} but {len(targets)} targets were given")
        for b, t in enumerate(targets):
            boxes, labels = t["boxes"], t["labels"]
            if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
                raise ValueError(f"targets[{b}]: 'boxes' must be [G, 4] and 'labels' [G], got "
                                 f"{tuple(boxes.shape)} / {tuple(labels.shape)}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"targets[{b}]['labels'] out of [0, {self.num_classes})")
        return list(stages)

    def image_terms(self, stage: dict, b: int, target: dict) -> tuple[Tensor, Tensor, bool]:
        """Per-GT ``(nll [G], mcm [G], empty)`` of image ``b`` for one stage dict (fp32 or wider, autocast off)."""
        dtype = torch.promote_types(stage["pred_boxes"].dtype, torch.float32)
        mu = stage["pred_boxes"][b].to(dtype)
        fg = stage["pred_fg"][b].to(dtype)
        cls_logits = stage["pred_logits"][b].to(dtype)
        boxes, labels = target["boxes"].to(device=mu.device, dtype=dtype), target["labels"].to(mu.device)
        empty = boxes.shape[0] == 0
        if empty:  # fake GT, spec §3.4; class = argmax of that component (deviation: official is random + .cuda())
            k = fg.argmax()
            boxes = mu[k].detach()[None]
            labels = cls_logits[k].argmax()[None]
        scales = floored_scales(stage["pred_scales"][b].to(dtype), mu, self.min_scale_ratio)
        log_comp, log_comp_mcm = mixture_log_components(
            boxes, labels, mu, scales, fg, cls_logits, self.prob_weight, self.coord_dist, self.dof
        )
        nll, mcm = drmm_nll_mcm(log_comp, log_comp_mcm)
        return nll, mcm, empty

    def forward(self, outputs: dict, targets: list[dict], epoch: int = 0, max_epoch: int = 1) -> dict[str, Tensor]:
        """Compute the stage losses of one batch.

        Args:
            outputs: ``{"stages": [stage dicts]}`` (``docs/architecture.md``); each stage dict holds
                ``pred_logits [B, N, K]`` class logits, ``pred_fg [B, N]`` fg logits, ``pred_boxes [B, N, 4]``
                mu (xyxy pixels of the network input), ``pred_scales [B, N, 4]`` softplus scales (pixels, > 0,
                before the floor).
            targets: B dicts with ``boxes float [G, 4]`` xyxy pixels and ``labels int64 [G]`` (``G = 0`` allowed).
            epoch, max_epoch: unused (criterion interface).
        Returns:
            ``stage{s}_mm_loss`` (summed over GTs) for every stage; statistics ``num_gt`` and
            ``stage{last}_mean_nll`` / ``stage{last}_mean_mcm`` (means over the real GTs; detached).
        Raises:
            ValueError: for a missing key, a bad shape, a batch-size mismatch or a label out of range.
        """
        del epoch, max_epoch
        stages = self._check(outputs, targets)
        device = stages[0]["pred_boxes"].device
        out: dict[str, Tensor] = {}
        with torch.autocast(device_type=device.type, enabled=False):
            for s, stage in enumerate(stages):
                terms, nlls, mcms = [], [], []
                for b, target in enumerate(targets):
                    nll, mcm, empty = self.image_terms(stage, b, target)
                    term = (self.mm_weight * (nll + self.mcm_weight * mcm)).sum()
                    terms.append(term * 1e-12 if empty else term)
                    if not empty:
                        nlls.append(nll.detach())
                        mcms.append(mcm.detach())
                out[f"stage{s}_mm_loss"] = torch.stack(terms).sum()
        num_gt = sum(int(t["boxes"].shape[0]) for t in targets)
        out["num_gt"] = torch.tensor(float(num_gt), device=device)
        last = len(stages) - 1
        zero = torch.zeros((), device=device)
        out[f"stage{last}_mean_nll"] = torch.cat(nlls).mean().float() if num_gt else zero
        out[f"stage{last}_mean_mcm"] = torch.cat(mcms).mean().float() if num_gt else zero
        return out
