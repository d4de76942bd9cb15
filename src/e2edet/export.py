"""ONNX export of an end-to-end detector, checked against onnxruntime.

The exported graph is the whole detector *and* its NMS-free post-processing: ``images [B, 3, H, W]`` (normalised
RGB, ``H``/``W`` fixed at export, multiples of 32) → ``boxes [B, N, 4]`` (xyxy pixels of the input),
``scores [B, N]`` and ``labels [B, N]`` (int64), the top ``N = test.max_detections`` (point, class) pairs by the
recipe's score. There is no NMS node: DeFCN's own inference is a sort and top-k (``specs/dense.md`` §2.5; the
per-level top-1000 and 0.05 threshold are no-ops for the top 100 and, as the DeFCN maintainer says in issue #11,
can be dropped). Recipes whose evaluation needs NMS (FCOS) are refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from e2edet.config import Config
from e2edet.models.dense.postprocess import class_probabilities
from e2edet.models.query.postprocess import query_scores


#: Score modes whose top-k is the final output (no NMS): POTO, DeFCN, O2F, Sparse R-CNN / AdaMixer, D-RMM.
END_TO_END_SCORES = ("cls", "cls_filter", "cls_ctr", "drmm")


class EndToEndDetector(nn.Module):
    """Detector + top-k post-processing as one traceable module (see the module docstring for shapes).

    Args:
        model: a detector obeying the model contract (``docs/architecture.md``): dense or query-based.
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
        ValueError: an FCOS-style recipe (needs NMS), or a size that is not a multiple of 32.
        RuntimeError: onnxruntime's boxes (> 0.01 px) or scores (> 1e-4) differ from PyTorch's on a random input.
    """
    if cfg.test.nms_iou > 0:
        raise ValueError(f"{cfg.name} is evaluated with NMS (test.nms_iou={cfg.test.nms_iou}); export an end-to-end "
                         "recipe (poto, poto_3dmf, defcn, o2f, sparse_rcnn, adamixer, drmm_*)")
    if height % 32 or width % 32:
        raise ValueError(f"export size must be a multiple of 32, got {height}x{width}")
    import onnxruntime as ort

    wrapper = EndToEndDetector(model, cfg.test.score, cfg.test.max_detections).eval()
    example = torch.randn(1, 3, height, width)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings():
        # The TorchScript exporter (no onnxscript dependency) warns that it is legacy, and the tracer that the input
        # size becomes a constant: both are intended, the spatial size is fixed at export and checked below.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (example,), str(tmp), input_names=["images"],
                          output_names=["boxes", "scores", "labels"], opset_version=opset, dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in ("images", "boxes", "scores", "labels")})
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(example)]
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": example.numpy()})
    box_diff = float(np.abs(ref[0] - got[0]).max())
    score_diff = float(np.abs(ref[1] - got[1]).max())
    if box_diff > 1e-2 or score_diff > 1e-4:  # pixels; probabilities
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{out}: onnxruntime differs from PyTorch (boxes {box_diff:.3g} px, scores {score_diff:.3g})")
    tmp.replace(out)
    return out
