"""Resolving a dataset specification (a name or a path) to COCO JSON files and image folders."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2edet.data.convert import save_coco_json
from e2edet.data.errors import dataset_error, read_text
from e2edet.data.samples import cache_dir, prepare_trees
from e2edet.data.splits import SPLIT_SEED, split_coco
from e2edet.data.ultralytics import is_ultralytics_yaml, ultralytics_as_coco
from e2edet.data.voc import voc_class_names, voc_to_coco

__all__ = ["DatasetPaths", "resolve_dataset", "find_bccd", "find_dsb2018", "voc_as_coco", "ACCEPTED_SPECS"]

ACCEPTED_SPECS = (
    "'trees' (NEON tree crowns from the deepforest wheel: a held-out crop as val, two other sites as test), "
    "'bccd' (blood cells: $E2EDET_BCCD or shared/data/bccd in the current folder or one above it), "
    "'dsb2018' (nucleus instance masks: $E2EDET_DSB2018 or shared/data/dsb2018 in the current folder or one above "
    "it), "
    "a Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt), "
    "a dataset YAML file with keys train_json, train_images, val_json, val_images, "
    "or an Ultralytics YOLO data.yaml (path, train, val, names) or a folder holding one"
)
_YAML_KEYS = ("train_json", "train_images", "val_json", "val_images")


@dataclass(frozen=True)
class DatasetPaths:
    """Where a dataset's splits are: COCO JSON files and the image folders their ``file_name``s are relative to."""

    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path
    name: str
    test_json: Path | None = None
    test_images: Path | None = None
    """An optional test split, evaluated once at the end of training (the tree sample's cross-site images)."""


