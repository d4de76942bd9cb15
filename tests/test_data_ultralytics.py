"""Ultralytics data.yaml datasets and the seeded validation split (VOC or YOLO data without a val split)."""

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from e2edet.data.coco import CocoDetection
from e2edet.data.datasets import resolve_dataset
from e2edet.data.errors import DatasetError
from e2edet.data.splits import split_coco
from e2edet.data.ultralytics import label_path


def _image(path: Path, size=(40, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)


def _yolo_dataset(root: Path, val: bool = True, n_train: int = 3) -> Path:
    """Ultralytics layout: images/{train,val}/*.jpg, labels/{train,val}/*.txt, data.yaml with a names mapping."""
    for i in range(n_train):
        _image(root / "images" / "train" / f"t{i}.jpg")
        label = root / "labels" / "train" / f"t{i}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(f"{i % 2} 0.5 0.5 0.5 0.4\n")  # 40x20 image: box (10, 6, 30, 14)
    _image(root / "images" / "train" / "background.jpg")  # no label file: an image without objects
    if val:
        _image(root / "images" / "val" / "v0.jpg")
        (root / "labels" / "val").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "val" / "v0.txt").write_text("1 0.25 0.5 0.5 1.0\n")
    lines = ["path: .", "train: images/train", "names:", "  0: tree", "  1: shrub"]
    if val:
        lines.insert(2, "val: images/val")
    (root / "data.yaml").write_text("\n".join(lines) + "\n")
    return root / "data.yaml"


def test_label_path_replaces_the_last_images_component():
    assert label_path(Path("/d/images/train/a.jpg")) == Path("/d/labels/train/a.txt")
    assert label_path(Path("/images/d/images/x/b.png")) == Path("/images/d/labels/x/b.txt")
    assert label_path(Path("/d/pics/c.jpg")) == Path("/d/pics/c.txt")


def test_ultralytics_yaml_converts_boxes_and_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EDET_CACHE", str(tmp_path / "cache"))
    spec = _yolo_dataset(tmp_path / "ds")
    paths = resolve_dataset(str(spec))
    assert paths.name == "data" and paths.train_images == (tmp_path / "ds").resolve()
    train, val = json.loads(paths.train_json.read_text()), json.loads(paths.val_json.read_text())
    assert train["categories"] == [{"id": 1, "name": "tree"}, {"id": 2, "name": "shrub"}]
    assert [img["file_name"] for img in train["images"]] == [
        "images/train/background.jpg", "images/train/t0.jpg", "images/train/t1.jpg", "images/train/t2.jpg"]
    assert len(train["annotations"]) == 3 and train["annotations"][0]["bbox"] == pytest.approx([10, 6, 20, 8])
    assert [a["category_id"] for a in train["annotations"]] == [1, 2, 1]
    assert val["annotations"][0]["bbox"] == pytest.approx([0, 0, 20, 20]) and val["annotations"][0]["category_id"] == 2
    assert resolve_dataset(str(tmp_path / "ds")) == paths  # the folder holding data.yaml; cached conversion reused
    item = CocoDetection(paths.train_json, paths.train_images)[1]  # the dataset reads the images from the root
    assert item[1]["boxes"].tolist() == [[10.0, 6.0, 30.0, 14.0]]


def test_ultralytics_image_list_file(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EDET_CACHE", str(tmp_path / "cache"))
    spec = _yolo_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "train.txt").write_text("./images/train/t0.jpg\n./images/train/t2.jpg\n")
    spec.write_text(spec.read_text().replace("train: images/train", "train: train.txt"))
    train = json.loads(resolve_dataset(str(spec)).train_json.read_text())
    assert [img["file_name"] for img in train["images"]] == ["images/train/t0.jpg", "images/train/t2.jpg"]


