"""Comparison of two runtimes' detector outputs (e.g. PyTorch vs onnxruntime): top-k detections as sets
(:func:`compare_detections`) and the instance masks of the same detections (:func:`compare_masks`). Used by
:func:`e2edet.export.export_onnx` to check every exported graph, and by the tests.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

__all__ = ["compare_detections", "compare_masks"]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU (``torchvision.ops.box_iou``, float64) of one xyxy ``box`` with each row of ``boxes`` ([M, 4]); 0 where
    the union is empty."""
    iou = box_iou(torch.as_tensor(box, dtype=torch.float64)[None], torch.as_tensor(boxes, dtype=torch.float64))[0]
    return np.nan_to_num(iou.numpy(), nan=0.0)


def compare_detections(
    ref: tuple[np.ndarray, np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray, np.ndarray],
    score_tol: float = 1e-4,
    box_tol: float = 0.05,
    iou_min: float = 0.99,
    tie_tol: float = 1e-5,
) -> list[str]:
    """Compare two runtimes' top-k detections (e.g. PyTorch vs onnxruntime) as *sets*, image by image.

    Index-by-index comparison is wrong for top-k outputs: two (point, class) pairs whose scores tie to within
    float rounding may come out in either order, or one of them may fall just outside the top ``N`` in one
    runtime and just inside in the other. So each reference detection (in descending score order) is matched to
    an unused detection of the other side with

    * the same label,
    * a score within ``score_tol`` (absolute; scores are probabilities), and
    * the same box: IoU >= ``iou_min`` or every coordinate within ``box_tol`` pixels (for tiny boxes),

    choosing the candidate of highest IoU. A detection left unmatched is accepted only at the top-k cut-off: when
    its score is within ``tie_tol`` of (or below) the other side's lowest (``N``-th) score, a near-tie could
    have put it on either side of the cut. Anything else -- a box really elsewhere, a score off by more than
    ``score_tol``, a label swapped, a confident detection missing, non-finite values -- is a difference.
    ``tie_tol`` is tighter than ``score_tol`` because an untrained model's scores crowd together (on a random
    input more than half of the top 100 can lie within 1e-4 of the 100th), while the two runtimes' scores agree
    to ~1e-7.

    Args:
        ref, got: ``(boxes [B, N, 4] xyxy, scores [B, N], labels [B, N])`` arrays (torch tensors are accepted).
        score_tol: absolute score tolerance; box_tol: per-coordinate box tolerance in pixels; iou_min: IoU above
            which two boxes are the same; tie_tol: how close to the cut-off an unmatched detection's score must be.
    Returns:
        One message per difference (empty when the outputs agree), the worst first: shape and non-finite-value
        problems, then unmatched detections by descending score (a confident detection missing is worse than a
        doubtful one), e.g. ``"image 0: reference detection 3 (label 1, score 0.8123, box [10.0, 12.5, 40.0,
        60.0]) has no match (closest same-label box: IoU 0.42, score difference 1.2e-07)"``.
    """
    ref = tuple(np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a) for a in ref)
    got = tuple(np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a) for a in got)
    shapes = [a.shape for a in ref], [a.shape for a in got]
    if shapes[0] != shapes[1]:
        return [f"output shapes differ: reference {shapes[0]} vs {shapes[1]}"]
    problems: list[tuple[float, str]] = []  # (severity, message)
    for b in range(ref[1].shape[0]):
        sides = [(ref[0][b].astype(np.float64), ref[1][b].astype(np.float64), ref[2][b]),
                 (got[0][b].astype(np.float64), got[1][b].astype(np.float64), got[2][b])]
        if not all(np.isfinite(side[0]).all() and np.isfinite(side[1]).all() for side in sides):
            problems.append((float("inf"), f"image {b}: non-finite boxes or scores"))
            continue
        (rb, rs, rl), (gb, gs, gl) = sides
        used = np.zeros(len(gs), dtype=bool)
        unmatched_ref = []
        for i in np.argsort(-rs, kind="stable"):
            cand = np.flatnonzero(~used & (gl == rl[i]) & (np.abs(gs - rs[i]) <= score_tol))
            if len(cand):
                iou = _iou(rb[i], gb[cand])
                ok = (iou >= iou_min) | (np.abs(gb[cand] - rb[i]).max(axis=1) <= box_tol)
                if ok.any():
                    used[cand[ok][np.argmax(iou[ok])]] = True
                    continue
            unmatched_ref.append(i)
        cut_ref, cut_got = (float(rs.min()), float(gs.min())) if len(rs) else (0.0, 0.0)
        for side, index, cut, (boxes, scores, labels), (obox, oscore, olabel) in (
                ("reference", unmatched_ref, cut_got, sides[0], sides[1]),
                ("compared", np.flatnonzero(~used), cut_ref, sides[1], sides[0])):
            for i in index:
                if scores[i] <= cut + tie_tol:  # a near-tie at the top-k cut-off: may fall on either side
                    continue
                same = np.flatnonzero(olabel == labels[i])
                near = ""
                if len(same):
                    iou = _iou(boxes[i], obox[same])
                    j = same[np.argmax(iou)]
                    near = (f" (closest same-label box: IoU {iou.max():.3f}, score difference "
                            f"{abs(oscore[j] - scores[i]):.2g})")
                box = ", ".join(f"{v:.1f}" for v in boxes[i])
                problems.append((float(scores[i]), f"image {b}: {side} detection {int(i)} (label {int(labels[i])}, "
                                                   f"score {scores[i]:.4g}, box [{box}]) has no match{near}"))
    return [message for _, message in sorted(problems, key=lambda p: -p[0])]  # stable: ties keep their order


def compare_masks(ref: list[np.ndarray], got: list[np.ndarray], prob_tol: float = 1e-3) -> list[str]:
    """Compare the ``masks`` outputs (``[B, N, Hm, Wm]`` probabilities, 4th of ``boxes, scores, labels, masks``) of
    two runtimes whose detections :func:`compare_detections` found equal as sets.

    Each reference detection is paired with the other side's detections of the same label, a score within 1e-4
    and a box of IoU >= 0.99 (tied scores may come out in another order; one anchor point emitting two classes
    has one box and one mask); its mask must be within ``prob_tol`` of one of theirs everywhere. A detection with
    no such partner (a near-tie at the top-k cut-off) is skipped.
    Returns one message per difference (empty when the masks agree).
    """
    (rb, rs, rl, rm), (gb, gs, gl, gm) = ref, got
    if rm.shape != gm.shape:
        return [f"mask output shapes differ: reference {rm.shape} vs {gm.shape}"]
    problems = []
    for b in range(rm.shape[0]):
        for i in range(rs.shape[1]):
            partners = np.flatnonzero((gl[b] == rl[b, i]) & (np.abs(gs[b] - rs[b, i]) <= 1e-4))
            partners = partners[_iou(rb[b, i].astype(np.float64), gb[b, partners].astype(np.float64)) >= 0.99]
            if not len(partners):
                continue
            diff = min(float(np.abs(rm[b, i].astype(np.float64) - gm[b, j]).max(initial=0.0)) for j in partners)
            if not diff <= prob_tol:
                problems.append(f"image {b}: mask of detection {i} differs by {diff:.3g} (tolerance {prob_tol:g})")
    return problems
