"""ONNX export of an end-to-end detector, checked against onnxruntime.

The exported graph is the whole detector *and* its NMS-free post-processing: ``images [B, 3, H, W]`` (normalised
RGB, ``H``/``W`` fixed at export, multiples of 32) → ``boxes [B, N, 4]`` (xyxy pixels of the input),
``scores [B, N]`` and ``labels [B, N]`` (int64), the top ``N = test.max_detections`` (point, class) pairs by the
recipe's score. There is no NMS node: DeFCN's own inference is a sort and top-k (``specs/dense.md`` §2.5; the
per-level top-1000 and 0.05 threshold are no-ops for the top 100 and, as the DeFCN maintainer says in issue #11,
can be dropped). Recipes whose evaluation needs NMS (FCOS) are refused.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from e2edet.config import Config, ConfigError
from e2edet.models.dense.postprocess import class_probabilities
from e2edet.models.query.postprocess import query_scores
from e2edet.utils import error_text


#: Score modes whose top-k is the final output (no NMS): POTO, DeFCN, O2F, Sparse R-CNN / AdaMixer, D-RMM, Deformable
#: DETR (its deformable attention exports as ``GridSample``, opset >= 16).
END_TO_END_SCORES = ("cls", "cls_filter", "cls_ctr", "drmm")

#: Largest export side in pixels (a guard against typos such as 41600x576 that would exhaust memory).
MAX_SIDE = 8192


class ExportError(ConfigError):
    """Bad export input: a recipe that needs NMS, an input size that is not ``HxW`` positive multiples of 32, or
    an output path that cannot be written. The one-line message names the option or the path."""


class ExportMismatchError(RuntimeError):
    """The exported graph's detections, run by onnxruntime, differ from PyTorch's (see :func:`compare_detections`).

    Not a user input error: the command line ends with exit status :attr:`exit_code` and the one-line message,
    which names the ONNX file and the worst difference.
    """

    exit_code = 1


def _import_onnxruntime():
    """``onnxruntime`` (and a check that ``onnx``, which the exporter needs, is installed).

    Raises:
        ExportError: either package is missing, with the command that installs them.
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"ONNX export needs the onnx and onnxruntime packages ({error_text(err)}); install the "
                          'export extra: pip install "e2edet[export]"') from err
    return onnxruntime


def check_size(height: int, width: int, key: str = "size") -> tuple[int, int]:
    """Check an export input size: positive multiples of 32 (the detectors' largest stride), at most
    :data:`MAX_SIDE`.

    Raises:
        ExportError: naming ``key`` (``--size`` on the command line), with the nearest valid size.
    """
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or height % 32 or width % 32:
        near = "x".join(str(min(MAX_SIDE, max(32, round(v / 32) * 32))) for v in (height, width))
        raise ExportError(f"{key} {height}x{width}: height and width must be multiples of 32 between 32 and "
                          f"{MAX_SIDE} pixels, e.g. {near}")
    return height, width


def parse_size(text: str, key: str = "--size") -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``416x576``) into ``(height, width)`` and :func:`check_size` it.

    Raises:
        ExportError: not two integers joined by ``x``, or a size :func:`check_size` refuses; names ``key``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if match is None:
        raise ExportError(f"{key} {text!r}: expected HEIGHTxWIDTH in pixels, multiples of 32, e.g. 416x576")
    return check_size(int(match.group(1)), int(match.group(2)), key)


