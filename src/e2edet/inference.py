"""Predictor: load a trained detector, run it on image files, write detections JSON and pictures.

Detections are end-to-end: top-k by score with no NMS (unless the recipe's ``test.nms_iou`` asks for it, as
FCOS does). Boxes are ``xyxy`` pixels of the original image.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.utils import draw_bounding_boxes

from e2edet.build import build_model, build_postprocessor
from e2edet.config import Config, from_dict
from e2edet.data.collate import pad_images
from e2edet.data.coco import read_image
from e2edet.data.errors import DatasetError, dataset_error
from e2edet.data.transforms import build_eval_transforms
from e2edet.engine.checkpoint import load_model_weights, load_weights, resolve_weights_file
from e2edet.engine.device import select_device
from e2edet.utils.io import atomic_write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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
    return draw_bounding_boxes(image, boxes, labels=captions, colors=colors, width=width)


class Predictor:
    """Run a detector on images of any size.

    Args:
        model: a detector obeying the model contract (``docs/architecture.md``).
        cfg: its experiment config (test sizes, score mode, class names).
        device: ``auto``, ``cpu``, ``cuda``...
    Use :meth:`from_weights` to load a trained model from a run folder, checkpoint folder or ``.safetensors`` file.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: str | torch.device = "auto"):
        self.cfg = cfg
        self.device = select_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.postprocess = build_postprocessor(cfg)
        self.transform = build_eval_transforms(cfg.data.test_min_size, cfg.data.test_max_size)
        self.class_names = list(cfg.model.class_names)
        self.skipped: list[tuple[Path, str]] = []
        """``(file, reason)`` of the images the last :meth:`predict_files` call could not read."""

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
        model = build_model(cfg)
        load_model_weights(model, state, strict=True, source=resolve_weights_file(weights))
        return cls(model, cfg, device)

    @torch.inference_mode()
    def __call__(self, images: Sequence[torch.Tensor], batch_size: int = 4) -> list[dict]:
        """Detect objects in ``uint8 [3, H, W]`` RGB images.

        Returns:
            One dict per image: ``boxes [k, 4]`` xyxy pixels of that image, ``scores [k]``, ``labels [k]`` (int64,
            index into :attr:`class_names`), sorted by score, on the CPU.
        """
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            inputs = [self.transform(tv_tensors.Image(img)) for img in chunk]
            sizes = torch.tensor([[int(x.shape[-2]), int(x.shape[-1])] for x in inputs])
            orig = torch.tensor([[int(x.shape[-2]), int(x.shape[-1])] for x in chunk])
            batch = pad_images([x.as_subclass(torch.Tensor) for x in inputs], 32).to(self.device)
            outputs = self.model(batch, sizes.to(self.device))
            nms = self.cfg.test.nms_iou if self.cfg.test.nms_iou > 0 else None
            dets = self.postprocess(outputs, sizes.to(self.device), orig.to(self.device), nms_iou=nms)
            results += [{k: v.cpu() for k, v in d.items()} for d in dets]
        return results

    def predict_files(
        self, files: Sequence[Path], out_dir: str | Path, score_thresh: float = 0.3, draw: bool = True
    ) -> Path:
        """Detect in image files; write ``detections.json`` and, when ``draw``, one ``<stem>.png`` per image.

        ``detections.json`` lists per image its file, size, picture and detections (``box_xyxy`` pixels of the
        original image, ``score``, ``label``, ``category``); detections below ``score_thresh`` are left out of
        both. Returns the JSON path.

        A file that cannot be read as an image (missing, empty, truncated, not an image) is skipped with the
        one-line warning ``e2edet: warning: <file>: skipped: <reason>`` on stderr and listed in
        :attr:`skipped`; the other images are still processed and written. (Warnings for files before the first
        readable one are printed once it is read, so that an all-unreadable input gives only the error.)

        Raises:
            DatasetError: every one of the (non-empty) ``files`` is unreadable (the message names the first and
                gives the count); nothing is written then.
        """
        out_dir = Path(out_dir)
        records, used = [], set()
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
            out_dir.mkdir(parents=True, exist_ok=True)
            det = self([image])[0]
            keep = det["scores"] >= score_thresh
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
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / "detections.json"
        atomic_write_json(json_path, records, indent=1)
        return json_path
