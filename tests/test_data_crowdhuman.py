"""CrowdHuman .odgt importer on the hand-written fixture tests/fixtures/crowdhuman (images generated here)."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
from PIL import Image

from e2edet.cli import main
from e2edet.data.convert import odgt_to_coco
from e2edet.data.errors import DatasetError
from e2edet.data.validate import validate_coco

FIXTURE = Path(__file__).parent / "fixtures" / "crowdhuman" / "annotation.odgt"


@pytest.fixture
def images(tmp_path):
    """The fixture's images: img1.jpg 80x100, img2.png 64x48, img3.png 32x32."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("img1.jpg", (80, 100)), ("img2.png", (64, 48)), ("img3.png", (32, 32))):
        Image.new("RGB", size, (90, 60, 30)).save(folder / name)
    return folder


def write_odgt(tmp_path, lines):
    path = tmp_path / "ann.odgt"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_fbox_conversion_ignore_rules_and_clipping(images):
    with pytest.warns(UserWarning, match=r"1 fbox box\(es\) clipped.*1 dropped") as record:
        coco = odgt_to_coco(FIXTURE, images)
    assert len(record) == 1
    validate_coco(coco, "converted", images)
    assert coco["categories"] == [{"id": 1, "name": "person"}]
    assert coco["images"] == [
        {"id": 1, "file_name": "img1.jpg", "width": 80, "height": 100},
        {"id": 2, "file_name": "img2.png", "width": 64, "height": 48},  # ID already has its extension
        {"id": 3, "file_name": "img3.png", "width": 32, "height": 32},  # ID + .png
    ]
    got = [(a["id"], a["image_id"], a["bbox"], a["area"], a["iscrowd"]) for a in coco["annotations"]]
    assert got == [
        (1, 1, [10.0, 10.0, 20.0, 40.0], 800.0, 0),    # person, extra without "ignore"
        (2, 1, [0.0, 50.0, 20.0, 50.0], 1000.0, 0),    # [-10, 50, 30, 60] clipped to x in [0, 20], y in [50, 100]
        (3, 1, [40.0, 5.0, 20.0, 30.0], 600.0, 1),     # person with extra.ignore = 1
        (4, 1, [50.0, 60.0, 25.0, 30.0], 750.0, 1),    # "mask" region
        (5, 2, [5.0, 5.0, 10.0, 10.0], 100.0, 0),      # no "extra"; [100, 0, 10, 10] lies outside 64 x 48: dropped
    ]
    assert all(a["category_id"] == 1 for a in coco["annotations"])


def test_head_boxes_use_head_attr_ignore(images):
    with pytest.warns(UserWarning, match="dropped"):
        coco = odgt_to_coco(FIXTURE, images, box_type="hbox")
    got = [(a["image_id"], a["bbox"], a["iscrowd"]) for a in coco["annotations"]]
    assert got == [
        (1, [15.0, 10.0, 8.0, 8.0], 0),
        (1, [0.0, 50.0, 5.0, 5.0], 1),  # head_attr.ignore = 1
        (1, [45.0, 5.0, 6.0, 6.0], 1),
        (1, [50.0, 60.0, 25.0, 30.0], 1),
        (2, [8.0, 5.0, 4.0, 4.0], 0),
    ]


def test_visible_boxes_and_no_warning_when_nothing_clipped(tmp_path, images):
    odgt = write_odgt(tmp_path, [{"ID": "img3", "gtboxes": [{"tag": "person", "fbox": [-5, 0, 9, 9],
                                                              "vbox": [0, 0, 4, 9]}]}])
    with pytest.warns(UserWarning, match="1 fbox box"):
        odgt_to_coco(odgt, images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coco = odgt_to_coco(odgt, images, box_type="vbox")
    assert coco["annotations"][0]["bbox"] == [0.0, 0.0, 4.0, 9.0]


def test_missing_image_names_file_and_line(tmp_path, images):
    odgt = write_odgt(tmp_path, [{"ID": "img3", "gtboxes": []}, "", {"ID": "nope", "gtboxes": []}])
    with pytest.raises(DatasetError, match=r"ann\.odgt: line 3 \(ID nope\): image not found"):
        odgt_to_coco(odgt, images)


def test_bad_json_line(tmp_path, images):
    odgt = write_odgt(tmp_path, [{"ID": "img3", "gtboxes": []}, '{"ID": "img1", "gtboxes": [}'])
    with pytest.raises(DatasetError, match=r"ann\.odgt: line 2 column \d+: invalid JSON"):
        odgt_to_coco(odgt, images)


BOX0 = r"line 1 \(ID img1\) gtboxes\[0\]: "


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"gtboxes": []}, r"line 1: missing or empty 'ID'"),
        ('["img1"]', r"line 1: expected a JSON object"),
        ({"ID": "img1"}, r"line 1 \(ID img1\): 'gtboxes' must be a list"),
        ({"ID": "img1", "gtboxes": [{"fbox": [0, 0, 1, 1]}]}, BOX0 + "expected an object with a string 'tag'"),
        ({"ID": "img1", "gtboxes": [{"tag": "person", "fbox": [0, 0, 1]}]}, BOX0 + "bad fbox"),
        ({"ID": "img1", "gtboxes": [{"tag": "person", "fbox": [0, 0, "a", 1]}]}, BOX0 + "bad fbox"),
        ({"ID": "img1", "gtboxes": [{"tag": "person", "vbox": [0, 0, 1, 1]}]}, BOX0 + "bad fbox None"),
        ({"ID": "img1", "gtboxes": [{"tag": "person", "fbox": [0, 0, -3, 1]}]}, BOX0 + ".*negative"),
        ({"ID": "img1", "gtboxes": [{"tag": "person", "fbox": [0, 0, 3, 1], "extra": {"ignore": "x"}}]},
         BOX0 + "'extra.ignore' must be a number"),
    ],
)
def test_bad_records(tmp_path, images, record, message):
    with pytest.raises(DatasetError, match=r"ann\.odgt: " + message):
        odgt_to_coco(write_odgt(tmp_path, [record]), images)


