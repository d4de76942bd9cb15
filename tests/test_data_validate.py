"""COCO JSON reading and validation: every broken input names the file, the record and the problem."""

import json

import pytest
from PIL import Image

from e2edet.data.errors import DatasetError
from e2edet.data.validate import decode_image_size, load_coco_json, validate_coco


def _coco(**overrides):
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 20, "height": 50}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 12], "iscrowd": 0}],
    }
    coco.update(overrides)
    return coco


def _ann(**fields):
    ann = {"id": 5, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 12]}
    ann.update(fields)
    return ann


def test_valid_file_passes_and_files_are_checked(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 50)).save(tmp_path / "b.png")
    validate_coco(_coco(), "ann.json", tmp_path)
    (tmp_path / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"ann\.json: image id 2 \(b\.png\): image file .*b\.png not found"):
        validate_coco(_coco(), "ann.json", tmp_path)
    validate_coco(_coco(), "ann.json", tmp_path, check_files=False)


@pytest.mark.parametrize(
    "ann, message",
    [
        (_ann(bbox=[30, 2, 15, 12]), r"annotation id 5 \(image id 1\): bbox .* lies outside the image a\.png"),
        (_ann(bbox=[-1.5, 2, 10, 12]), r"annotation id 5 \(image id 1\): bbox .* lies outside"),
        (_ann(bbox=[1, 2, 0, 12]), r"annotation id 5 \(image id 1\): bbox .* non-positive width or height"),
        (_ann(bbox=[1, 2, 10, -3]), r"annotation id 5 \(image id 1\): bbox .* non-positive"),
        (_ann(bbox=[1, 2, 10]), r"annotation id 5 \(image id 1\): bbox must be 4 finite numbers"),
        (_ann(bbox=[1, 2, float("nan"), 3]), r"annotation id 5 \(image id 1\): bbox must be 4 finite numbers"),
        (_ann(category_id=3), r"annotation id 5 \(image id 1\): unknown category_id 3"),
        (_ann(image_id=99), r"annotation id 5 \(image id 99\): unknown image_id 99"),
        (_ann(id=1), r"annotation id 1 \(image id 1\): duplicate annotation id"),
        (_ann(iscrowd=2), r"annotation id 5 \(image id 1\): iscrowd must be 0 or 1"),
    ],
)
def test_bad_annotation_is_named(ann, message):
    coco = _coco()
    coco["annotations"].append(ann)
    with pytest.raises(DatasetError, match=r"^ann\.json: " + message):
        validate_coco(coco, "ann.json", check_files=False)


def test_box_within_one_pixel_tolerance_is_accepted():
    coco = _coco()
    coco["annotations"].append(_ann(bbox=[-0.9, -0.5, 40.8, 30.9]))
    validate_coco(coco, "ann.json", check_files=False)


@pytest.mark.parametrize(
    "coco, message",
    [
        ([], r"top level: expected a JSON object, got list"),
        ({}, r"top level: empty JSON object"),
        ({"images": [], "annotations": []}, r"top level: no 'categories' list"),
        ({"categories": [{"id": 1, "name": "a"}]}, r"top level: no 'images' list"),
        (_coco(categories=[]), r"categories: the list is empty"),
        (_coco(images=[{"id": 1, "file_name": "a.png"}]), r"images\[0\]: missing key\(s\) width, height"),
        (_coco(categories=[{"id": 7, "name": "a"}, {"id": 7, "name": "b"}]), r"category id 7 \(b\): duplicate"),
    ],
)
def test_structural_problems(coco, message):
    with pytest.raises(DatasetError, match=r"ann\.json: " + message):
        validate_coco(coco, "ann.json", check_files=False)


def test_duplicate_image_id_and_bad_size():
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 1, "file_name": "c.png", "width": 40, "height": 30},
              {"id": 3, "file_name": "d.png", "width": 0, "height": 30}]
    with pytest.raises(DatasetError) as info:
        validate_coco(_coco(images=images), "ann.json", check_files=False)
    text = str(info.value)
    assert "image id 1 (c.png): duplicate image id (also used by a.png)" in text
    assert "image id 3 (d.png): width/height must be positive" in text


def test_all_problems_are_collected_and_capped():
    coco = _coco()
    coco["annotations"] += [_ann(id=100 + i, category_id=1000 + i) for i in range(25)]
    with pytest.raises(DatasetError) as info:
        validate_coco(coco, "ann.json", check_files=False)
    lines = str(info.value).splitlines()
    assert lines[0] == "ann.json: 25 problems found (showing 20):"
    assert lines[1] == "ann.json: annotation id 100 (image id 1): unknown category_id 1000"
    assert len(lines) == 22 and lines[-1] == "... and 5 more"


