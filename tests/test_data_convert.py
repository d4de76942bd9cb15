"""VOC and YOLO importers, class-name files and atomic JSON writing (tiny generated data)."""

import json

import pytest
from PIL import Image

from e2edet.data.convert import read_class_names, save_coco_json, voc_to_coco, yolo_to_coco
from e2edet.data.errors import DatasetError
from e2edet.data.validate import validate_coco


def write_voc(root, stem, objects, size=(64, 48), xml_size=None, image=True):
    """Write a VOC image + XML; objects are (name, xmin, ymin, xmax, ymax[, difficult])."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    if image:
        Image.new("RGB", size, (120, 30, 200)).save(root / "JPEGImages" / f"{stem}.png")
    w, h = xml_size or size
    objs = "".join(
        f"<object><name>{o[0]}</name><difficult>{o[5] if len(o) > 5 else 0}</difficult><bndbox><xmin>{o[1]}</xmin>"
        f"<ymin>{o[2]}</ymin><xmax>{o[3]}</xmax><ymax>{o[4]}</ymax></bndbox></object>"
        for o in objects
    )
    size_xml = f"<size><width>{w}</width><height>{h}</height></size>"
    xml = f"<annotation><filename>{stem}.png</filename>{size_xml}{objs}</annotation>"
    (root / "Annotations" / f"{stem}.xml").write_text(xml)


def test_voc_conversion_coordinates_classes_and_difficult(tmp_path):
    write_voc(tmp_path, "img1", [("dog", 1, 1, 10, 20), ("cat", 5, 6, 64, 48, 1)])
    write_voc(tmp_path, "img2", [("cat", 2, 3, 4, 5)], size=(30, 20))
    coco = voc_to_coco(tmp_path)
    validate_coco(coco, "converted", tmp_path / "JPEGImages")
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert [c["id"] for c in coco["categories"]] == [1, 2]
    assert coco["images"][0] == {"id": 1, "file_name": "img1.png", "width": 64, "height": 48}
    a0, a1, a2 = coco["annotations"]
    # 1-based inclusive VOC -> 0-based: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax
    assert a0["bbox"] == [0.0, 0.0, 10.0, 20.0] and a0["category_id"] == 2 and a0["iscrowd"] == 0
    assert a1["bbox"] == [4.0, 5.0, 60.0, 43.0] and a1["iscrowd"] == 1  # difficult -> crowd
    assert a2["image_id"] == 2 and a2["bbox"] == [1.0, 2.0, 3.0, 3.0]


def test_voc_split_and_given_class_order(tmp_path):
    write_voc(tmp_path, "a", [("cat", 1, 1, 5, 5)])
    write_voc(tmp_path, "b", [("dog", 1, 1, 5, 5)])
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("b\n\n")
    coco = voc_to_coco(tmp_path, "train", class_names=["dog", "cat"])
    assert [i["file_name"] for i in coco["images"]] == ["b.png"]
    assert coco["annotations"][0]["category_id"] == 1
    with pytest.raises(DatasetError, match=r"val\.txt: file: split 'val' not found"):
        voc_to_coco(tmp_path, "val")


def test_voc_unknown_class_names_xml_and_object(tmp_path):
    write_voc(tmp_path, "a", [("cat", 1, 1, 5, 5), ("bird", 1, 1, 5, 5)])
    with pytest.raises(DatasetError, match=r"a\.xml: <object> #2: unknown class 'bird'"):
        voc_to_coco(tmp_path, class_names=["cat"])


def test_voc_border_clipping_warns_and_far_outside_fails(tmp_path):
    write_voc(tmp_path, "a", [("cat", 0, 1, 65, 48)])  # 0-based export: 1 px past left/right border
    with pytest.warns(UserWarning, match=r"1 VOC box\(es\) clipped .* a\.xml <object> #1"):
        coco = voc_to_coco(tmp_path)
    assert coco["annotations"][0]["bbox"] == [0.0, 0.0, 64.0, 48.0]
    write_voc(tmp_path, "a", [("cat", 1, 1, 80, 48)])
    with pytest.raises(DatasetError, match=r"a\.xml: <object> #1 \(cat\): box .* lies outside the 64 x 48 image"):
        voc_to_coco(tmp_path)


def test_voc_zero_size_skipped_inverted_fails(tmp_path):
    write_voc(tmp_path, "a", [("cat", 1, 1, 5, 5), ("cat", 7, 7, 7, 7)])
    with pytest.warns(UserWarning, match=r"1 VOC box\(es\) skipped as zero-size.*a\.xml <object> #2"):
        coco = voc_to_coco(tmp_path)
    assert len(coco["annotations"]) == 1
    write_voc(tmp_path, "a", [("cat", 9, 1, 5, 5)])
    with pytest.raises(DatasetError, match=r"a\.xml: <object> #1 \(cat\): box .* non-positive size"):
        voc_to_coco(tmp_path)


def test_voc_size_mismatch_missing_image_and_bad_xml(tmp_path):
    write_voc(tmp_path, "a", [("cat", 1, 1, 5, 5)], xml_size=(100, 48))
    with pytest.raises(DatasetError, match=r"a\.xml: <size>: says 100 x 48 but image a\.png is 64 x 48"):
        voc_to_coco(tmp_path)
    write_voc(tmp_path, "a", [("cat", 1, 1, 5, 5)], xml_size=(0, 0))  # missing size: read from the header
    assert voc_to_coco(tmp_path)["images"][0]["width"] == 64
    write_voc(tmp_path, "b", [("cat", 1, 1, 5, 5)], image=False)
    with pytest.raises(DatasetError, match=r"b\.xml: <filename> b\.png: image not found"):
        voc_to_coco(tmp_path)
    (tmp_path / "Annotations" / "b.xml").write_text("<annotation><object></annotation>")
    with pytest.raises(DatasetError, match=r"b\.xml: line 1 column \d+: malformed XML"):
        voc_to_coco(tmp_path)


def _yolo_dir(tmp_path, lines):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    Image.new("RGB", (100, 50)).save(tmp_path / "images" / "a.jpg")
    Image.new("RGB", (10, 10)).save(tmp_path / "images" / "b.png")
    (tmp_path / "labels" / "a.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "images", tmp_path / "labels"


def test_yolo_conversion(tmp_path):
    images, labels = _yolo_dir(tmp_path, ["1 0.5 0.5 0.2 0.4", "", "0 0.1 0.1 0.2 0.2"])
    coco = yolo_to_coco(images, labels, ["x", "y"])
    validate_coco(coco, "converted", images)
    sizes = [(i["file_name"], i["width"], i["height"]) for i in coco["images"]]
    assert sizes == [("a.jpg", 100, 50), ("b.png", 10, 10)]
    assert len(coco["annotations"]) == 2  # b.png has no label file: no boxes
    a0, a1 = coco["annotations"]
    assert a0["category_id"] == 2 and a0["bbox"] == pytest.approx([40.0, 15.0, 20.0, 20.0])
    assert a1["category_id"] == 1 and a1["bbox"] == pytest.approx([0.0, 0.0, 20.0, 10.0])


@pytest.mark.parametrize(
    "line, message",
    [
        ("0 0.5 0.5 0.2", r"line 2: expected 5 fields"),
        ("2 0.5 0.5 0.2 0.2", r"line 2: class 2 out of range 0\.\.1"),
        ("0 0.5 1.2 0.2 0.2", r"line 2: normalised values must be in \[0, 1\]"),
        ("0 0.5 0.5 0 0.2", r"line 2: box width/height must be positive"),
        ("a 0.5 0.5 0.2 0.2", r"line 2: fields must be numbers"),
    ],
)
def test_yolo_bad_line_names_file_and_line(tmp_path, line, message):
    images, labels = _yolo_dir(tmp_path, ["0 0.5 0.5 0.1 0.1", line])
    with pytest.raises(DatasetError, match=r"a\.txt: " + message):
        yolo_to_coco(images, labels, ["x", "y"])


def test_read_class_names(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    assert read_class_names(tmp_path / "names.txt") == ["cat", "dog"]
    (tmp_path / "data.yaml").write_text("names: {1: dog, 0: cat}\n")
    assert read_class_names(tmp_path / "data.yaml") == ["cat", "dog"]
    (tmp_path / "list.yaml").write_text("names: [a, b, c]\n")
    assert read_class_names(tmp_path / "list.yaml") == ["a", "b", "c"]
    (tmp_path / "dup.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DatasetError, match=r"dup\.txt: class 2: empty or duplicate class name 'cat'"):
        read_class_names(tmp_path / "dup.txt")
    (tmp_path / "bad.yaml").write_text("nc: 2\n")
    with pytest.raises(DatasetError, match=r"bad\.yaml: top level: no 'names' key"):
        read_class_names(tmp_path / "bad.yaml")


def test_save_coco_json_is_atomic(tmp_path):
    path = tmp_path / "sub" / "out.json"
    save_coco_json({"images": [1]}, path)
    assert json.loads(path.read_text()) == {"images": [1]}
    with pytest.raises(TypeError):
        save_coco_json({"images": [object()]}, path)
    assert json.loads(path.read_text()) == {"images": [1]}  # old content intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temp file left


def _truncate(path, keep=0.5):
    """Cut an image file to ``keep`` of its bytes (a partial download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _noisy_jpeg(path, size=(64, 48)):
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_voc_non_finite_coordinates_are_rejected(tmp_path, value):
    write_voc(tmp_path, "a", [("cat", 1, 1, 5, 5), ("cat", value, 2, 10, 12)])
    with pytest.raises(DatasetError, match=r"a\.xml: <object> #2 \(cat\): <bndbox> coordinates must be finite "
                                           r"numbers, got xmin=" + value.replace("-", r"\-")):
        voc_to_coco(tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf", "1e999"])
def test_voc_non_finite_size_is_rejected(tmp_path, value):
    write_voc(tmp_path, "a", [("cat", 1, 1, 5, 5)], xml_size=(value, 48))
    with pytest.raises(DatasetError, match=r"a\.xml: <size>: width/height must be finite numbers"):
        voc_to_coco(tmp_path)


def test_voc_truncated_and_empty_images_are_rejected(tmp_path):
    write_voc(tmp_path, "a", [("cat", 1, 1, 5, 5)])
    (tmp_path / "JPEGImages" / "a.png").unlink()
    _noisy_jpeg(tmp_path / "JPEGImages" / "a.jpg")
    assert voc_to_coco(tmp_path)["images"][0]["file_name"] == "a.jpg"
    _truncate(tmp_path / "JPEGImages" / "a.jpg")
    with pytest.raises(DatasetError, match=r"JPEGImages/a\.jpg: image: truncated or corrupt image") as info:
        voc_to_coco(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "JPEGImages" / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"JPEGImages/a\.jpg: image: file is empty \(0 bytes\)"):
        voc_to_coco(tmp_path)


def test_voc_size_mismatch_names_both_sizes(tmp_path):
    write_voc(tmp_path, "a", [("cat", 1, 1, 5, 5)], xml_size=(64, 50))
    with pytest.raises(DatasetError, match=r"a\.xml: <size>: says 64 x 50 but image a\.png is 64 x 48"):
        voc_to_coco(tmp_path)


def test_voc_without_objects_or_annotation_folder(tmp_path):
    write_voc(tmp_path, "a", [])
    with pytest.raises(DatasetError, match=r"Annotations: folder: no <object> found in any of the 1 XML files"):
        voc_to_coco(tmp_path)
    with pytest.raises(DatasetError, match=r"nowhere/Annotations: folder: annotation folder does not exist"):
        voc_to_coco(tmp_path / "nowhere")


@pytest.mark.parametrize("line", ["0 nan 0.5 0.2 0.2", "0 0.5 0.5 inf 0.2", "nan 0.5 0.5 0.2 0.2",
                                  "0 0.5 -inf 0.2 0.2"])
def test_yolo_non_finite_values_are_rejected(tmp_path, line):
    images, labels = _yolo_dir(tmp_path, ["0 0.5 0.5 0.1 0.1", line])
    with pytest.raises(DatasetError, match=r"a\.txt: line 2: fields must be finite numbers"):
        yolo_to_coco(images, labels, ["x", "y"])


def test_yolo_missing_or_empty_folders(tmp_path):
    images, labels = _yolo_dir(tmp_path, ["0 0.5 0.5 0.1 0.1"])
    with pytest.raises(DatasetError, match=r"lables: folder: labels folder does not exist"):
        yolo_to_coco(images, tmp_path / "lables", ["x", "y"])
    with pytest.raises(DatasetError, match=r"imgs: folder: images folder does not exist"):
        yolo_to_coco(tmp_path / "imgs", labels, ["x", "y"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "zzz.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"other: folder: has no label file for any of the 2 images"):
        yolo_to_coco(images, tmp_path / "other", ["x", "y"])
    coco = yolo_to_coco(images, labels, ["x", "y"])  # b.png without a label file: a background image
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 1


def test_yolo_truncated_image_is_rejected(tmp_path):
    images, labels = _yolo_dir(tmp_path, ["0 0.5 0.5 0.1 0.1"])
    _noisy_jpeg(images / "a.jpg", (100, 50))
    _truncate(images / "a.jpg")
    with pytest.raises(DatasetError, match=r"images/a\.jpg: image: truncated or corrupt image"):
        yolo_to_coco(images, labels, ["x", "y"])


def test_yolo_label_file_not_text_and_bad_class_file(tmp_path):
    images, labels = _yolo_dir(tmp_path, ["0 0.5 0.5 0.1 0.1"])
    (labels / "a.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match=r"a\.txt: file: cannot be read as UTF-8 text"):
        yolo_to_coco(images, labels, ["x", "y"])
    (tmp_path / "names.yaml").write_text("names: {a: cat, 0: dog}\n")
    with pytest.raises(DatasetError, match=r"names\.yaml: names: keys must be 0\.\.1"):
        read_class_names(tmp_path / "names.yaml")
