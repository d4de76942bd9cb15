"""Predictor inputs: image files, the accepted image kinds (:func:`as_images`) and the preprocessing
(:class:`Preprocessing`) shared by the PyTorch and ONNX predictors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from e2edet.data.coco import pil_to_rgb, read_image
from e2edet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
"""One image as the predictors accept it (see :func:`as_images`)."""


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
