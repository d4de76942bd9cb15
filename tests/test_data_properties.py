"""Property tests: the VOC, YOLO, CrowdHuman and COCO readers fed malformed records.

Every outcome must be either a valid dataset (every box finite, non-empty and inside its image) or a
:class:`DatasetError` whose first line starts with the offending file (or folder) — never another exception.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from e2edet.data.coco import CocoDetection
from e2edet.data.crowdhuman import odgt_to_coco
from e2edet.data.errors import DatasetError
from e2edet.data.validate import load_coco_json, validate_coco
from e2edet.data.voc import voc_to_coco
from e2edet.data.yolo import yolo_to_coco

SIZE = 8  # every test image is SIZE x SIZE pixels
PROPERTY = settings(
    max_examples=60, deadline=None, derandomize=True,
    # the autouse fixtures of conftest.py (seed, cache folder) are function-scoped and harmless here
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)



def mostly(valid, bad, odds: int = 3):
    """``valid`` about ``odds`` times as often as ``bad``, so that valid datasets come out too."""
    share = 100 // (odds + 1)  # a band in the middle: Hypothesis favours the ends of an integer range
    return st.integers(0, 99).flatmap(lambda i: bad if 50 <= i < 50 + share else valid)


# a field as a user might (mis)type it: numbers, non-finite words, junk, empty
TEXT_NUMBERS = st.one_of(
    st.integers(-4, 12).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e999", "", " ", "x", "1,5", "0x10", "3.5.1", "1_0", "- 2"]),
    st.text(max_size=4),
)
JSON_NUMBERS = st.one_of(
    st.integers(-4, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, -(10**30), True, None, "3", [], {}]),
)


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    """One tiny SIZE x SIZE RGB PNG, copied into each example's folder."""
    path = tmp_path_factory.mktemp("png") / "tiny.png"
    Image.new("RGB", (SIZE, SIZE), (40, 90, 200)).save(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("examples")


def _fresh(work: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=work))


