"""Predictors: run a trained detector (PyTorch weights or an exported ONNX file) on images; write detections JSON,
COCO results JSON and pictures.

Detections are end-to-end: top-k by score with no NMS (unless the recipe's ``test.nms_iou`` asks for it, as
FCOS does). Boxes are ``xyxy`` pixels of the original image.

:class:`Predictor` (PyTorch) and :class:`OnnxPredictor` (onnxruntime, an ONNX file written by
:func:`e2edet.export.export_onnx`) share everything but the network call: the input conversion
(:func:`as_images`), the preprocessing (:class:`Preprocessing`: resize by the shortest-edge rule, normalise, pad),
batching, and :meth:`BasePredictor.predict_files`.
"""

from __future__ import annotations

from pathlib import Path

from e2edet.data.coco import read_image
from e2edet.inference.base import BasePredictor
from e2edet.inference.inputs import (
    IMAGE_EXTENSIONS,
    ImageInput,
    Preprocessing,
    as_images,
    list_images,
)
from e2edet.inference.onnx_predictor import ONNX_FORMAT, OnnxPredictor
from e2edet.inference.outputs import DEFAULT_SCORE, coco_results, draw_detections
from e2edet.inference.predictor import Predictor

__all__ = ["DEFAULT_SCORE", "IMAGE_EXTENSIONS", "ONNX_FORMAT", "BasePredictor", "ImageInput", "OnnxPredictor",
           "Predictor", "Preprocessing", "as_images", "coco_results", "draw_detections", "list_images",
           "load_predictor", "read_image"]


def load_predictor(weights: str | Path, device: str = "auto") -> BasePredictor:
    """:class:`OnnxPredictor` for a ``.onnx`` file, else :meth:`Predictor.from_weights` (run folder, checkpoint
    folder or ``.safetensors``). Raises what those raise."""
    if Path(weights).suffix.lower() == ".onnx":
        return OnnxPredictor(weights, device=device)
    return Predictor.from_weights(weights, device=device)
