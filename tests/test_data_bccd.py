"""The VOC importer and the dataset on the real BCCD blood-cell data (../shared/data/bccd)."""

import collections
import os
from pathlib import Path

import pytest
import torch

from e2edet.data.coco import CocoDetection
from e2edet.data.datasets import resolve_dataset
from e2edet.data.transforms import build_eval_transforms
from e2edet.data.voc import voc_class_names, voc_to_coco

BCCD = Path(os.environ.get("E2EDET_BCCD") or Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd")
pytestmark = pytest.mark.skipif(
    not (BCCD / "Annotations").is_dir(), reason=f"BCCD data not found at {BCCD} (set E2EDET_BCCD)"
)
CLASSES = ["Platelets", "RBC", "WBC"]


def _counts(coco):
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return dict(collections.Counter(names[a["category_id"]] for a in coco["annotations"]))


@pytest.mark.parametrize(
    "split, images, counts, skipped",
    [
        # README counts the XML objects (RBC 2382 / 968); each split has one zero-size RBC box that is skipped.
        ("train", 205, {"RBC": 2381, "WBC": 214, "Platelets": 209}, "BloodImage_00343.xml <object> #4 (RBC)"),
        ("val", 87, {"RBC": 967, "WBC": 87, "Platelets": 83}, "BloodImage_00338.xml <object> #13 (RBC)"),
    ],
)
def test_bccd_split_counts(split, images, counts, skipped):
    with pytest.warns(UserWarning, match=r"1 VOC box\(es\) skipped as zero-size") as record:
        coco = voc_to_coco(BCCD, split)
    assert skipped in str(record[0].message)
    assert len(coco["images"]) == images
    assert _counts(coco) == counts
    assert [c["name"] for c in coco["categories"]] == CLASSES
    assert all(i["width"] == 640 and i["height"] == 480 for i in coco["images"])
    assert not any(a["iscrowd"] for a in coco["annotations"])


def test_bccd_known_record_and_class_names():
    assert voc_class_names(BCCD, ["train", "val"]) == CLASSES
    # BloodImage_00000.xml, first object: WBC xmin=260 ymin=177 xmax=491 ymax=376 (1-based, inclusive)
    with pytest.warns(UserWarning):
        coco = voc_to_coco(BCCD, "val", CLASSES)
    first = coco["images"][0]
    assert first["file_name"] == "BloodImage_00000.jpg" and first["id"] == 1
    ann = next(a for a in coco["annotations"] if a["image_id"] == 1)
    assert ann["category_id"] == CLASSES.index("WBC") + 1
    assert ann["bbox"] == [259.0, 176.0, 232.0, 200.0]


def test_bccd_resolves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EDET_CACHE", str(tmp_path))
    monkeypatch.setenv("E2EDET_BCCD", str(BCCD))
    with pytest.warns(UserWarning):
        paths = resolve_dataset("bccd")
    assert paths.name == "bccd" and paths.val_images == BCCD.resolve() / "JPEGImages"
    ds = CocoDetection(paths.val_json, paths.val_images, build_eval_transforms(240, 400))
    assert len(ds) == 87 and ds.class_names == CLASSES
    image, target = ds[0]
    assert image.shape == (3, 240, 320) and image.dtype == torch.float32
    assert target["orig_size"].tolist() == [480, 640] and target["size"].tolist() == [240, 320]
    raw = [a["bbox"] for a in ds.annotations(0)]
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in raw]) * 0.5
    torch.testing.assert_close(target["boxes"], expected)
