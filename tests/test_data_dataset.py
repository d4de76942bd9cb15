"""CocoDetection, transforms and collate on a tiny generated COCO dataset."""

import json

import pytest
import torch
from PIL import Image

from e2edet.data.coco import CocoDetection
from e2edet.data.collate import collate, pad_images
from e2edet.data.errors import DatasetError
from e2edet.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, RandomRelativeCrop, build_eval_transforms, build_train_transforms,
)


def _gradient(width, height):
    image = Image.new("RGB", (width, height))
    image.putdata([((7 * x) % 256, (11 * y) % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    return image


@pytest.fixture
def coco_dir(tmp_path):
    """a.png 40x30 (2 boxes + 1 crowd), b.png 20x50 (1 box), c.png 24x24 (only a crowd box)."""
    for name, size in (("a.png", (40, 30)), ("b.png", (20, 50)), ("c.png", (24, 24))):
        _gradient(*size).save(tmp_path / name)
    coco = {
        "images": [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 20, "file_name": "b.png", "width": 20, "height": 50},
                   {"id": 30, "file_name": "c.png", "width": 24, "height": 24}],
        "categories": [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 5, "bbox": [2, 3, 10, 12], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 2, "bbox": [20, 0, 20, 30], "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1},
            {"id": 4, "image_id": 20, "category_id": 5, "bbox": [1, 1, 18, 48]},
            {"id": 5, "image_id": 30, "category_id": 5, "bbox": [1, 1, 10, 10], "iscrowd": 1},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path


def test_contract_types_labels_and_crowd(coco_dir):
    ds = CocoDetection(coco_dir / "ann.json", coco_dir)
    assert ds.cat_ids == [2, 5] and ds.class_names == ["two", "five"]
    assert ds.label_to_cat_id == [2, 5] and ds.cat_id_to_label == {2: 0, 5: 1}
    assert ds.image_ids == [10, 20, 30] and len(ds) == 3
    image, target = ds[0]
    assert type(image) is torch.Tensor and image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert image[:, 2, 3].tolist() == [21, 22, 5]  # pixel (x=3, y=2) of the gradient, RGB order
    assert set(target) == {"boxes", "labels", "image_id", "size", "orig_size"}
    assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 15.0], [20.0, 0.0, 40.0, 30.0]]))
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 0]  # crowd box excluded
    assert target["image_id"] == 10 and isinstance(target["image_id"], int)
    assert target["size"].dtype == torch.int64 and target["size"].tolist() == [30, 40]
    assert target["orig_size"].tolist() == [30, 40]
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_filter_empty_drops_crowd_only_images(coco_dir):
    ds = CocoDetection(coco_dir / "ann.json", coco_dir, filter_empty=True)
    assert ds.image_ids == [10, 20]


def test_flip_moves_boxes_and_pixels(coco_dir):
    plain = CocoDetection(coco_dir / "ann.json", coco_dir, build_eval_transforms(30, 1000))
    flipped = CocoDetection(coco_dir / "ann.json", coco_dir, build_train_transforms([30], 1000, flip_prob=1.0))
    image, target = plain[0]
    image_f, target_f = flipped[0]
    assert image.dtype == torch.float32 and image.shape == image_f.shape == (3, 30, 40)
    torch.testing.assert_close(image_f, image.flip(-1))
    # x1' = W - x2, x2' = W - x1 with W = 40
    torch.testing.assert_close(target_f["boxes"], torch.tensor([[28.0, 3.0, 38.0, 15.0], [0.0, 0.0, 20.0, 30.0]]))
    assert target_f["labels"].tolist() == [1, 0]


def test_normalisation_uses_imagenet_statistics(coco_dir):
    image, _ = CocoDetection(coco_dir / "ann.json", coco_dir, build_eval_transforms(30, 1000))[0]
    raw, _ = CocoDetection(coco_dir / "ann.json", coco_dir)[0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(image, (raw.float() / 255 - mean) / std)


def test_resize_scales_boxes_and_caps_long_side(coco_dir):
    ds = CocoDetection(coco_dir / "ann.json", coco_dir, build_eval_transforms(60, 100))
    image, target = ds[0]  # 40x30 -> shorter side 60: scale 2
    assert image.shape == (3, 60, 80) and target["size"].tolist() == [60, 80]
    assert target["orig_size"].tolist() == [30, 40]
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 6.0, 24.0, 30.0], [40.0, 0.0, 80.0, 60.0]]))
    image, target = ds[1]  # 20x50: scale 3 would give 150 > 100, so scale 2 -> 40x100
    assert image.shape == (3, 100, 40) and target["size"].tolist() == [100, 40]
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 2.0, 38.0, 98.0]]))


def test_sanitize_drops_degenerate_box_with_its_label(coco_dir):
    coco = json.loads((coco_dir / "ann.json").read_text())
    coco["annotations"].append({"id": 9, "image_id": 10, "category_id": 2, "bbox": [30, 10, 1, 1]})
    (coco_dir / "ann.json").write_text(json.dumps(coco))
    ds = CocoDetection(coco_dir / "ann.json", coco_dir, build_train_transforms([15], 1000, flip_prob=0.0))
    _, target = ds[0]  # scale 0.5: the 1x1 box becomes 0.5 px and is removed, its label too
    assert target["labels"].tolist() == [1, 0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 1.5, 6.0, 7.5], [10.0, 0.0, 20.0, 15.0]]))


