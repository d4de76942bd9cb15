"""The onnxruntime predictor (:class:`OnnxPredictor`) of a file written by :func:`e2edet.export.export_onnx`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torchvision import ops as tv_ops

from e2edet.config import ConfigError
from e2edet.config_checks import parse_device
from e2edet.engine.device import DeviceError
from e2edet.inference.base import BasePredictor
from e2edet.inference.inputs import Preprocessing
from e2edet.inference.outputs import DEFAULT_SCORE
from e2edet.models.dense.mask_postprocess import paste_masks
from e2edet.ops.boxes import rescale_boxes
from e2edet.utils import error_text

#: ``e2edet_format`` of the ONNX metadata this version writes and reads (see :func:`e2edet.export.onnx_metadata`).
ONNX_FORMAT = "e2edet-onnx-v1"


def _onnx_providers(device: str, ort: Any) -> list[str]:
    """onnxruntime execution providers for a ``--device`` setting (``auto``: CUDA when onnxruntime has it).

    Raises:
        DeviceError: a malformed setting, CUDA asked for but not in this onnxruntime build, or ``mps``.
    """
    try:
        kind, index = parse_device(device, "--device")
    except ConfigError as err:
        raise DeviceError(str(err)) from None
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if kind == "cpu" or (kind == "auto" and not cuda):
        return ["CPUExecutionProvider"]
    if kind == "mps" or not cuda:
        missing = "CoreML/MPS" if kind == "mps" else "CUDA"
        raise DeviceError(f"--device={device!r}: this onnxruntime build has no {missing} execution provider "
                          "(onnxruntime-gpu has CUDA); use cpu")
    return [("CUDAExecutionProvider", {"device_id": index or 0}), "CPUExecutionProvider"]


class OnnxPredictor(BasePredictor):
    """Run an ONNX file written by :func:`e2edet.export.export_onnx` through onnxruntime.

    Everything the graph expects is read from the file's metadata (see :func:`e2edet.export.onnx_metadata`): class
    names, mean/std, the resize rule, the padding (to multiples of 32 for a graph with dynamic height/width, to
    the exported size for a fixed-size one) and what the graph leaves to do (dense recipes: drop scores at or
    below ``test.score_thresh``, clip boxes to the image and drop empty ones; instance-segmentation recipes: also
    paste the ``masks`` output into the original image, as the PyTorch post-processor; query recipes: nothing). The
    preprocessing is :class:`Preprocessing`, as in :class:`Predictor`, so on the same images both give the same
    detections (up to float rounding and the order of tied scores; a fixed-size graph sees more padding than the
    PyTorch model, which moves scores slightly where the model normalises over the whole input).

    Images go through the graph one at a time by default (:attr:`batch_size` 1): each is padded only to its own
    size, as in :meth:`predict_files`; every graph also takes larger batches (checked at export).

    Args:
        path: the ``.onnx`` file. device: ``cpu``, ``auto`` or ``cuda[:N]`` (needs onnxruntime-gpu).
    Raises:
        ValueError: the file has no e2edet metadata (not written by ``e2edet export``) or another format version;
            FileNotFoundError: no such file; ConfigError: onnxruntime is not installed, or a bad ``device``.
    """

    batch_size = 1

    def __init__(self, path: str | Path, device: str = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ConfigError(f"{path}: running ONNX models needs onnxruntime ({error_text(err)}); install the "
                              'export extra: pip install "e2edet[export]"') from err
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        self.path = path
        options = ort.SessionOptions()
        options.log_severity_level = 3  # not the warning that the optional image_sizes input is no constant
        # no busy-waiting of onnxruntime's threads after a run: the preprocessing between images (decode, resize,
        # in PyTorch) needs those cores; spinning slowed the PyTorch work next to it by ~40 % on 2 CPU cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_onnx_providers(device, ort))
        except DeviceError:
            raise
        except Exception as err:  # onnxruntime raises its own exception types for invalid files
            raise ValueError(f"{path}: onnxruntime cannot load it ({error_text(err)})") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("e2edet_format") != ONNX_FORMAT:
            found = meta.get("e2edet_format")
            raise ValueError(f"{path}: " + (f"ONNX metadata format {found!r}; this e2edet reads {ONNX_FORMAT!r}"
                                            if found else "no e2edet metadata; export it with `e2edet export`"))
        try:
            self.metadata = {k: json.loads(v) for k, v in meta.items() if k != "e2edet_format"}
            m = self.metadata
            self.class_names = list(m["class_names"])
            stored = (m.get("e2edet_config") or {}).get("test", {}).get("predict_score")
            self.default_score = float(stored or DEFAULT_SCORE)
            fixed = m["pad"]["fixed_size"]
            self.preprocess = Preprocessing(int(m["resize"]["min_size"]), int(m["resize"]["max_size"]),
                                            tuple(m["mean"]), tuple(m["std"]), int(m["pad"]["size_divisibility"]),
                                            None if fixed is None else (int(fixed[0]), int(fixed[1])))
        except (KeyError, TypeError, ValueError, IndexError) as err:  # a damaged or hand-edited file
            raise ValueError(f"{path}: damaged e2edet metadata ({error_text(err)}); export it again with "
                             "`e2edet export`") from err
        optional = self.session.get_overridable_initializers()  # image_sizes: an input with a default
        self.inputs = [i.name for i in [*self.session.get_inputs(), *optional]]
        """The graph's input names: ``images`` and, for query and DETR graphs, ``image_sizes``."""
        self.skipped = []

    def detect(self, batch: torch.Tensor, sizes: torch.Tensor, orig_sizes: torch.Tensor) -> list[dict]:
        """The graph and its remaining post-processing on one preprocessed batch (see
        :meth:`BasePredictor.detect`)."""
        feed = {"images": batch.cpu().numpy(), "image_sizes": sizes.numpy()}
        boxes, scores, labels, *masks = (torch.from_numpy(a) for a in self.session.run(
            None, {k: v for k, v in feed.items() if k in self.inputs}))
        post = self.metadata["postprocess"]
        thresh, clip, mask_rule = post["score_thresh"], post["clip"], post.get("masks")
        results = []
        for b, ((h, w), (oh, ow)) in enumerate(zip(sizes.tolist(), orig_sizes.tolist())):
            keep = scores[b] > thresh if thresh is not None else slice(None)
            box = rescale_boxes(boxes[b][keep].float(), (h, w), (oh, ow))
            det = {"boxes": box, "scores": scores[b][keep].float(), "labels": labels[b][keep].to(torch.int64)}
            if masks and mask_rule:
                det["masks"] = paste_masks(masks[0][b][keep], (h, w), (oh, ow), int(mask_rule["stride"]),
                                           float(mask_rule["threshold"]))
            if clip:
                det["boxes"] = tv_ops.clip_boxes_to_image(box, (oh, ow))
                nonempty = (det["boxes"][:, 2] > det["boxes"][:, 0]) & (det["boxes"][:, 3] > det["boxes"][:, 1])
                det = {k: v[nonempty] for k, v in det.items()}
            results.append(det)
        return results
