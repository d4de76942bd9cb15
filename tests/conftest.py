"""Shared fixtures: the real BCCD dataset beside the project, and a deterministic CPU setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from e2edet.data.convert import save_coco_json, voc_to_coco

ROOT = Path(__file__).resolve().parents[1]


def _bccd_root() -> Path | None:
    for candidate in (os.environ.get("E2EDET_BCCD"), ROOT.parent / "shared" / "data" / "bccd"):
        if candidate and (Path(candidate) / "Annotations").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    """The BCCD VOC dataset at ../shared/data/bccd (or $E2EDET_BCCD); skips when absent."""
    root = _bccd_root()
    if root is None:
        pytest.skip("BCCD not found at ../shared/data/bccd (set E2EDET_BCCD to its folder)")
    return root


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch, tmp_path_factory):
    """Seed torch, and keep every cache (sample data, converted datasets) inside a per-session temp folder."""
    torch.manual_seed(0)
    if "E2EDET_CACHE" not in os.environ:
        monkeypatch.setenv("E2EDET_CACHE", str(tmp_path_factory.getbasetemp() / "e2edet-cache"))


@pytest.fixture(scope="session")
def bccd_subset(tmp_path_factory) -> Path:
    """Dataset YAML over 6 train and 3 val real BCCD images (COCO JSON converted by the VOC importer)."""
    root = _bccd_root()
    if root is None:
        pytest.skip("BCCD not found at ../shared/data/bccd")
    out = tmp_path_factory.mktemp("bccd_subset")
    spec = {}
    for split, n in (("train", 6), ("val", 3)):
        with pytest.warns(UserWarning, match="zero-size"):  # one degenerate RBC box per split in BCCD
            coco = voc_to_coco(root, split=split, class_names=["Platelets", "RBC", "WBC"])
        keep = {img["id"] for img in coco["images"][:n]}
        coco["images"] = [i for i in coco["images"] if i["id"] in keep]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        save_coco_json(coco, out / f"{split}.json")
        spec[f"{split}_json"], spec[f"{split}_images"] = f"{split}.json", str(root / "JPEGImages")
    (out / "data.yaml").write_text(yaml.safe_dump(spec))
    return out / "data.yaml"


#: Overrides that shrink a CPU recipe to a model and image size a unit test can train in seconds.
#: Keys of every architecture; :data:`TINY` adds the dense head depth.
TINY_COMMON = ["model.pretrained=false", "model.fpn_channels=32", "data.train_min_sizes=192", "data.train_max_size=256",
               "data.test_min_size=192", "data.test_max_size=256", "batch=2", "workers=0", "train.warmup_iters=2",
               "train.log_period=1"]
TINY = [*TINY_COMMON, "model.num_convs=1"]