def _is_voc_root(path: Path) -> bool:
    return (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir()


def find_bccd() -> Path:
    """Locate the BCCD VOC folder: ``$E2EDET_BCCD`` if set, else ``shared/data/bccd`` in the current
    folder or any folder above it (so ``../shared/data/bccd`` from a repository clone).

    Raises:
        DatasetError: not found (the message lists the places looked at).
    """
    return _find_shared("bccd", "E2EDET_BCCD", _is_voc_root, "BCCD VOC folder")


def _find_shared(name: str, env: str, is_root, what: str) -> Path:
    """``$env`` if set, else ``shared/data/<name>`` in the current folder or any folder above it, the first where
    ``is_root(path)`` holds.

    Raises:
        DatasetError: not found (the message lists the places looked at).
    """
    value = os.environ.get(env)
    candidates = [Path(value)] if value else []
    cwd = Path.cwd().resolve()
    candidates += [folder / "shared" / "data" / name for folder in (cwd, *cwd.parents)]
    for candidate in candidates:
        if is_root(candidate):
            return candidate
    looked = ", ".join(str(c) for c in candidates[:4]) + (", ..." if len(candidates) > 4 else "")
    raise dataset_error(name, "dataset", f"{what} not found (set ${env}); looked at {looked}")


def _is_dsb2018_root(path: Path) -> bool:
    return (path / "train.json").is_file() and (path / "val.json").is_file() and (path / "images").is_dir()


def find_dsb2018() -> Path:
    """Locate the DSB2018 nucleus dataset (COCO JSON with RLE instance masks: ``train.json``, ``val.json``,
    ``images/``): ``$E2EDET_DSB2018`` if set, else ``shared/data/dsb2018`` in the current folder or any folder above
    it (so ``../shared/data/dsb2018`` from a repository clone).

    Raises:
        DatasetError: not found (the message lists the places looked at).
    """
    return _find_shared("dsb2018", "E2EDET_DSB2018", _is_dsb2018_root, "DSB2018 folder (train.json, val.json, images/)")


def voc_as_coco(voc_root: str | Path, name: str | None = None, val_fraction: float = 0.1) -> DatasetPaths:
    """Convert a VOC folder's ``train`` and ``val`` splits to COCO JSON in the cache (or reuse them).

    Both splits use the same classes: the sorted set of names found in train and val. Without
    ``ImageSets/Main/val.txt``, a seeded ``val_fraction`` of the ``train`` split (of every XML file when there is
    no ``train.txt`` either) is held out as validation (:func:`e2edet.data.splits.split_coco`, with a warning). The
    cache entry is ``cache_dir()/voc/<name>-<key>`` where the key hashes the resolved folder path, the held-out
    fraction and the modification times of every XML and split file, so editing an annotation triggers a new
    conversion.

    Raises:
        DatasetError: from :func:`~e2edet.data.voc.voc_to_coco` (missing split file, bad XML, ...), or fewer than 2
            images to split.
    """
    root = Path(voc_root).resolve()
    name = name or root.name
    splits = root / "ImageSets" / "Main"
    has_val = (splits / "val.txt").is_file()
    # v2: conversions decode every image and reject non-finite boxes; v1 entries may hold such data
    digest = hashlib.sha256(f"e2edet-voc-v2\n{root}\n{'' if has_val else val_fraction}\n".encode())
    watched = sorted((root / "Annotations").glob("*.xml")) + sorted(splits.glob("*.txt"))
    for path in watched:
        digest.update(f"{path.name}:{path.stat().st_mtime_ns}\n".encode())
    out = cache_dir() / "voc" / f"{name}-{digest.hexdigest()[:16]}"
    train_json, val_json = out / "train.json", out / "val.json"
    if not (train_json.is_file() and val_json.is_file()):
        if has_val:
            class_names = voc_class_names(root, ["train", "val"])
            train, val = voc_to_coco(root, "train", class_names), voc_to_coco(root, "val", class_names)
        else:
            split = "train" if (splits / "train.txt").is_file() else None
            train, val = split_coco(voc_to_coco(root, split), val_fraction, str(root))
            what = "its train split" if split else "its images"
            warnings.warn(f"{root}: no ImageSets/Main/val.txt; holding out {len(val['images'])} of "
                          f"{len(train['images']) + len(val['images'])} images of {what} as validation "
                          f"(data.val_fraction={val_fraction}, seed {SPLIT_SEED})", UserWarning, stacklevel=2)
        save_coco_json(train, train_json)
        save_coco_json(val, val_json)
    images = root / "JPEGImages"
    return DatasetPaths(train_json, images, val_json, images, name)


def _from_yaml(path: Path, val_fraction: float) -> DatasetPaths:
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise dataset_error(path, "file", f"invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise dataset_error(path, "top level", f"expected a mapping with keys {', '.join(_YAML_KEYS)}")
    if is_ultralytics_yaml(data):
        return DatasetPaths(*ultralytics_as_coco(path, data, val_fraction))
    missing = [k for k in _YAML_KEYS if k not in data]
    if missing:
        raise dataset_error(path, "top level", f"missing key(s) {', '.join(missing)} (or, for an Ultralytics "
                                               "data.yaml, train and names)")
    resolved = {}
    for key in _YAML_KEYS:
        value = (path.parent / str(data[key])).resolve()
        exists = value.is_file() if key.endswith("json") else value.is_dir()
        if not exists:
            raise dataset_error(path, key, f"{value} does not exist")
        resolved[key] = value
    test = {}
    if "test_json" in data or "test_images" in data:  # optional, both or neither
        for key in ("test_json", "test_images"):
            if key not in data:
                raise dataset_error(path, "top level", "test_json and test_images go together")
            value = (path.parent / str(data[key])).resolve()
            if not (value.is_file() if key.endswith("json") else value.is_dir()):
                raise dataset_error(path, key, f"{value} does not exist")
            test[key] = value
    return DatasetPaths(**resolved, name=str(data.get("name") or path.stem), **test)


def resolve_dataset(spec: str | Path, val_fraction: float = 0.1) -> DatasetPaths:
    """Turn a dataset specification into :class:`DatasetPaths`.

    Accepted: ``"trees"`` (:func:`~e2edet.data.samples.prepare_trees`: the held-out YELL crop validates,
    the two other sites are the test split), ``"bccd"`` (:func:`find_bccd`, converted like a VOC folder), ``"dsb2018"``
    (:func:`find_dsb2018`: its COCO JSON files as they are, with instance masks), a Pascal VOC folder
    (:func:`voc_as_coco`), a YAML file with ``train_json``, ``train_images``, ``val_json``,
    ``val_images`` paths relative to the YAML's folder (optional ``name``, and ``test_json`` + ``test_images`` for
    a test split evaluated at the end of training), or an Ultralytics ``data.yaml``
    (:func:`e2edet.data.ultralytics.ultralytics_as_coco`), also given as the folder holding ``data.yaml``.
    A VOC folder or Ultralytics file without a validation split gets a seeded held-out ``val_fraction``.

    Raises:
        DatasetError: an unknown specification (the message lists the accepted forms), a YAML file with
            missing keys or paths, or any conversion problem.
    """
    text = str(spec)
    if text == "trees":
        paths = prepare_trees()
        return DatasetPaths(paths["train_json"], paths["train_images"], paths["val_json"], paths["val_images"],
                            "trees", paths["test_json"], paths["test_images"])
    if text == "bccd":
        return voc_as_coco(find_bccd(), name="bccd", val_fraction=val_fraction)
    if text == "dsb2018":
        root = find_dsb2018()
        return DatasetPaths(root / "train.json", root / "images", root / "val.json", root / "images", "dsb2018")
    path = Path(text).expanduser()
    if path.is_dir() and _is_voc_root(path):
        return voc_as_coco(path, val_fraction=val_fraction)
    if path.is_dir() and (path / "data.yaml").is_file():
        path = path / "data.yaml"
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return _from_yaml(path, val_fraction)
    problem = "is a folder but not a VOC root and holds no data.yaml" if path.is_dir() else "is not a known dataset name or an existing path"
    raise dataset_error(text, "dataset spec", f"{problem}; accepted: {ACCEPTED_SPECS}")
