"""Training and evaluation transforms (``torchvision.transforms.v2``) for detection samples.

A sample is ``(image, target)`` with ``image`` a ``tv_tensors.Image`` ``uint8 [3, H, W]`` and ``target`` a
dict holding ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels) and ``labels`` (``int64 [G]``); v2
transforms move the boxes with the image, and ``SanitizeBoundingBoxes`` removes degenerate boxes together
with their ``labels`` entries. The output image is ``float32``, scaled to ``[0, 1]`` and normalised with
the ImageNet RGB mean/std.
"""

from __future__ import annotations

from typing import Any, Sequence

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "RandomRelativeCrop", "RandomTranspose", "ResizeShortestEdge",
    "build_train_transforms", "build_eval_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""ImageNet RGB mean of images scaled to ``[0, 1]``."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet RGB standard deviation of images scaled to ``[0, 1]``."""


def _image_size(flat_inputs: list[Any], who: str) -> tuple[int, int]:
    for inpt in flat_inputs:
        is_plain_image = type(inpt) is torch.Tensor and inpt.dim() >= 2
        if is_plain_image or isinstance(inpt, (tv_tensors.Image, PIL.Image.Image)):
            h, w = F.get_size(inpt)
            return int(h), int(w)
    raise TypeError(f"{who}: the sample holds no image (tv_tensors.Image, PIL image or [..., H, W] tensor)")


class RandomRelativeCrop(v2.Transform):
    """Crop a random window whose sides are a random fraction of the image's sides.

    With probability ``p``, the crop height and width are drawn independently and uniformly from
    ``[min_scale, 1]`` times the image height and width (rounded to whole pixels, at least 1), and the
    window's position uniformly among those inside the image. Boxes are shifted and clipped to the
    window (``v2.functional.crop``); boxes left with no area must be removed afterwards by
    ``v2.SanitizeBoundingBoxes``. Randomness comes from torch's global generator.

    Args:
        min_scale: smallest side fraction, in ``(0, 1]``.
        p: probability of cropping at all.

    Raises:
        ValueError: ``min_scale`` not in ``(0, 1]`` or ``p`` not in ``[0, 1]``.
    """

    def __init__(self, min_scale: float = 0.5, p: float = 0.5) -> None:
        super().__init__()
        if not 0 < min_scale <= 1:
            raise ValueError(f"RandomRelativeCrop: min_scale must be in (0, 1], got {min_scale}")
        if not 0 <= p <= 1:
            raise ValueError(f"RandomRelativeCrop: p must be in [0, 1], got {p}")
        self.min_scale = float(min_scale)
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw ``top, left, height, width`` (pixels) of the crop window, or ``{}`` for no crop."""
        height, width = _image_size(flat_inputs, "RandomRelativeCrop")
        if torch.rand(()) >= self.p:
            return {}
        scale = torch.empty(2).uniform_(self.min_scale, 1.0)
        crop_h = max(1, min(height, round(height * float(scale[0]))))
        crop_w = max(1, min(width, round(width * float(scale[1]))))
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Crop one input (image or boxes) with the drawn window; other inputs pass through."""
        if not params:
            return inpt
        return F.crop(inpt, **params)


class RandomTranspose(v2.Transform):
    """Swap the image axes (reflection about the main diagonal) with probability ``p``.

    Pixel ``(y, x)`` moves to ``(x, y)``: the image ``[..., H, W]`` becomes ``[..., W, H]``, an XYXY box
    ``(x1, y1, x2, y2)`` becomes ``(y1, x1, y2, x2)`` on a ``(W, H)`` canvas, masks are transposed like the image.
    Exact (no resampling). With independent horizontal and vertical flips of probability 0.5 and ``p = 0.5`` every
    one of the 8 symmetries of the square (rotations by multiples of 90 degrees and their mirror images) is equally
    likely: the orientation augmentation of nadir aerial and microscopy images, whose content has no "up" (as
    Ultralytics' ``flipud`` for aerial data). Randomness comes from torch's global generator.

    Raises:
        ValueError: ``p`` not in ``[0, 1]``; TypeError: boxes not in XYXY format.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"RandomTranspose: p must be in [0, 1], got {p}")
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw whether to transpose (one draw per sample, also when ``p`` is 0 or 1)."""
        return {"apply": bool(torch.rand(()) < self.p)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Transpose one input (image, boxes or mask); other inputs pass through."""
        if not params["apply"]:
            return inpt
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            if inpt.format != tv_tensors.BoundingBoxFormat.XYXY:
                raise TypeError(f"RandomTranspose: boxes must be XYXY, got {inpt.format}")
            height, width = inpt.canvas_size
            return tv_tensors.wrap(inpt[..., [1, 0, 3, 2]], like=inpt, canvas_size=(width, height))
        if isinstance(inpt, PIL.Image.Image):
            return inpt.transpose(PIL.Image.Transpose.TRANSPOSE)
        if isinstance(inpt, torch.Tensor) and inpt.dim() >= 2:
            out = inpt.transpose(-1, -2).contiguous()
            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out
        return inpt


