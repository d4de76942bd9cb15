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

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torchvision import ops as tv_ops
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from e2edet.build import build_model, build_postprocessor
from e2edet.config import Config, ConfigError, from_dict
from e2edet.config_checks import parse_device
from e2edet.data.coco import pil_to_rgb, read_image
from e2edet.data.errors import DatasetError, dataset_error
from e2edet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from e2edet.engine.checkpoint import load_model_weights, load_weights, resolve_weights_file
from e2edet.engine.device import DeviceError, select_device
from e2edet.models.backbone import frozen_bn_like
from e2edet.ops.boxes import rescale_boxes
from e2edet.utils import error_text
from e2edet.utils.io import atomic_write_json

__all__ = ["IMAGE_EXTENSIONS", "BasePredictor", "OnnxPredictor", "Predictor", "Preprocessing", "as_images",
           "coco_results", "draw_detections", "list_images", "load_predictor", "read_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: ``e2edet_format`` of the ONNX metadata this version writes and reads (see :func:`e2edet.export.onnx_metadata`).
ONNX_FORMAT = "e2edet-onnx-v1"

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


def list_images(sources: Iterable[str | Path]) -> list[Path]:
    """Image files named by ``sources`` (files, or folders searched non-recursively), sorted per folder.

    Raises:
        FileNotFoundError: a source does not exist, or a folder holds no images.
    """
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"{src}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif src.is_file():
            files.append(src)
        else:
            raise FileNotFoundError(f"{src}: no such image file or folder")
    return files


def _one_image(item: Any, what: str) -> list[torch.Tensor]:
    """The ``uint8 [3, H, W]`` image(s) of one input (a ``[B, 3, H, W]`` tensor gives ``B``); see :func:`as_images`."""
    if isinstance(item, (str, Path)):
        return [read_image(item)]
    if isinstance(item, Image.Image):
        return [torch.from_numpy(pil_to_rgb(item).copy()).permute(2, 0, 1).contiguous()]
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(f"{what}: numpy array of dtype {item.dtype}; expected uint8 RGB values 0..255 "
                             "(for floats in [0, 1]: (a * 255).round().astype(np.uint8))")
        if item.ndim != 3 or item.shape[2] != 3 or 0 in item.shape:
            raise ValueError(f"{what}: numpy array of shape {item.shape}; expected H x W x 3 RGB (channels last; "
                             "a [3, H, W] array: pass torch.from_numpy(a))")
        return [torch.from_numpy(np.array(item, order="C")).permute(2, 0, 1).contiguous()]  # a copy: may be read-only
    if isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8:
            raise ValueError(f"{what}: tensor of dtype {item.dtype}; expected torch.uint8 RGB values 0..255 "
                             "(for floats in [0, 1]: (x * 255).round().to(torch.uint8))")
        shape = tuple(item.shape)
        if item.dim() == 3 and shape[0] == 3 and 0 not in shape:
            return [item]
        if item.dim() == 4 and shape[1] == 3 and 0 not in shape[1:]:
            return list(item.unbind(0))
        hint = " (channels last: use x.permute(2, 0, 1))" if item.dim() == 3 and shape[-1] == 3 else ""
        raise ValueError(f"{what}: tensor of shape {list(shape)}; expected [3, H, W] (one RGB image) or "
                         f"[B, 3, H, W]{hint}")
    raise TypeError(f"{what}: {type(item).__name__} is not an image; expected a path, a PIL image, a numpy "
                    "uint8 H x W x 3 array, a uint8 [3, H, W] / [B, 3, H, W] tensor, or a list of them")


def as_images(images: ImageInput | Sequence[ImageInput]) -> list[torch.Tensor]:
    """The predictors' input as a list of RGB ``uint8 [3, H, W]`` tensors.

    Accepted: a path (``str``/``Path``, read by :func:`read_image`), a PIL image (any mode, converted to RGB), a
    numpy ``uint8 [H, W, 3]`` RGB array, a ``uint8 [3, H, W]`` tensor (one image), a ``uint8 [B, 3, H, W]``
    tensor (``B`` images), or a list/tuple of these (in order; a 4-D tensor in it adds its ``B`` images).

    Raises:
        ValueError: a wrong dtype or shape (one line naming it, e.g. ``"image 2: tensor of dtype torch.float32;
            expected torch.uint8 ..."``). TypeError: an unsupported type. DatasetError: an unreadable file.
    """
    if isinstance(images, (list, tuple)):
        out: list[torch.Tensor] = []
        for i, item in enumerate(images):
            if isinstance(item, (list, tuple)):
                raise TypeError(f"image {i}: a nested {type(item).__name__}; pass one flat list of images")
            out += _one_image(item, f"image {i}")
        return out
    return _one_image(images, "image")


@dataclass(frozen=True)
class Preprocessing:
    """The network input of a batch of images, identical for :class:`Predictor` and :class:`OnnxPredictor`.

    Each image is resized with a scale ``min(min_size / shorter side, max_size / longer side)`` (detectron2's
    ``ResizeShortestEdge`` at test time, as :class:`e2edet.data.transforms.ResizeShortestEdge`; also at most
    ``fixed_size`` when given), sides ``round(side * scale)``, bilinear with antialiasing; scaled to ``[0, 1]`` and
    normalised by ``mean``/``std`` (RGB); then zero-padded at the bottom/right (0 = the mean colour) to the
    largest size of the batch rounded up to ``size_divisibility``, or to ``fixed_size`` (a fixed-size ONNX graph).

    Attributes:
        min_size, max_size: the resize rule in pixels (``data.test_min_size``, ``data.test_max_size``).
        mean, std: per RGB channel, of images scaled to ``[0, 1]``.
        size_divisibility: padded sides are multiples of it (32, the largest FPN stride of the exported levels).
        fixed_size: ``(H, W)`` every batch is padded to (and images shrunk to fit), or None.
    """

    min_size: int
    max_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    size_divisibility: int = 32
    fixed_size: tuple[int, int] | None = None

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` in pixels that an ``height x width`` image is resized to."""
        scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
        if self.fixed_size is not None:
            scale = min(scale, self.fixed_size[0] / height, self.fixed_size[1] / width)
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        return (h, w) if self.fixed_size is None else (min(h, self.fixed_size[0]), min(w, self.fixed_size[1]))

    def __call__(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Preprocess ``uint8 [3, H_i, W_i]`` RGB images (see :func:`as_images`).

        Returns:
            ``(batch, sizes, orig_sizes)``: ``float32 [B, 3, Hp, Wp]`` network input on the images' device, and
            ``int64 [B, 2]`` ``(h, w)`` of each resized, unpadded image and of each original image (CPU).
        Raises:
            ValueError: no images.
        """
        if not images:
            raise ValueError("no images to preprocess")
        inputs = []
        for image in images:
            x = F.resize(image, list(self.resized_shape(*image.shape[-2:])), antialias=True)
            x = F.to_dtype(x, torch.float32, scale=True)
            inputs.append(F.normalize(x, mean=list(self.mean), std=list(self.std)))
        sizes = torch.tensor([list(x.shape[-2:]) for x in inputs], dtype=torch.int64)
        orig = torch.tensor([list(x.shape[-2:]) for x in images], dtype=torch.int64)
        if self.fixed_size is not None:
            height, width = self.fixed_size
        else:
            div = max(1, self.size_divisibility)
            height, width = (math.ceil(int(v) / div) * div for v in sizes.max(0).values)
        batch = inputs[0].new_zeros((len(inputs), 3, height, width))
        for b, x in enumerate(inputs):
            batch[b, :, : x.shape[-2], : x.shape[-1]] = x
        return batch, sizes, orig


#: Score threshold of pictures and ``detections.json`` when the run stores no F1-optimal one.
DEFAULT_SCORE = 0.3


def draw_detections(
    image: torch.Tensor, det: dict, class_names: Sequence[str], score_thresh: float = 0.0
) -> torch.Tensor:
    """Draw boxes with ``label score`` captions on ``image`` (``uint8 [3, H, W]``); returns a new uint8 image.

    ``det`` holds ``boxes [k, 4]`` xyxy pixels of ``image``, ``scores [k]`` and ``labels [k]`` (contiguous).
    """
    keep = det["scores"] >= score_thresh
    boxes, scores, labels = det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()
    if len(boxes) == 0:
        return image.clone()
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]
    names = [class_names[int(c)] if int(c) < len(class_names) else str(int(c)) for c in labels]
    captions = [f"{n} {s:.2f}" for n, s in zip(names, scores)]
    colors = [palette[int(c) % len(palette)] for c in labels]
    width = max(1, round(max(image.shape[1:]) / 400))
    # captions in white on a box-coloured background, readable on any image
    return draw_bounding_boxes(image, boxes, labels=captions, colors=colors, width=width, label_colors="white",
                               fill_labels=True)


def _coco_ann_index(ann_file: str | Path, class_names: Sequence[str]) -> tuple[dict[str, list[dict]], list[int]]:
    """Images of a COCO dataset file by file base name, and its category ids in label order (ascending id, as
    :class:`e2edet.data.coco.CocoDetection` maps them).

    Raises:
        DatasetError: unreadable JSON, no ``images``/``categories`` lists, or categories that differ from the
            model's ``class_names`` (names the file).
    """
    ann_file = Path(ann_file)
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, ValueError) as err:
        raise dataset_error(ann_file, "file", f"cannot read it as JSON ({error_text(err)})") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("categories"), list):
        raise dataset_error(ann_file, "file", "not a COCO dataset file (needs 'images' and 'categories' lists)")
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        names = [str(c["name"]) for c in cats]
        index: dict[str, list[dict]] = {}
        for img in data["images"]:
            int(img["id"])
            index.setdefault(Path(str(img["file_name"])).name, []).append(img)
    except (KeyError, TypeError, ValueError) as err:
        raise dataset_error(ann_file, "images/categories", f"an entry lacks an integer id, file_name or name "
                                                           f"({error_text(err)})") from err
    if names != list(class_names):
        raise dataset_error(ann_file, "categories", f"{names} (in id order) differ from the model's classes "
                                                    f"{list(class_names)}")
    return index, [int(c["id"]) for c in cats]


def coco_results(
    images: Sequence[tuple[str | Path, int, int, dict]], class_names: Sequence[str], coco_ann: str | Path | None = None
) -> tuple[list[dict], dict | None]:
    """Detections in the COCO results format (what ``COCO.loadRes`` and the COCO evaluation servers read).

    Args:
        images: per image ``(file, height, width, det)`` with ``det`` a predictor result (``boxes [k, 4]`` xyxy
            pixels of the original image, ``scores [k]``, ``labels [k]`` contiguous).
        class_names: the model's classes (label order).
        coco_ann: a COCO dataset JSON the images come from: image ids are taken from it (an image is found by its
            file name, and by the trailing path when two share a name) and labels become its category ids
            (ascending id order, as training maps them). None: images are numbered 1, 2, ... in the given order and
            label ``l`` becomes category id ``l + 1``.
    Returns:
        ``(results, image_list)``: one ``{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}`` per
        detection, image by image in score order; and, without ``coco_ann``, a COCO dataset skeleton
        ``{"images": [{"id", "file_name", "height", "width"}], "categories": [{"id", "name"}],
        "annotations": []}`` naming those ids (None with ``coco_ann``).
    Raises:
        DatasetError: ``coco_ann`` unreadable or not COCO, its categories differ from ``class_names``, an image is
            not in it (or ambiguous, or of another size); the one-line message names the file.
    """
    results: list[dict] = []
    skeleton = None
    if coco_ann is None:
        category_ids = list(range(1, len(class_names) + 1))
        skeleton = {"images": [], "annotations": [],
                    "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    else:
        index, category_ids = _coco_ann_index(coco_ann, class_names)
    for number, (file, height, width, det) in enumerate(images, start=1):
        if skeleton is not None:
            image_id = number
            skeleton["images"].append({"id": number, "file_name": str(file), "height": height, "width": width})
        else:
            found = index.get(Path(file).name, [])
            if len(found) > 1:
                found = [i for i in found if Path(file).as_posix().endswith(Path(str(i["file_name"])).as_posix())]
            if len(found) != 1:
                problem = "no image has this file name" if not found else "several images match it"
                raise dataset_error(coco_ann, f"image {file}", f"{problem} (images are matched by file_name)")
            entry = found[0]
            if (entry.get("height", height), entry.get("width", width)) != (height, width):
                raise dataset_error(coco_ann, f"image id {entry['id']} ({entry['file_name']})",
                                    f"is {entry.get('width')}x{entry.get('height')} but {file} is {width}x{height}")
            image_id = int(entry["id"])
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": image_id, "category_id": category_ids[int(label)],
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": round(score, 5)})
    return results, skeleton


class BasePredictor:
    """What :class:`Predictor` and :class:`OnnxPredictor` share: input conversion, preprocessing, batching and
    :meth:`predict_files`. A subclass sets :attr:`class_names` and :attr:`preprocess` and implements
    :meth:`detect`."""

    class_names: list[str]
    preprocess: Preprocessing
    skipped: list[tuple[Path, str]]
    """``(file, reason)`` of the images the last :meth:`predict_files` call could not read."""

    def detect(self, batch: torch.Tensor, sizes: torch.Tensor, orig_sizes: torch.Tensor) -> list[dict]:
        """Detections of one preprocessed batch (:class:`Preprocessing` outputs) in original-image pixels."""
        raise NotImplementedError

    batch_size: int = 4
    """Images per network call when :meth:`__call__` is given none."""

    default_score: float = DEFAULT_SCORE
    """Score threshold of :meth:`predict_files` when none is given: the run's ``test.predict_score`` (the
    F1-optimal threshold on its validation split, set by training) or :data:`DEFAULT_SCORE`."""

    @torch.inference_mode()
    def __call__(self, images: ImageInput | Sequence[ImageInput], batch_size: int | None = None) -> list[dict]:
        """Detect objects in images.

        Args:
            images: anything :func:`as_images` accepts: a path, PIL image, numpy ``uint8 [H, W, 3]`` RGB array,
                ``uint8 [3, H, W]`` tensor (ONE image), ``uint8 [B, 3, H, W]`` tensor, or a list of these.
            batch_size: images per network call (images of a batch are padded to the largest); default
                :attr:`batch_size` (4; 1 for :class:`OnnxPredictor`).
        Returns:
            One dict per image, always a list: ``boxes [k, 4]`` float32 xyxy pixels of that image, ``scores [k]``,
            ``labels [k]`` (int64, index into :attr:`class_names`), sorted by score, on the CPU.
        Raises:
            ValueError / TypeError / DatasetError: bad inputs, see :func:`as_images`.
        """
        images = as_images(images)
        batch_size = self.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r}: must be an integer >= 1")
        results: list[dict] = []
        for start in range(0, len(images), batch_size):
            results += self.detect(*self.preprocess(images[start : start + batch_size]))
        return results

    def predict_files(
        self, files: Sequence[Path], out_dir: str | Path, score_thresh: float | None = None, draw: bool = True,
        coco_json: bool = False, coco_ann: str | Path | None = None,
    ) -> Path:
        """Detect in image files; write ``detections.json`` and, when ``draw``, one ``<stem>.png`` per image.

        ``detections.json`` lists per image its file, size, picture and detections (``box_xyxy`` pixels of the
        original image, ``score``, ``label``, ``category``); detections below ``score_thresh`` (default
        :attr:`default_score`) are left out of both. With ``coco_json`` (implied by ``coco_ann``) also ``results.json``: every detection (no
        ``score_thresh``: COCO AP needs the low scores too) in the COCO results format, and without ``coco_ann``
        ``images.json``, the COCO image list its ids refer to (:func:`coco_results`). Returns the
        ``detections.json`` path.

        A file that cannot be read as an image (missing, empty, truncated, not an image) is skipped with the
        one-line warning ``e2edet: warning: <file>: skipped: <reason>`` on stderr and listed in
        :attr:`skipped`; the other images are still processed and written. (Warnings for files before the first
        readable one are printed once it is read, so that an all-unreadable input gives only the error.)

        Raises:
            DatasetError: every one of the (non-empty) ``files`` is unreadable (the message names the first and
                gives the count), or ``coco_ann`` does not fit (:func:`coco_results`); no JSON is written then,
                and a ``coco_ann`` that cannot be read or names other categories fails before any picture.
        """
        out_dir = Path(out_dir)
        records, used, full = [], set(), []
        coco_json = coco_json or coco_ann is not None
        if coco_ann is not None:  # an unreadable file or other categories: fail before any image is processed
            _coco_ann_index(coco_ann, self.class_names)
        self.skipped = []
        def warn(file: Path, reason: str) -> None:
            print(f"e2edet: warning: {file}: skipped: {reason}", file=sys.stderr, flush=True)

        for path in files:
            try:
                image = read_image(path)
            except DatasetError as exc:
                reason = exc.problem or str(exc)
                self.skipped.append((Path(path), reason))
                if records:  # before the first readable image the warnings wait: if none is, only the error shows
                    warn(path, reason)
                continue
            if not records:
                for file, reason in self.skipped:
                    warn(file, reason)
            det = self([image])[0]
            if coco_json:
                full.append((path, int(image.shape[1]), int(image.shape[2]), det))
            keep = det["scores"] >= (self.default_score if score_thresh is None else score_thresh)
            det = {k: v[keep] for k, v in det.items()}
            records.append({
                "file": str(path),
                "height": int(image.shape[1]),
                "width": int(image.shape[2]),
                "detections": [
                    {"box_xyxy": [round(float(c), 2) for c in b], "score": round(float(s), 4), "label": int(l),
                     "category": self.class_names[int(l)] if int(l) < len(self.class_names) else str(int(l))}
                    for b, s, l in zip(det["boxes"], det["scores"], det["labels"])
                ],
            })
            if draw:
                out_dir.mkdir(parents=True, exist_ok=True)
                name = Path(path).stem
                while name in used:  # same file name in two folders: keep both pictures
                    name += "_"
                used.add(name)
                records[-1]["picture"] = str(out_dir / f"{name}.png")
                drawn = draw_detections(image, det, self.class_names)
                Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(records[-1]["picture"])
        if files and len(self.skipped) == len(files):
            first, reason = self.skipped[0]
            some = "the image is" if len(files) == 1 else f"all {len(files)} images are"
            raise dataset_error(first, "image", f"{reason}; {some} unreadable, no detections written")
        if coco_json:  # before any JSON is written: a coco_ann that does not fit writes nothing
            results, skeleton = coco_results(full, self.class_names, coco_ann)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / "detections.json"
        atomic_write_json(json_path, records, indent=1)
        if coco_json:
            atomic_write_json(out_dir / "results.json", results)
            if skeleton is not None:
                atomic_write_json(out_dir / "images.json", skeleton, indent=1)
        return json_path


class Predictor(BasePredictor):
    """Run a PyTorch detector on images of any size.

    Args:
        model: a detector obeying the model contract (``docs/architecture.md``).
        cfg: its experiment config (test sizes, score mode, class names).
        device: ``auto``, ``cpu``, ``cuda``...
    Use :meth:`from_weights` to load a trained model from a run folder, checkpoint folder or ``.safetensors`` file.
    Detections come from the recipe's own post-processor (the one evaluation uses).
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: str | torch.device = "auto"):
        self.cfg = cfg
        self.device = select_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.postprocess = build_postprocessor(cfg)
        self.preprocess = Preprocessing(cfg.data.test_min_size, cfg.data.test_max_size)
        self.class_names = list(cfg.model.class_names)
        self.default_score = cfg.test.predict_score or DEFAULT_SCORE
        self.skipped = []

    @classmethod
    def from_weights(cls, weights: str | Path, device: str = "auto") -> "Predictor":
        """Load weights and the config stored in their metadata.

        Raises:
            FileNotFoundError / ValueError: from :func:`e2edet.engine.checkpoint.load_weights` (names the path).
            WeightsMismatchError: the tensors do not fit the model their stored config builds (one line: the file,
                the counts and the first keys).
        """
        state, cfg_dict = load_weights(weights)
        if cfg_dict is None:
            raise ValueError(f"{weights}: the weights carry no e2edet config; was it written by `e2edet train`?")
        cfg = from_dict(cfg_dict, str(weights))
        cfg.model.pretrained = False  # the trained weights replace any ImageNet initialisation
        model = frozen_bn_like(build_model(cfg), state)  # ... but the run's frozen batch norms stay frozen
        load_model_weights(model, state, strict=True, source=resolve_weights_file(weights))
        return cls(model, cfg, device)

    def detect(self, batch: torch.Tensor, sizes: torch.Tensor, orig_sizes: torch.Tensor) -> list[dict]:
        """The model and the recipe's post-processor on one preprocessed batch (see :meth:`BasePredictor.detect`)."""
        sizes = sizes.to(self.device)
        outputs = self.model(batch.to(self.device), sizes)
        nms = self.cfg.test.nms_iou if self.cfg.test.nms_iou > 0 else None
        dets = self.postprocess(outputs, sizes, orig_sizes.to(self.device), nms_iou=nms)
        return [{k: v.cpu() for k, v in d.items()} for d in dets]


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
    below ``test.score_thresh``, clip boxes to the image and drop empty ones; query recipes: nothing). The
    preprocessing is :class:`Preprocessing`, as in :class:`Predictor`, so on the same images both give the same
    detections (up to float rounding and the order of tied scores; a fixed-size graph sees more padding than the
    PyTorch model, which moves scores slightly where the model normalises over the whole input).

    Images go through the graph one at a time by default (:attr:`batch_size` 1): each is padded only to its own
    size, as in :meth:`predict_files`, and Sparse R-CNN graphs run only the batch size they were traced with.

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
        boxes, scores, labels = (torch.from_numpy(a) for a in self.session.run(
            None, {k: v for k, v in feed.items() if k in self.inputs}))
        thresh, clip = self.metadata["postprocess"]["score_thresh"], self.metadata["postprocess"]["clip"]
        results = []
        for b, ((h, w), (oh, ow)) in enumerate(zip(sizes.tolist(), orig_sizes.tolist())):
            keep = scores[b] > thresh if thresh is not None else slice(None)
            box = rescale_boxes(boxes[b][keep].float(), (h, w), (oh, ow))
            det = {"boxes": box, "scores": scores[b][keep].float(), "labels": labels[b][keep].to(torch.int64)}
            if clip:
                det["boxes"] = tv_ops.clip_boxes_to_image(box, (oh, ow))
                nonempty = (det["boxes"][:, 2] > det["boxes"][:, 0]) & (det["boxes"][:, 3] > det["boxes"][:, 1])
                det = {k: v[nonempty] for k, v in det.items()}
            results.append(det)
        return results


def load_predictor(weights: str | Path, device: str = "auto") -> BasePredictor:
    """:class:`OnnxPredictor` for a ``.onnx`` file, else :meth:`Predictor.from_weights` (run folder, checkpoint
    folder or ``.safetensors``). Raises what those raise."""
    if Path(weights).suffix.lower() == ".onnx":
        return OnnxPredictor(weights, device=device)
    return Predictor.from_weights(weights, device=device)
