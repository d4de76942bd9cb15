"""Dataset specifications: VOC folder (cached conversion), YAML file, unknown spec."""

import json
import os

import pytest
from PIL import Image

from e2edet.data.datasets import resolve_dataset
from e2edet.data.errors import DatasetError


def _voc(root, names):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, name in names.items():
        Image.new("RGB", (32, 24)).save(root / "JPEGImages" / f"{stem}.jpg")
        xml = (f"<annotation><filename>{stem}.jpg</filename><size><width>32</width><height>24</height></size>"
               f"<object><name>{name}</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>10</xmax><ymax>12</ymax>"
               "</bndbox></object></annotation>")
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\n")


def test_voc_folder_is_converted_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EDET_CACHE", str(tmp_path / "cache"))
    _voc(tmp_path / "voc", {"a": "cat", "b": "cat", "c": "dog"})
    paths = resolve_dataset(str(tmp_path / "voc"))
    assert paths.name == "voc" and paths.train_images == (tmp_path / "voc" / "JPEGImages").resolve()
    assert paths.train_json.parent.parent == tmp_path / "cache" / "voc"
    train, val = json.loads(paths.train_json.read_text()), json.loads(paths.val_json.read_text())
    # one class list for both splits: 'dog' occurs only in val
    assert train["categories"] == val["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert len(train["images"]) == 2 and val["annotations"][0]["category_id"] == 2
    assert resolve_dataset(str(tmp_path / "voc")) == paths  # reused
    xml = tmp_path / "voc" / "Annotations" / "c.xml"
    xml.write_text(xml.read_text().replace("dog", "bird"))
    os.utime(xml, ns=(1, 1))
    changed = resolve_dataset(str(tmp_path / "voc"))
    assert changed.val_json != paths.val_json  # edited annotations -> new conversion
    assert json.loads(changed.val_json.read_text())["categories"][0]["name"] == "bird"


def test_yaml_spec(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "train.json").write_text("{}")
    (tmp_path / "val.json").write_text("{}")
    spec = tmp_path / "data.yaml"
    spec.write_text("train_json: train.json\ntrain_images: imgs\nval_json: val.json\nval_images: imgs\n")
    paths = resolve_dataset(str(spec))
    assert paths.name == "data" and paths.val_json == (tmp_path / "val.json").resolve()
    spec.write_text("train_json: train.json\ntrain_images: imgs\nval_json: nope.json\nval_images: imgs\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: val_json: .*nope\.json does not exist"):
        resolve_dataset(str(spec))
    spec.write_text("train_json: train.json\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: top level: missing key\(s\) train_images"):
        resolve_dataset(str(spec))


def test_unknown_spec_lists_accepted_forms(tmp_path):
    with pytest.raises(DatasetError, match=r"no-such-data: dataset spec: .*accepted: 'trees'.*'bccd'.*VOC.*YAML"):
        resolve_dataset("no-such-data")
    with pytest.raises(DatasetError, match=r"is a folder but not a VOC root"):
        resolve_dataset(str(tmp_path))


def test_bccd_not_found_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EDET_BCCD", str(tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"bccd: dataset: BCCD VOC folder not found \(set \$E2EDET_BCCD\)"):
        resolve_dataset("bccd")