def _run(folder: Path, convert):
    """Call ``convert()``; return its COCO dict, or None after checking the DatasetError names a file in ``folder``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # clipped/skipped box reports
            return convert()
    except DatasetError as exc:
        first = str(exc).splitlines()[0]
        assert first.startswith(str(folder)), f"message does not start with a file in {folder}: {first!r}"
        assert ": " in first[len(str(folder)):], first
        return None


def _assert_valid_coco(coco: dict, folder: Path, image_dir: Path) -> None:
    """A converted dataset: images are the real 8x8 files and every box is finite and inside its image."""
    sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
    for img in coco["images"]:
        assert (img["width"], img["height"]) == (SIZE, SIZE) and (image_dir / img["file_name"]).is_file()
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert all(math.isfinite(v) for v in (x, y, w, h)), ann
        W, H = sizes[ann["image_id"]]
        assert 0 <= x < x + w <= W and 0 <= y < y + h <= H, ann
        assert ann["iscrowd"] in (0, 1) and 1 <= ann["category_id"] <= len(coco["categories"])
    validate_coco(json.loads(json.dumps(coco)), folder / "converted.json", image_dir)  # still valid after a JSON trip


# ---------------------------------------------------------------------------------------------------- VOC XML

VOC_COORD = mostly(st.integers(-1, SIZE + 2).map(str) | st.floats(0, SIZE).map(lambda v: f"{v:.2f}"),
                   st.one_of(st.none(), TEXT_NUMBERS), odds=8)
VOC_OBJECT = st.fixed_dictionaries(
    {"name": mostly(st.sampled_from(["cat", "dog"]), st.sampled_from(["", None, " cat "])),
     "bndbox": mostly(st.fixed_dictionaries({k: VOC_COORD for k in ("xmin", "ymin", "xmax", "ymax")}), st.none()),
     "difficult": mostly(st.sampled_from([None, "0", "1"]), st.sampled_from(["2", "", "yes", " 1"]))}
)
VOC_FILE = st.fixed_dictionaries(
    {"filename": st.sampled_from([None, "a.png", "a.png", "other.png", "", "a"]),
     "size": mostly(st.one_of(st.none(), st.just((str(SIZE), str(SIZE)))), st.tuples(TEXT_NUMBERS, TEXT_NUMBERS)),
     "objects": mostly(st.lists(VOC_OBJECT, min_size=1, max_size=3), st.just([])),
     "cut": mostly(st.none(), st.integers(0, 300), odds=5)}
)


def _tag(tag: str, value: str | None) -> str:
    return "" if value is None else f"<{tag}>{escape(value)}</{tag}>"


def _voc_xml(spec: dict) -> str:
    parts = ["<annotation>", _tag("filename", spec["filename"])]
    if spec["size"] is not None:
        parts.append(f"<size>{_tag('width', spec['size'][0])}{_tag('height', spec['size'][1])}</size>")
    for obj in spec["objects"]:
        box = obj["bndbox"]
        inner = "" if box is None else "<bndbox>" + "".join(_tag(k, v) for k, v in box.items()) + "</bndbox>"
        parts.append(f"<object>{_tag('name', obj['name'])}{_tag('difficult', obj['difficult'])}{inner}</object>")
    xml = "".join(parts) + "</annotation>"
    return xml if spec["cut"] is None else xml[: spec["cut"]]  # cut: broken XML


@PROPERTY
@given(spec=VOC_FILE)
def test_voc_reader_never_crashes(png, work, spec):
    root = _fresh(work)
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    shutil.copy(png, root / "JPEGImages" / "a.png")
    (root / "Annotations" / "a.xml").write_text(_voc_xml(spec), encoding="utf-8")
    coco = _run(root, lambda: voc_to_coco(root))
    if coco is not None:
        _assert_valid_coco(coco, root, root / "JPEGImages")


# ---------------------------------------------------------------------------------------------------- YOLO txt

YOLO_LINE = mostly(
    st.tuples(mostly(st.sampled_from(["0", "1"]), st.sampled_from(["2", "-1", "0.5", "nan", "1.0"])),
              *[mostly(st.floats(0, 1).map(lambda v: f"{v:.3f}"),
                       st.floats(-0.2, 1.2).map(lambda v: f"{v:.4f}") | st.sampled_from(
                           ["nan", "inf", "-inf", "1e999", "x", "1,5", "0x10", "3.5.1", "1_0", "-0"]), odds=12)] * 4
              ).map(" ".join),
    st.one_of(st.lists(st.floats(0, 1).map(lambda v: f"{v:.3f}"), max_size=7).map(" ".join), st.text(max_size=12)),
    odds=6,
)
YOLO_CASE = st.fixed_dictionaries(
    {"a": st.one_of(st.none(), st.lists(YOLO_LINE, max_size=4).map("\n".join), st.binary(max_size=16)),
     "b": st.one_of(st.none(), st.lists(YOLO_LINE, max_size=2).map("\n".join)),
     "labels_dir": st.sampled_from(["labels", "labels", "labels", "missing"])}
)


@PROPERTY
@given(case=YOLO_CASE)
def test_yolo_reader_never_crashes(png, work, case):
    root = _fresh(work)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for stem in ("a", "b"):
        shutil.copy(png, root / "images" / f"{stem}.png")
        content = case[stem]
        if isinstance(content, bytes):
            (root / "labels" / f"{stem}.txt").write_bytes(content)
        elif content is not None:
            (root / "labels" / f"{stem}.txt").write_text(content, encoding="utf-8")
    coco = _run(root, lambda: yolo_to_coco(root / "images", root / case["labels_dir"], ["x", "y"]))
    if coco is not None:
        assert case["labels_dir"] == "labels" and (case["a"] is not None or case["b"] is not None)
        _assert_valid_coco(coco, root, root / "images")


# ---------------------------------------------------------------------------------------------------- CrowdHuman

CH_BOX = mostly(st.lists(mostly(st.integers(-4, SIZE + 4), JSON_NUMBERS, odds=10), min_size=4, max_size=4),
                st.one_of(st.lists(JSON_NUMBERS, max_size=5), JSON_NUMBERS))
CH_ENTRY = mostly(
    st.fixed_dictionaries(
        {"tag": mostly(st.sampled_from(["person", "mask"]), st.sampled_from([3, None])), "fbox": CH_BOX},
        optional={"extra": mostly(st.fixed_dictionaries({}, optional={"ignore": st.sampled_from([0, 1])}),
                                  st.fixed_dictionaries({"ignore": JSON_NUMBERS}) | JSON_NUMBERS)},
    ),
    st.one_of(JSON_NUMBERS, st.fixed_dictionaries({"tag": st.just("person")})),
    odds=8,
)
CH_RECORD = mostly(
    st.fixed_dictionaries(
        {"ID": mostly(st.sampled_from(["a", "a.png", "b"]), st.sampled_from(["", 7, None, True, "missing", ["a"]])),
         "gtboxes": mostly(st.lists(CH_ENTRY, max_size=3), JSON_NUMBERS)},
    ).map(lambda r: json.dumps(r)),  # allow_nan: NaN/Infinity literals, as Python's json reads them
    st.one_of(
        st.text(max_size=20),
        st.sampled_from(["[]", "{", '{"ID": "a", "gtboxes": [' + "[" * 3000 + "]" * 3000 + "]}", "null",
                         '{"ID": "a"}', '{"ID": "a", "gtboxes": [{"tag": "person", "fbox": [1, 1, NaN, 2]}]}']),
    ),
    odds=5,
)


@PROPERTY
@given(lines=mostly(st.lists(CH_RECORD, min_size=1, max_size=3), st.just([])))
def test_crowdhuman_reader_never_crashes(png, work, lines):
    root = _fresh(work)
    (root / "images").mkdir()
    shutil.copy(png, root / "images" / "a.png")
    shutil.copy(png, root / "images" / "b.png")
    odgt = root / "ann.odgt"
    odgt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    coco = _run(root, lambda: odgt_to_coco(odgt, root / "images"))
    if coco is not None:
        _assert_valid_coco(coco, root, root / "images")


# ---------------------------------------------------------------------------------------------------- COCO JSON

COCO_IMAGE = st.fixed_dictionaries(
    {"id": mostly(st.sampled_from([1, 2]), st.sampled_from(["1", None, 2.5, True])),
     "file_name": mostly(st.just("a.png"), st.sampled_from(["missing.png", "", 3, "sub/../a.png", "b.png"])),
     "width": mostly(st.just(SIZE), JSON_NUMBERS, odds=6),
     "height": mostly(st.just(SIZE), JSON_NUMBERS, odds=6)}
)
COCO_ANN = st.fixed_dictionaries(
    {"id": st.integers(1, 4), "image_id": mostly(st.sampled_from([1, 2]), st.sampled_from([9, "1"])),
     "category_id": mostly(st.sampled_from([5, 6]), st.sampled_from([7, None, "5"])),
     "bbox": mostly(st.lists(mostly(st.integers(-2, SIZE + 1), JSON_NUMBERS, odds=12), min_size=4, max_size=4),
                    st.one_of(st.lists(JSON_NUMBERS, min_size=3, max_size=5), JSON_NUMBERS))},
    optional={"iscrowd": mostly(st.sampled_from([0, 1]), st.sampled_from([2, None, True, 0.5]))},
)
COCO_CATEGORY = st.fixed_dictionaries({"id": mostly(st.sampled_from([5, 6]), st.sampled_from(["5", None, 1.5])),
                                       "name": mostly(st.just("cell"), st.sampled_from([3, None, ""]))})
COCO_DICT = mostly(
    st.fixed_dictionaries(
        {"images": mostly(st.lists(COCO_IMAGE, min_size=1, max_size=2), st.just([])),
         "categories": mostly(st.lists(COCO_CATEGORY, min_size=1, max_size=2), st.lists(COCO_CATEGORY, max_size=0))},
        optional={"annotations": mostly(st.lists(COCO_ANN, max_size=4), JSON_NUMBERS, odds=8)},
    ),
    st.recursive(JSON_NUMBERS | st.text(max_size=3), lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.sampled_from(["images", "categories", "annotations", "x"]), inner, max_size=3),
                 max_leaves=6),
    odds=6,
)


@PROPERTY
@given(coco=COCO_DICT, raw=mostly(st.none(), st.binary(max_size=12), odds=8))
def test_coco_validation_and_loader_never_crash(png, work, coco, raw):
    root = _fresh(work)
    shutil.copy(png, root / "a.png")
    ann_file = root / "ann.json"
    if raw is not None:
        ann_file.write_bytes(raw)
    else:
        ann_file.write_text(json.dumps(coco), encoding="utf-8")
    checked = _run(root, lambda: validate_coco(load_coco_json(ann_file), ann_file, root) or True)
    dataset = _run(root, lambda: CocoDetection(ann_file, root))
    if checked:  # the loader validates the same way, only without decoding the images
        assert dataset is not None
    if dataset is None:
        return
    for index in range(len(dataset)):
        item = _run(root, lambda: dataset[index])
        if item is None:  # e.g. the JSON's width/height differ from the 8x8 file
            assert checked is None
            continue
        image, target = item
        assert image.shape == (3, SIZE, SIZE)
        boxes = target["boxes"]
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= SIZE).all() and (boxes[:, 0] < boxes[:, 2]).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= SIZE).all() and (boxes[:, 1] < boxes[:, 3]).all()
        assert ((target["labels"] >= 0) & (target["labels"] < dataset.num_classes)).all()