def test_random_relative_crop_keeps_boxes_inside(coco_dir):
    torch.manual_seed(0)
    ds = CocoDetection(coco_dir / "ann.json", coco_dir, build_train_transforms([30], 1000, crop=True))
    shapes = set()
    for _ in range(20):
        image, target = ds[0]
        h, w = target["size"].tolist()
        shapes.add((h, w))
        assert image.shape[-2:] == (h, w) and min(h, w) == 30
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"])
        assert ((boxes[:, 0] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 1] >= 0) & (boxes[:, 3] <= h)).all()
        assert ((boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)).all()
    assert len(shapes) > 2  # crops of various aspect ratios happened
    with pytest.raises(ValueError, match="min_scale"):
        RandomRelativeCrop(min_scale=0.0)


def test_collate_pads_to_multiple_of_32(coco_dir):
    ds = CocoDetection(coco_dir / "ann.json", coco_dir, build_eval_transforms(60, 100))
    images, targets = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 128, 96) and images.dtype == torch.float32
    assert [t["size"].tolist() for t in targets] == [[60, 80], [100, 40]]
    torch.testing.assert_close(images[0, :, :60, :80], ds[0][0])
    assert images[0, :, 60:].abs().sum() == 0 and images[0, :, :, 80:].abs().sum() == 0
    assert images[1, :, :, 40:].abs().sum() == 0
    assert pad_images([torch.ones(3, 5, 7)], size_divisibility=1).shape == (1, 3, 5, 7)
    with pytest.raises(ValueError, match="no images"):
        pad_images([])


def test_missing_and_corrupt_images(coco_dir):
    (coco_dir / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"ann\.json: image id 20 \(b\.png\): image file .*b\.png not found"):
        CocoDetection(coco_dir / "ann.json", coco_dir)
    ds = CocoDetection(coco_dir / "ann.json", coco_dir, check_files=False)
    with pytest.raises(DatasetError, match=r"b\.png: image: file not found"):
        ds[1]
    (coco_dir / "a.png").write_bytes(b"\x89PNG garbage bytes, not an image" * 3)
    with pytest.raises(DatasetError, match=r"a\.png: image: not an image file"):
        ds[0]


def test_size_mismatch_and_tiff_fallback(coco_dir):
    coco = json.loads((coco_dir / "ann.json").read_text())
    coco["images"][0]["width"] = 41
    coco["images"][1]["file_name"] = "b.tif"
    _gradient(20, 50).save(coco_dir / "b.tif")
    (coco_dir / "ann.json").write_text(json.dumps(coco))
    ds = CocoDetection(coco_dir / "ann.json", coco_dir)
    with pytest.raises(DatasetError, match=r"ann\.json: image id 10 \(a\.png\): JSON says 41 x 30 but the file is 40"):
        ds[0]
    image, _ = ds[1]  # TIFF: torchvision cannot decode it, PIL does
    assert image.shape == (3, 50, 20) and image[:, 3, 2].tolist() == [14, 33, 5]


def test_invalid_annotation_file_is_rejected_at_load(coco_dir):
    coco = json.loads((coco_dir / "ann.json").read_text())
    coco["annotations"][0]["category_id"] = 77
    (coco_dir / "ann.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"ann\.json: annotation id 1 \(image id 10\): unknown category_id 77"):
        CocoDetection(coco_dir / "ann.json", coco_dir)


def test_truncated_or_empty_image_in_getitem_names_the_file(coco_dir):
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (50, 20, 3), dtype=np.uint8)
    coco = json.loads((coco_dir / "ann.json").read_text())
    coco["images"][1]["file_name"] = "b.jpg"
    (coco_dir / "ann.json").write_text(json.dumps(coco))
    Image.fromarray(pixels).save(coco_dir / "b.jpg", quality=90)
    ds = CocoDetection(coco_dir / "ann.json", coco_dir)
    assert ds[1][0].shape == (3, 50, 20)
    data = (coco_dir / "b.jpg").read_bytes()
    (coco_dir / "b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as info:
        ds[1]
    assert type(info.value) is DatasetError and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{coco_dir / 'b.jpg'}: image: truncated or corrupt image")
    (coco_dir / "b.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"b\.jpg: image: file is empty \(0 bytes\)"):
        ds[1]


def test_read_image_converts_every_mode_to_8bit_rgb(tmp_path):
    import numpy as np

    from e2edet.data.coco import read_image

    ramp16 = (np.arange(6 * 4, dtype=np.uint16).reshape(4, 6) * 2849)  # 0 .. 65527
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    expected = np.rint(ramp16 / 257.0).astype(np.uint8)
    for name in ("g16.png", "g16.tif"):
        if name.endswith(".tif"):
            Image.fromarray(ramp16).save(tmp_path / name)
        image = read_image(tmp_path / name)
        assert image.dtype == torch.uint8 and image.shape == (3, 4, 6), name
        assert (image[0].numpy().astype(int) - expected).__abs__().max() <= 1, name
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    Image.fromarray(ramp16.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I, 16-bit range
    assert (read_image(tmp_path / "i32.tif")[0].numpy().astype(int) - expected).__abs__().max() <= 1
    Image.fromarray((ramp16 / 65535.0).astype(np.float32)).save(tmp_path / "f.tif")  # mode F in [0, 1]
    assert (read_image(tmp_path / "f.tif")[0].numpy().astype(int) - expected).__abs__().max() <= 1
    rgb = _gradient(6, 4)
    for mode in ("L", "LA", "P", "RGBA", "1"):
        rgb.convert(mode).save(tmp_path / f"{mode}.png")
        image = read_image(tmp_path / f"{mode}.png")
        assert image.dtype == torch.uint8 and image.shape == (3, 4, 6), mode
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgb.convert("CMYK").save(tmp_path / "cmyk.tif")
    for name in ("cmyk.jpg", "cmyk.tif"):
        image = read_image(tmp_path / name)
        assert image.dtype == torch.uint8 and image.shape == (3, 4, 6), name