class ResizeShortestEdge(v2.Transform):
    """Resize so the shorter side is one of ``min_sizes`` (chosen uniformly) and the longer side is at
    most ``max_size`` pixels, keeping the aspect ratio (detectron2's ``ResizeShortestEdge``).

    The scale is ``min(s / shorter, max_size / longer)`` and output sides are ``round(side * scale)``
    (at least 1), so the shorter side is exactly ``s`` when the cap does not apply (``v2.RandomShortestSize``
    truncates and can give ``s - 1``). Boxes are scaled with the image. Bilinear, antialiased.

    Raises:
        ValueError: empty or non-positive ``min_sizes``, or non-positive ``max_size``.
    """

    def __init__(self, min_sizes: Sequence[int] | int, max_size: int) -> None:
        super().__init__()
        sizes = [int(min_sizes)] if isinstance(min_sizes, int) else [int(s) for s in min_sizes]
        if not sizes or min(sizes) <= 0 or max_size <= 0:
            raise ValueError(f"ResizeShortestEdge: sizes must be positive, got {min_sizes!r}, {max_size!r}")
        self.min_sizes = sizes
        self.max_size = int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the shorter-side length and compute the output ``size = (h, w)`` in pixels."""
        height, width = _image_size(flat_inputs, "ResizeShortestEdge")
        target = self.min_sizes[0]
        if len(self.min_sizes) > 1:  # a single size draws nothing: evaluation leaves torch's RNG untouched
            target = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        scale = min(target / min(height, width), self.max_size / max(height, width))
        return {"size": (max(1, round(height * scale)), max(1, round(width * scale)))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize one input (image or boxes) to ``params["size"]``; other inputs pass through."""
        return F.resize(inpt, size=list(params["size"]), antialias=True)


def _tail() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))]


def build_train_transforms(
    min_sizes: Sequence[int] | int, max_size: int, flip_prob: float = 0.5, crop: bool = False,
    vflip_prob: float = 0.0, transpose_prob: float = 0.0,
) -> v2.Compose:
    """Training augmentation: flips, optional crop, multi-scale resize, cleanup, normalisation.

    Steps: ``RandomHorizontalFlip(flip_prob)``; ``RandomVerticalFlip(vflip_prob)`` and
    :class:`RandomTranspose` ``(transpose_prob)`` when their probabilities are above 0; if ``crop``, :class:`RandomRelativeCrop` (p = 0.5, sides
    50–100 %) before resizing; :class:`ResizeShortestEdge` (shorter side = one of ``min_sizes`` chosen
    uniformly, scaled down further if the longer side would exceed ``max_size``);
    ``SanitizeBoundingBoxes(min_size=1)`` (drops boxes under 1 px and their ``labels``);
    ``ToDtype(float32, scale=True)``; ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``.

    Args:
        min_sizes: candidate shorter-side lengths in pixels.
        max_size: upper bound of the longer side in pixels.
        flip_prob: probability of the horizontal flip.
        crop: add the random relative crop.
        vflip_prob, transpose_prob: probabilities of the vertical flip and of the axis swap (0 = not used; 0.5 and
            0.5 with ``flip_prob`` 0.5 draw the 8 orientations of the square uniformly).

    Returns:
        A ``v2.Compose`` called as ``image, target = t(image, target)``.

    Raises:
        ValueError: empty or non-positive ``min_sizes``, or ``max_size`` below ``max(min_sizes)``.
    """
    sizes = [int(min_sizes)] if isinstance(min_sizes, int) else [int(s) for s in min_sizes]
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"build_train_transforms: min_sizes must be positive integers, got {min_sizes!r}")
    if max_size < max(sizes):
        raise ValueError(f"build_train_transforms: max_size {max_size} is smaller than max(min_sizes) {max(sizes)}")
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(p=flip_prob)]
    if vflip_prob > 0:
        steps.append(v2.RandomVerticalFlip(p=vflip_prob))
    if transpose_prob > 0:
        steps.append(RandomTranspose(p=transpose_prob))
    if crop:
        steps.append(RandomRelativeCrop(min_scale=0.5, p=0.5))
    steps += [ResizeShortestEdge(sizes, max_size), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(steps + _tail())


def build_eval_transforms(min_size: int, max_size: int) -> v2.Compose:
    """Deterministic evaluation transform: :class:`ResizeShortestEdge` (shorter side ``min_size``, longer
    side at most ``max_size`` pixels), ``ToDtype(float32, scale=True)``, ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``.

    Boxes are resized with the image and never removed.

    Raises:
        ValueError: non-positive sizes or ``max_size < min_size``.
    """
    if min_size <= 0 or max_size < min_size:
        raise ValueError(f"build_eval_transforms: need 0 < min_size <= max_size, got {min_size}, {max_size}")
    return v2.Compose([ResizeShortestEdge([int(min_size)], int(max_size))] + _tail())
