"""COCO-JSON detection dataset yielding the batch contract of ``docs/architecture.md``."""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from e2edet.data.errors import dataset_error
from e2edet.data.masks import decode_segmentation, segmentation_problem
from e2edet.data.validate import image_problem, load_coco_json, require_image_file, validate_coco

__all__ = ["CocoDetection", "read_image", "pil_to_rgb"]


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A ``uint16`` image (16-bit PNG) scaled to ``uint8`` (``round(v / 257)``: 65535 -> 255); uint8 unchanged."""
    if image.dtype == torch.uint8:
        return image
    return torch.div(image.to(torch.int32) * 255 + 32767, 65535, rounding_mode="floor").to(torch.uint8)


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an 8-bit RGB ``uint8 [H, W, 3]`` array.

    16-bit and 32-bit grayscale modes (``I;16*``, ``I``) are scaled, not clipped: values within ``0..65535``
    are divided by 257 (16-bit range), larger ranges are scaled by their maximum; float images (``F``) in
    ``[0, 1]`` are multiplied by 255, other ranges scaled by their maximum. Every other mode (``1``, ``L``,
    ``LA``, ``P``, ``PA``, ``RGBA``, ``CMYK``, ``YCbCr``, ...) goes through PIL's ``convert("RGB")``.
    """
    if im.mode.startswith("I") or im.mode == "F":
        values = np.asarray(im).astype(np.float64)
        values = np.where(np.isfinite(values), values, 0.0).clip(min=0.0)
        peak = float(values.max()) if values.size else 0.0
        if im.mode == "F" and peak <= 1.0:
            values = values * 255.0
        elif peak <= 65535.0 and im.mode != "F":
            values = values / 257.0
        elif peak > 0:
            values = values * (255.0 / peak)
        gray = np.rint(values).clip(0, 255).astype(np.uint8)
        return np.repeat(gray.reshape(gray.shape[0], gray.shape[1], 1), 3, axis=2)
    return np.asarray(im.convert("RGB"))


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to 8-bit RGB.

    Decoded with ``torchvision.io.decode_image`` (JPEG, PNG, GIF, WebP); formats it cannot read (TIFF,
    BMP, ...) are decoded with PIL (see :func:`pil_to_rgb`). torchvision 0.29's deprecation warning for its
    decoders is silenced here. 16-bit PNGs are scaled to 8 bits (``v / 257``).

    Returns:
        ``uint8 [3, H, W]`` tensor (grayscale, palette, RGBA, CMYK and 16-bit files are converted to RGB).

    Raises:
        DatasetError: ``"<image>: image: <problem>"`` when the file is missing, empty, truncated or not a
            decodable image.
    """
    path = require_image_file(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*image decoding and encoding", category=DeprecationWarning)
            return _to_uint8(decode_image(str(path), mode=ImageReadMode.RGB))
    except (RuntimeError, ValueError):
        pass  # not a format torchvision decodes (or a corrupt file): PIL decides and explains
    try:
        with Image.open(path) as im:
            im.load()
            array = pil_to_rgb(im)
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for corrupt files
        raise dataset_error(path, "image", image_problem(exc)) from exc
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise dataset_error(path, "image", f"has no pixels (shape {tuple(array.shape)})")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class CocoDetection(torch.utils.data.Dataset):
    """Object-detection dataset over a COCO JSON file.

    Category ids (any integers) are mapped to contiguous labels ``0..K-1`` in ascending id order.

    Attributes:
        coco: the loaded COCO dict. ann_file: its path. image_root: folder of the images.
        cat_ids: category ids sorted ascending. class_names: their names, in label order.
        label_to_cat_id: ``list[int]``, label → category id. cat_id_to_label: ``dict[int, int]``.
        image_ids: COCO image ids of the items, in file order (after ``filter_empty``).

    Args:
        ann_file: COCO JSON file.
        image_root: folder the images' ``file_name`` entries are relative to.
        transforms: callable ``(image, target) -> (image, target)`` in ``torchvision.transforms.v2`` style
            (see :mod:`e2edet.data.transforms`), receiving a ``tv_tensors.Image`` ``uint8 [3, H, W]`` and a
            dict whose ``boxes`` is ``tv_tensors.BoundingBoxes`` (XYXY, pixels) and ``labels`` ``int64 [G]``.
        filter_empty: drop images without any non-crowd box (for training).
        check_files: check at load time that every image file exists.
        masks: also load the instance masks (``segmentation``: polygons or RLE, decoded with faster-coco-eval's
            mask API, :func:`e2edet.data.masks.decode_segmentation`) as the target's ``masks``, a
            ``tv_tensors.Mask`` ``uint8 [G, H, W]`` that the v2 transforms move with the image.

    Raises:
        DatasetError: the file is unreadable or fails :func:`~e2edet.data.validate.validate_coco`; with ``masks``,
            a non-crowd annotation without a valid ``segmentation`` for its image's size.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        transforms: Callable[[Any, dict], tuple[Any, dict]] | None = None,
        filter_empty: bool = False,
        check_files: bool = True,
        masks: bool = False,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.transforms = transforms
        self.coco = load_coco_json(self.ann_file)
        # images are decoded (and their size checked) one by one in __getitem__, not all at load time
        validate_coco(self.coco, self.ann_file, self.image_root, check_files=check_files, decode_images=False)
        cats = sorted(self.coco["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.class_names = [str(c["name"]) for c in cats]
        self.label_to_cat_id = list(self.cat_ids)
        self.cat_id_to_label = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}
        self._images = {img["id"]: img for img in self.coco["images"]}
        self._anns: dict[int, list[dict]] = defaultdict(list)
        for ann in self.coco.get("annotations", []):
            self._anns[ann["image_id"]].append(ann)
        ids = [img["id"] for img in self.coco["images"]]
        if filter_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self._anns[i])]
        self.image_ids = ids
        self.masks = bool(masks)
        if self.masks:
            self._check_segmentations()

    def _check_segmentations(self) -> None:
        """Every non-crowd annotation has a segmentation of its image's size (``masks=True``)."""
        for image_id, anns in self._anns.items():
            info = self._images.get(image_id)
            if info is None:
                continue
            for ann in anns:
                if ann.get("iscrowd", 0):
                    continue
                segm = ann.get("segmentation")
                problem = ("no segmentation (instance masks were asked for: data.masks)" if segm is None else
                           segmentation_problem(segm, int(info["height"]), int(info["width"])))
                if problem is not None:
                    raise dataset_error(self.ann_file, f"annotation id {ann.get('id')} (image id {image_id})",
                                        f"segmentation: {problem}")

    @property
    def num_classes(self) -> int:
        """Number of foreground classes ``K``."""
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict:
        """The COCO ``images`` record of item ``index`` (``id``, ``file_name``, ``width``, ``height``)."""
        return self._images[self.image_ids[index]]

    def annotations(self, index: int, include_crowd: bool = False) -> list[dict]:
        """The COCO annotation records of item ``index``, crowd ones only when ``include_crowd``."""
        anns = self._anns[self.image_ids[index]]
        return list(anns) if include_crowd else [a for a in anns if not a.get("iscrowd", 0)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        """Load item ``index``.

        Returns:
            ``(image, target)``. ``image`` is a plain tensor: with the standard transforms a normalised
            ``float32 [3, h, w]``, without transforms the decoded ``uint8 [3, H, W]`` RGB image.
            ``target``: ``boxes`` ``float32 [G, 4]`` xyxy pixels of the returned image (plain tensor),
            ``labels`` ``int64 [G]`` in ``[0, K)``, ``image_id`` ``int``, ``size`` ``int64 [2]`` = (h, w) of
            the returned image, ``orig_size`` ``int64 [2]`` = (H, W) of the file. Crowd boxes are excluded;
            boxes are clipped to the image (validation allows 1 px outside) and empty ones dropped. With
            ``masks``: ``masks`` ``uint8 [G, h, w]`` (1 inside), the instance masks in the frame of the returned
            image, row ``i`` the mask of box ``i``.

        Raises:
            DatasetError: the image file is missing, corrupt, or its size differs from the JSON record.
        """
        info = self.image_info(index)
        path = self.image_root / info["file_name"]
        data = read_image(path)
        height, width = int(data.shape[-2]), int(data.shape[-1])
        if (width, height) != (int(info["width"]), int(info["height"])):
            raise dataset_error(
                self.ann_file, f"image id {info['id']} ({info['file_name']})",
                f"JSON says {info['width']} x {info['height']} but the file is {width} x {height}",
            )
        anns = self.annotations(index)
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)  # validation allows BOX_TOLERANCE px outside
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        image = tv_tensors.Image(data)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                xyxy[keep], format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
            ),
            "labels": labels.reshape(-1)[keep],
            "image_id": int(info["id"]),
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(self._decode_masks(
                [a for a, k in zip(anns, keep.tolist()) if k], height, width))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        boxes, target_masks = target["boxes"], target.get("masks")
        out_h, out_w = int(image.shape[-2]), int(image.shape[-1])
        target = {
            "boxes": boxes.as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4),
            "labels": target["labels"].as_subclass(torch.Tensor).to(torch.int64).reshape(-1),
            "image_id": int(info["id"]),
            "size": torch.tensor([out_h, out_w], dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.masks:
            masks = target_masks.as_subclass(torch.Tensor).to(torch.uint8)
            target["masks"] = masks.reshape(-1, out_h, out_w)
        return image.as_subclass(torch.Tensor), target

    def _decode_masks(self, anns: list[dict], height: int, width: int) -> torch.Tensor:
        """``uint8 [G, height, width]`` masks of ``anns`` (checked at load time)."""
        if not anns:
            return torch.zeros(0, height, width, dtype=torch.uint8)
        return torch.from_numpy(np.stack([decode_segmentation(a["segmentation"], height, width) for a in anns]))
