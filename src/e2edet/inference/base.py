"""What the PyTorch and ONNX predictors share (:class:`BasePredictor`): input conversion, preprocessing,
batching and :meth:`BasePredictor.predict_files`.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from e2edet.data.coco import read_image
from e2edet.data.errors import DatasetError, dataset_error
from e2edet.engine.coco_utils import encode_masks
from e2edet.inference.inputs import ImageInput, Preprocessing, as_images
from e2edet.inference.outputs import (
    DEFAULT_SCORE,
    coco_ann_index,
    coco_results,
    draw_detections,
)
from e2edet.utils.io import atomic_write_json


class BasePredictor(ABC):
    """What :class:`Predictor` and :class:`OnnxPredictor` share: input conversion, preprocessing, batching and
    :meth:`predict_files`. A subclass sets :attr:`class_names` and :attr:`preprocess` and implements
    :meth:`detect`."""

    class_names: list[str]
    preprocess: Preprocessing
    skipped: list[tuple[Path, str]]
    """``(file, reason)`` of the images the last :meth:`predict_files` call could not read."""

    @abstractmethod
    def detect(self, batch: torch.Tensor, sizes: torch.Tensor, orig_sizes: torch.Tensor) -> list[dict]:
        """Detections of one preprocessed batch (:class:`Preprocessing` outputs) in original-image pixels."""

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
            coco_ann_index(coco_ann, self.class_names)
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
            if coco_json:  # masks kept as RLE: full-size boolean masks of every image would fill the memory
                stored = {k: v for k, v in det.items() if k != "masks"}
                if "masks" in det:
                    stored["rles"] = encode_masks(det["masks"])
                full.append((path, int(image.shape[1]), int(image.shape[2]), stored))
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