def test_load_coco_json_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"missing\.json: file: does not exist"):
        load_coco_json(tmp_path / "missing.json")
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.json: file: is empty \(0 bytes\)"):
        load_coco_json(empty)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "images": [],\n  "categories": [}\n')
    with pytest.raises(DatasetError, match=r"broken\.json: line 3 column 18: invalid JSON"):
        load_coco_json(broken)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_coco()))
    assert load_coco_json(good) == _coco()


def _images_dir(tmp_path):
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 50), (10, 20, 30)).save(tmp_path / "b.png")
    return tmp_path


def _truncated_jpeg(path, size=(40, 30)):
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_images_are_decoded_empty_file(tmp_path):
    root = _images_dir(tmp_path)
    (root / "b.png").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        validate_coco(_coco(), "ann.json", root)
    assert str(info.value) == f"ann.json: image id 2 (b.png): image file {root / 'b.png'}: file is empty (0 bytes)"


def test_images_are_decoded_truncated_file(tmp_path):
    root = _images_dir(tmp_path)
    coco = _coco()
    coco["images"][0]["file_name"] = "a.jpg"
    _truncated_jpeg(root / "a.jpg")
    # the project's wording only: the PIL reason quoted after it differs between Pillow versions
    with pytest.raises(DatasetError, match=r"^ann\.json: image id 1 \(a\.jpg\): image file .*a\.jpg: truncated or "
                                           r"corrupt image"):
        validate_coco(coco, "ann.json", root)
    validate_coco(coco, "ann.json", root, decode_images=False)  # existence only


def test_images_are_decoded_size_mismatch(tmp_path):
    root = _images_dir(tmp_path)
    coco = _coco()
    coco["images"][1]["width"] = 21
    with pytest.raises(DatasetError) as info:
        validate_coco(coco, "ann.json", root)
    assert str(info.value) == (f"ann.json: image id 2 (b.png): JSON says width x height = 21 x 50 "
                               f"but the image file {root / 'b.png'} is 20 x 50")


def test_several_image_problems_first_line_names_file_and_count(tmp_path):
    root = _images_dir(tmp_path)
    coco = _coco()
    coco["images"][0]["height"] = 31
    (root / "b.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as info:
        validate_coco(coco, "ann.json", root)
    lines = str(info.value).splitlines()
    assert lines[0] == "ann.json: 2 problems found (showing 2):"
    assert "JSON says width x height = 40 x 31 but the image file" in lines[1]
    assert lines[2].endswith("b.png: not an image file PIL can read (unknown format or corrupt header)")


def test_decode_image_size(tmp_path):
    Image.new("L", (7, 5)).save(tmp_path / "g.png")
    assert decode_image_size(tmp_path / "g.png") == (7, 5)
    with pytest.raises(DatasetError, match=r"nope\.png: image: file not found"):
        decode_image_size(tmp_path / "nope.png")
    _truncated_jpeg(tmp_path / "t.jpg")
    with pytest.raises(DatasetError, match=r"t\.jpg: image: truncated or corrupt image"):
        decode_image_size(tmp_path / "t.jpg")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10 ** 400])
def test_non_finite_numbers_are_rejected(value):
    coco = _coco()
    coco["annotations"].append(_ann(bbox=[1, 2, value, 3]))
    with pytest.raises(DatasetError, match=r"^ann\.json: annotation id 5 \(image id 1\): bbox must be 4 finite"):
        validate_coco(coco, "ann.json", check_files=False)
    coco = _coco()
    coco["images"][0]["width"] = value
    with pytest.raises(DatasetError, match=r"^ann\.json: image id 1 \(a\.png\): width/height must be positive numbers"):
        validate_coco(coco, "ann.json", check_files=False)


def test_json_nan_literals_and_parser_limits(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(_coco()).replace("[1, 2, 10, 12]", "[NaN, 2, 10, 12]"))
    with pytest.raises(DatasetError, match=r"nan\.json: annotation id 1 \(image id 1\): bbox must be 4 finite"):
        validate_coco(load_coco_json(path), path, check_files=False)
    path.write_text('{"images": ' + "1" * 5000 + "}")
    with pytest.raises(DatasetError, match=r"nan\.json: file: invalid JSON"):
        load_coco_json(path)
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DatasetError, match=r"nan\.json: file: invalid JSON"):
        load_coco_json(path)
