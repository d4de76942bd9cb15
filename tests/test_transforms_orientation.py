"""Orientation augmentation: :class:`RandomTranspose` and the vertical flip keep boxes on the pixels they covered,
and with the horizontal flip draw the 8 symmetries of the square uniformly."""

from __future__ import annotations

import collections

import pytest
import torch
from torchvision import tv_tensors

from e2edet.data.transforms import RandomTranspose, build_train_transforms


def _sample():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, 5:15, 30:50] = 255  # a bright 10 x 20 rectangle
    boxes = tv_tensors.BoundingBoxes([[30.0, 5.0, 50.0, 15.0]], format="XYXY", canvas_size=(40, 60))
    mask = tv_tensors.Mask(image[:1] > 0)
    return tv_tensors.Image(image), {"boxes": boxes, "labels": torch.tensor([1]), "masks": mask}


def test_transpose_moves_boxes_masks_and_pixels_together():
    image, target = _sample()
    out_image, out = RandomTranspose(p=1.0)(image, target)
    assert out_image.shape == (3, 60, 40) and out["boxes"].canvas_size == (60, 40)
    assert out["boxes"].tolist() == [[5.0, 30.0, 15.0, 50.0]]
    x1, y1, x2, y2 = (int(v) for v in out["boxes"][0])
    assert (out_image[:, y1:y2, x1:x2] == 255).all() and int(out_image.sum()) == int(image.sum())
    assert torch.equal(out["masks"][0], out_image[0] > 0) and torch.equal(out["labels"], target["labels"])
    assert torch.equal(RandomTranspose(p=0.0)(image, target)[0], image)
    with pytest.raises(ValueError, match="p must be"):
        RandomTranspose(p=1.5)


def test_flips_and_transpose_draw_the_eight_orientations_uniformly():
    image, target = _sample()
    tf = build_train_transforms(40, 1000, flip_prob=0.5, vflip_prob=0.5, transpose_prob=0.5)
    seen = collections.Counter()
    torch.manual_seed(0)
    for _ in range(800):
        out_image, out = tf(image, target)
        box = tuple(round(v) for v in out["boxes"][0].tolist())
        seen[(tuple(out_image.shape[-2:]), box)] += 1
        x1, y1, x2, y2 = box  # the box still covers the rectangle (normalised: bright pixels are the largest)
        assert torch.isclose(out_image[0, y1:y2, x1:x2], out_image[0].max()).all()
    assert len(seen) == 8 and min(seen.values()) > 60  # ~100 each