def _check_writable(out: Path) -> Path:
    """Create ``out``'s folder and probe that ``out``'s temporary sibling can be written; returns that sibling.

    Raises:
        ExportError: ``out`` is a folder, its folder cannot be created, or the file cannot be written (names
        ``out`` and the system's reason).
    """
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give the ONNX file to write, e.g. {out / 'model.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"{out}: cannot create the folder {out.parent} ({err.strerror or err})") from err
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb"):
            pass
    except OSError as err:
        raise ExportError(f"{out}: cannot write the ONNX file there ({err.strerror or err})") from err
    return tmp


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy ``box`` with each row of ``boxes`` ([M, 4]); 0 where the union is empty."""
    lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


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


class EndToEndDetector(nn.Module):
    """Detector + top-k post-processing as one traceable module (see the module docstring for shapes).

    Args:
        model: a detector obeying the model contract (``docs/architecture.md``): dense, query-based or DETR.
        score: ``cls`` (sigmoid of the logits), ``cls_filter`` (times sigmoid of the 3DMF filter logit), ``cls_ctr``
            (O2F: times sigmoid of the centerness logit) or ``drmm`` (D-RMM: softmax of the class logits times
            sigmoid of the foreground logit).
        max_detections: ``N``, detections per image.
    Raises:
        ValueError: an unsupported score mode.
    """

    def __init__(self, model: nn.Module, score: str, max_detections: int):
        super().__init__()
        if score not in END_TO_END_SCORES:
            raise ValueError(f"score mode {score!r} is not end-to-end (export supports {', '.join(END_TO_END_SCORES)})")
        self.model, self.score, self.max_detections = model, score, max_detections

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(images)
        prob = query_scores(out, "drmm") if self.score == "drmm" else class_probabilities(out, self.score)
        num_classes = prob.shape[-1]
        scores, index = prob.flatten(1).topk(min(self.max_detections, prob.shape[1] * num_classes), dim=1)
        point = torch.div(index, num_classes, rounding_mode="floor")
        boxes = out["pred_boxes"].gather(1, point.unsqueeze(-1).expand(-1, -1, 4))
        return boxes, scores, index % num_classes


def export_onnx(model: nn.Module, cfg: Config, out: str | Path, height: int, width: int, opset: int = 17) -> Path:
    """Export ``model`` (with its end-to-end post-processing) to ONNX and check it with onnxruntime.

    Args:
        model: the trained detector; cfg: its config (score mode, max detections).
        out: ``.onnx`` path to write. height, width: input size in pixels, multiples of 32 (batch is dynamic).
    Returns:
        The written path.
    Raises:
        ExportError (a ``ConfigError``): an FCOS-style recipe (needs NMS), a size that is not a positive multiple
            of 32, an ``out`` that cannot be written, or ``onnx``/``onnxruntime`` not installed.
        ExportMismatchError: onnxruntime's detections on a random input differ from PyTorch's when compared as sets
            (:func:`compare_detections`: same labels, scores within 1e-4, boxes IoU >= 0.99 or within 0.05 px;
            near-ties at the top-k cut-off may differ); the message names ``out`` and the worst difference.
    """
    if cfg.test.nms_iou > 0:
        raise ExportError(f"{cfg.name} is evaluated with NMS (test.nms_iou={cfg.test.nms_iou}); export an end-to-end "
                          "recipe (poto, poto_3dmf, defcn, o2f, sparse_rcnn, adamixer, drmm_*, deformable_detr*)")
    check_size(height, width)
    ort = _import_onnxruntime()

    wrapper = EndToEndDetector(model, cfg.test.score, cfg.test.max_detections).eval()
    example = torch.randn(1, 3, height, width)
    out = Path(out)
    tmp = _check_writable(out)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter (no onnxscript dependency) warns that it is legacy, and the tracer that the
            # input size becomes a constant: both are intended, the spatial size is fixed at export and checked below.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(wrapper, (example,), str(tmp), input_names=["images"],
                              output_names=["boxes", "scores", "labels"], opset_version=opset, dynamo=False,
                              dynamic_axes={name: {0: "batch"} for name in ("images", "boxes", "scores", "labels")})
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(example)]
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": example.numpy()})
        problems = compare_detections(tuple(ref), tuple(got))
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ExportMismatchError(f"{out}: onnxruntime differs from PyTorch on a random input; worst difference: "
                                      f"{problems[0]}{more}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out