def test_duplicate_id_empty_file_and_bad_arguments(tmp_path, images):
    odgt = write_odgt(tmp_path, [{"ID": "img3", "gtboxes": []}, {"ID": "img3", "gtboxes": []}])
    with pytest.raises(DatasetError, match=r"line 2 \(ID img3\): duplicate ID, first seen on line 1"):
        odgt_to_coco(odgt, images)
    empty = tmp_path / "empty.odgt"
    empty.write_text("\n  \n")
    with pytest.raises(DatasetError, match="contains no records"):
        odgt_to_coco(empty, images)
    with pytest.raises(DatasetError, match="does not exist"):
        odgt_to_coco(tmp_path / "missing.odgt", images)
    with pytest.raises(DatasetError, match="images folder does not exist"):
        odgt_to_coco(FIXTURE, tmp_path / "no_images")
    with pytest.raises(ValueError, match="box_type"):
        odgt_to_coco(FIXTURE, images, box_type="bbox")


def test_unreadable_image(tmp_path, images):
    (images / "img3.png").write_bytes(b"not an image")
    odgt = write_odgt(tmp_path, [{"ID": "img3", "gtboxes": []}])
    with pytest.raises(DatasetError, match=r"img3\.png: image: not an image file"):
        odgt_to_coco(odgt, images)


def test_cli_convert_crowdhuman(tmp_path, images, capsys):
    odgt = tmp_path / "annotation_val.odgt"
    shutil.copy(FIXTURE, odgt)
    out = tmp_path / "val.json"
    with pytest.warns(UserWarning, match="clipped"):
        assert main(["data", "convert", "crowdhuman", str(odgt), str(images), "--out", str(out)]) == 0
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 3 and len(coco["annotations"]) == 5
    assert "3 images, 5 boxes, 1 categories" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="dropped"):
        assert main(["data", "convert", "crowdhuman", str(odgt), str(images), "--out", str(out), "--box", "hbox"]) == 0
    assert [a["iscrowd"] for a in json.loads(out.read_text())["annotations"]] == [0, 1, 1, 1, 0]
    assert main(["data", "convert", "crowdhuman", str(odgt), "--out", str(out)]) == 2
    assert "usage: e2edet data convert crowdhuman" in capsys.readouterr().err


@pytest.mark.parametrize("box", ["[NaN, 1, 10, 10]", "[1, 1, Infinity, 10]", "[1, -Infinity, 10, 10]",
                                 "[1, 1, 1e999, 10]",
                                 "[1, 1, 1" + "0" * 400 + ", 10]"])
def test_non_finite_box_is_rejected(tmp_path, images, box):
    line = '{"ID": "img3", "gtboxes": [{"tag": "person", "fbox": ' + box + "}]}"
    odgt = write_odgt(tmp_path, [line])
    with pytest.raises(DatasetError, match=r"ann\.odgt: line 1 \(ID img3\) gtboxes\[0\]: bad fbox .*expected 4 "):
        odgt_to_coco(odgt, images)


def test_truncated_or_empty_image_is_rejected(tmp_path, images):
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "img1.jpg", quality=90)
    data = (images / "img1.jpg").read_bytes()
    (images / "img1.jpg").write_bytes(data[: len(data) // 2])
    odgt = write_odgt(tmp_path, [{"ID": "img1", "gtboxes": []}])
    with pytest.raises(DatasetError, match=r"img1\.jpg: image: truncated or corrupt image"):
        odgt_to_coco(odgt, images)
    (images / "img1.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"img1\.jpg: image: file is empty \(0 bytes\)"):
        odgt_to_coco(odgt, images)


def test_json_beyond_parser_limits_is_a_dataset_error(tmp_path, images):
    odgt = write_odgt(tmp_path, ['{"ID": "img3", "gtboxes": [' + "[" * 100000 + "]" * 100000 + "]}"])
    with pytest.raises(DatasetError, match=r"ann\.odgt: line 1: invalid JSON"):
        odgt_to_coco(odgt, images)
    odgt = write_odgt(tmp_path, ['{"ID": ' + "1" * 5000 + ', "gtboxes": []}'])
    with pytest.raises(DatasetError, match=r"ann\.odgt: line 1: invalid JSON"):
        odgt_to_coco(odgt, images)