def test_ultralytics_without_val_holds_out_a_seeded_split(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EDET_CACHE", str(tmp_path / "cache"))
    spec = _yolo_dataset(tmp_path / "ds", val=False, n_train=9)
    with pytest.warns(UserWarning, match=r"no 'val' split; holding out 1 of 10 train images"):
        paths = resolve_dataset(str(spec), val_fraction=0.1)
    train, val = json.loads(paths.train_json.read_text()), json.loads(paths.val_json.read_text())
    assert len(train["images"]) == 9 and len(val["images"]) == 1
    with pytest.warns(UserWarning, match="holding out 3 of 10"):
        other = resolve_dataset(str(spec), val_fraction=0.3)  # another fraction: another cache entry
    assert other.val_json != paths.val_json


@pytest.mark.parametrize("edit, match", [
    (("path: .", "path: nowhere"), r"data\.yaml: path: dataset root .*nowhere does not exist"),
    (("train: images/train", "train: images/none"), r"data\.yaml: train: .*none is neither an image folder"),
    (("val: images/val", "val: [3]"), r"data\.yaml: val: expected a folder, a \.txt image list"),
])
def test_ultralytics_errors_name_the_key(tmp_path, monkeypatch, edit, match):
    monkeypatch.setenv("E2EDET_CACHE", str(tmp_path / "cache"))
    spec = _yolo_dataset(tmp_path / "ds")
    spec.write_text(spec.read_text().replace(*edit))
    with pytest.raises(DatasetError, match=match):
        resolve_dataset(str(spec))


def test_ultralytics_without_any_label_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EDET_CACHE", str(tmp_path / "cache"))
    spec = _yolo_dataset(tmp_path / "ds")
    for label in (tmp_path / "ds" / "labels" / "val").iterdir():
        label.unlink()
    with pytest.raises(DatasetError, match=r"data\.yaml: val: no label file for any of its 1 images"):
        resolve_dataset(str(spec))


def _coco(n: int) -> dict:
    return {"images": [{"id": 10 + i, "file_name": f"{i}.jpg"} for i in range(n)],
            "annotations": [{"id": 100 + i, "image_id": 10 + i // 2} for i in range(2 * n)],
            "categories": [{"id": 1, "name": "a"}], "info": {"description": "x"}}


@pytest.mark.parametrize("n, fraction, n_val", [(2, 0.1, 1), (10, 0.25, 2), (10, 0.95, 9), (87, 0.2, 17)])
def test_split_is_seeded_disjoint_and_complete(n, fraction, n_val):
    coco = _coco(n)
    train, val = split_coco(coco, fraction, "x")
    assert len(val["images"]) == n_val and len(train["images"]) == n - n_val
    ids = [img["id"] for img in train["images"] + val["images"]]
    assert sorted(ids) == [img["id"] for img in coco["images"]]
    for part in (train, val):
        own = {img["id"] for img in part["images"]}
        assert {a["image_id"] for a in part["annotations"]} <= own and part["categories"] == coco["categories"]
        assert len(part["annotations"]) == 2 * len(own)
    assert split_coco(coco, fraction, "x") == (train, val)  # the same split every time
    assert split_coco(coco, fraction, "x", seed=1) != (train, val) or n == 2


def test_split_errors():
    with pytest.raises(DatasetError, match=r"x: images: 1 image\(s\): cannot hold out"):
        split_coco(_coco(1), 0.1, "x")
    with pytest.raises(ValueError, match=r"data\.val_fraction 1\.0: must be in \(0, 1\)"):
        split_coco(_coco(3), 1.0, "x")


def test_voc_folder_without_val_split(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EDET_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    for i in range(5):
        _image(root / "JPEGImages" / f"im{i}.jpg", (32, 24))
        (root / "Annotations" / f"im{i}.xml").write_text(
            f"<annotation><filename>im{i}.jpg</filename><size><width>32</width><height>24</height></size><object>"
            "<name>cell</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>10</xmax><ymax>12</ymax></bndbox></object>"
            "</annotation>")
    with pytest.warns(UserWarning, match=r"no ImageSets/Main/val\.txt; holding out 2 of 5 images of its images"):
        paths = resolve_dataset(str(root), val_fraction=0.4)
    train, val = json.loads(paths.train_json.read_text()), json.loads(paths.val_json.read_text())
    assert len(train["images"]) == 3 and len(val["images"]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dataset(str(root), val_fraction=0.4) == paths  # cached: no second conversion
