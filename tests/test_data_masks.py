"""Instance masks in the data path: decoding (polygons, RLE), the dataset's ``masks``, the transforms (flip, resize,
crop, sanitize) and the collate padding; the DSB2018 dataset by name."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from e2edet.data.coco import CocoDetection
from e2edet.data.collate import collate, pad_masks
from e2edet.data.datasets import resolve_dataset
from e2edet.data.errors import DatasetError
from e2edet.data.masks import decode_segmentation, segmentation_problem
from e2edet.data.transforms import build_eval_transforms, build_train_transforms

pycocotools_mask = pytest.importorskip("pycocotools.mask")

POLYGON = [[2.0, 3.0, 14.0, 3.0, 14.0, 12.0, 8.0, 16.0, 2.0, 12.0]]  # a pentagon inside bbox [2, 3, 12, 13]
TWO_POLYGONS = [[20.0, 0.0, 30.0, 0.0, 30.0, 10.0], [32.0, 20.0, 39.0, 20.0, 39.0, 29.0, 32.0, 29.0]]


def _rle_square(height, width, y0, y1, x0, x1, compressed=True):
    """An RLE of the rectangle rows y0:y1, columns x0:x1 (compressed string or uncompressed counts)."""
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = pycocotools_mask.encode(np.asfortranarray(mask))
    if compressed:
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}, mask
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [height, width], "counts": counts}, mask


def _pycocotools_decode(segm, height, width):
    if isinstance(segm, list):
        rle = pycocotools_mask.merge(pycocotools_mask.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = pycocotools_mask.frPyObjects(segm, height, width)
    else:
        rle = segm
    return pycocotools_mask.decode(rle)


def test_decode_polygons_and_rle_equal_pycocotools():
    rle, square = _rle_square(30, 40, 5, 9, 30, 37)
    uncompressed, _ = _rle_square(30, 40, 20, 30, 0, 4, compressed=False)
    for segm in (POLYGON, TWO_POLYGONS, rle, uncompressed):
        ours = decode_segmentation(segm, 30, 40)
        assert ours.dtype == np.uint8 and ours.shape == (30, 40) and ours.sum() > 0
        np.testing.assert_array_equal(ours, _pycocotools_decode(segm, 30, 40))
    np.testing.assert_array_equal(decode_segmentation(rle, 30, 40), square)


@pytest.mark.parametrize("segm, problem", [
    ({"size": [29, 40], "counts": "abc"}, "RLE size"),
    ({"size": [30, 40], "counts": [5, 6]}, "sum to 11"),
    ([[1.0, 2.0, 3.0, 4.0]], "at least 3 points"),
    ([], "expected a list of polygons"),
    ("x", "expected a list of polygons"),
])
def test_segmentation_problems(segm, problem):
    assert problem in segmentation_problem(segm, 30, 40)
    with pytest.raises(ValueError, match=problem):
        decode_segmentation(segm, 30, 40)


@pytest.fixture
def mask_dir(tmp_path):
    """a.png 40x30: a polygon object, a two-polygon object, an RLE object and a crowd RLE; b.png 20x16: none."""
    for name, size in (("a.png", (40, 30)), ("b.png", (20, 16))):
        Image.new("RGB", size, (90, 120, 30)).save(tmp_path / name)
    rle, _ = _rle_square(30, 40, 20, 30, 0, 6)
    crowd, _ = _rle_square(30, 40, 0, 2, 0, 2, compressed=False)
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 20, "height": 16}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 12, 13], "iscrowd": 0, "segmentation": POLYGON},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 0, 19, 29], "iscrowd": 0,
             "segmentation": TWO_POLYGONS},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 20, 6, 10], "iscrowd": 0, "segmentation": rle},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "iscrowd": 1, "segmentation": crowd},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path, coco


def test_dataset_masks_follow_the_boxes(mask_dir):
    root, coco = mask_dir
    ds = CocoDetection(root / "ann.json", root, masks=True)
    _, target = ds[0]
    masks = target["masks"]
    assert type(masks) is torch.Tensor and masks.dtype == torch.uint8 and masks.shape == (3, 30, 40)
    for row, ann in zip(masks, coco["annotations"][:3]):  # the crowd annotation is left out, as its box
        np.testing.assert_array_equal(row.numpy(), _pycocotools_decode(ann["segmentation"], 30, 40))
    _, empty = ds[1]
    assert empty["masks"].shape == (0, 16, 20) and empty["boxes"].shape == (0, 4)
    assert "masks" not in CocoDetection(root / "ann.json", root)[0][1]  # only when asked for


def test_dataset_refuses_a_bad_segmentation(mask_dir):
    root, coco = mask_dir
    coco["annotations"][2]["segmentation"] = {"size": [31, 40], "counts": "PP"}
    (root / "bad.json").write_text(json.dumps(coco))
    CocoDetection(root / "bad.json", root)  # boxes only: the segmentation is not read
    with pytest.raises(DatasetError, match=r"annotation id 3 \(image id 1\): segmentation: RLE size"):
        CocoDetection(root / "bad.json", root, masks=True)
    del coco["annotations"][0]["segmentation"]
    (root / "none.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="annotation id 1 .*no segmentation"):
        CocoDetection(root / "none.json", root, masks=True)


def test_masks_survive_flip_resize_and_pad(mask_dir):
    root, _ = mask_dir
    plain = CocoDetection(root / "ann.json", root, masks=True)[0][1]["masks"]
    # flip always, shorter side 30 -> 60 (x2 exactly): nearest resize doubles every pixel
    ds = CocoDetection(root / "ann.json", root, build_train_transforms([60], 200, flip_prob=1.0), masks=True)
    image, target = ds[0]
    assert image.shape == (3, 60, 80) and target["masks"].shape == (3, 60, 80)
    expected = plain.flip(-1).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(target["masks"], expected)
    for box, mask in zip(target["boxes"], target["masks"]):  # each mask lies inside its (flipped, scaled) box
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] - 1 and xs.max() < box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() < box[3] + 1
    # evaluation transform (no flip), half size: the masks shrink with the image
    small = CocoDetection(root / "ann.json", root, build_eval_transforms(15, 100), masks=True)[0][1]["masks"]
    assert small.shape == (3, 15, 20) and torch.equal(small, plain[:, ::2, ::2])
    # collate pads the masks like the image (bottom/right zeros)
    images, targets = collate([ds[0], ds[1]], size_divisibility=32)
    assert images.shape[-2:] == (64, 96)
    padded = targets[0]["masks"]
    assert padded.shape == (3, 64, 96) and torch.equal(padded[:, :60, :80], expected)
    assert padded[:, 60:].sum() == 0 and padded[:, :, 80:].sum() == 0
    assert targets[1]["masks"].shape == (0, 64, 96)
    assert ds[0][1]["masks"].shape == (3, 60, 80)  # the dataset's own dict is not changed


def test_sanitize_drops_a_mask_with_its_box(mask_dir):
    root, coco = mask_dir
    coco["annotations"][1]["bbox"] = [20, 0, 0.2, 29]  # under 1 px wide after the (identity) resize: dropped
    (root / "thin.json").write_text(json.dumps(coco))
    ds = CocoDetection(root / "thin.json", root, build_train_transforms([30], 40, flip_prob=0.0), masks=True)
    target = ds[0][1]
    assert target["boxes"].shape == (2, 4) and target["masks"].shape == (2, 30, 40)
    plain = CocoDetection(root / "ann.json", root, masks=True)[0][1]["masks"]
    assert torch.equal(target["masks"], plain[[0, 2]])


def test_pad_masks_refuses_larger_masks():
    with pytest.raises(ValueError, match="do not fit"):
        pad_masks(torch.zeros(1, 10, 10), 8, 16)


def test_dsb2018_by_name_has_exact_masks():
    try:
        paths = resolve_dataset("dsb2018")
    except DatasetError:
        pytest.skip("DSB2018 not found at ../shared/data/dsb2018 (set E2EDET_DSB2018)")
    ds = CocoDetection(paths.val_json, paths.val_images, masks=True)
    assert ds.class_names == ["nucleus"] and len(ds) == 72
    _, target = ds[0]
    anns = ds.annotations(0)
    assert target["masks"].shape[0] == len(anns) == target["boxes"].shape[0]
    areas = target["masks"].flatten(1).sum(1).tolist()
    assert areas == [int(a["area"]) for a in anns]
