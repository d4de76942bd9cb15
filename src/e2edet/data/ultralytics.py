"""Ultralytics YOLO datasets (a ``data.yaml`` with ``path``, ``train``, ``val``, ``names``) as COCO JSON.

The layout is Ultralytics' (https://docs.ultralytics.com/datasets/detect/): ``path`` is the dataset root (relative
paths are resolved against the YAML's folder; absent means that folder), ``train`` / ``val`` (and ``test``, unused)
are each an image folder (searched recursively), a ``.txt`` file listing image paths (``./``-relative lines are
relative to the list's folder), or a list of those, relative to the root. The label file of ``.../images/.../a.jpg``
is ``.../labels/.../a.txt`` (the last ``images`` path component replaced, Ultralytics' ``img2label_paths``);
an image without one is a background image. ``names`` is a list or an ``{index: name}`` mapping. Without ``val``, a
seeded ``data.val_fraction`` of ``train`` is held out (:func:`e2edet.data.splits.split_coco`).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

from e2edet.data.convert import save_coco_json
from e2edet.data.errors import dataset_error, read_text
from e2edet.data.samples import cache_dir
from e2edet.data.splits import SPLIT_SEED, split_coco
from e2edet.data.yolo import IMAGE_SUFFIXES, read_class_names, yolo_pairs_to_coco

__all__ = ["is_ultralytics_yaml", "ultralytics_as_coco", "label_path"]


def is_ultralytics_yaml(data: Any) -> bool:
    """Whether a loaded YAML mapping is an Ultralytics dataset file (``train`` and ``names``, no ``train_json``)."""
    return isinstance(data, dict) and "train" in data and "names" in data and "train_json" not in data


def label_path(image: Path) -> Path:
    """The YOLO label file of ``image``: the last ``images`` path component becomes ``labels``, suffix ``.txt``
    (Ultralytics ``img2label_paths``); an image with no ``images`` component has its label file beside it."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _images_of(yaml_path: Path, root: Path, key: str, entry: Any) -> list[Path]:
    """The image files of one ``train``/``val`` entry (folder, list file, or a list of those), sorted per source."""
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for item in entries:
        if not isinstance(item, str) or not item.strip():
            raise dataset_error(yaml_path, key, f"expected a folder, a .txt image list or a list of them, got {item!r}")
        source = root / Path(item).expanduser()
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif source.is_file() and source.suffix.lower() == ".txt":
            for line in read_text(source).splitlines():
                line = line.strip()
                if line:
                    files.append((source.parent / line).resolve() if not Path(line).is_absolute() else Path(line))
        else:
            raise dataset_error(yaml_path, key, f"{source} is neither an image folder nor a .txt image list")
    if not files:
        raise dataset_error(yaml_path, key, f"no images ({', '.join(IMAGE_SUFFIXES)}) in {entry}")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise dataset_error(yaml_path, key, f"{len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
    return files


def _to_coco(yaml_path: Path, root: Path, key: str, files: list[Path], names: list[str]) -> dict:
    pairs = []
    for image in files:
        try:
            file_name = str(image.resolve().relative_to(root.resolve()))
        except ValueError:  # an image outside the root (absolute path in a list file)
            file_name = str(image.resolve())
        pairs.append((image, label_path(image), file_name))
    if not any(label.is_file() for _, label, _ in pairs):
        raise dataset_error(yaml_path, key, f"no label file for any of its {len(files)} images (expected e.g. "
                                            f"{pairs[0][1]})")
    return yolo_pairs_to_coco(pairs, names, f"Ultralytics dataset {yaml_path} ({key})")


def ultralytics_as_coco(
    yaml_path: str | Path, data: dict, val_fraction: float = 0.1
) -> tuple[Path, Path, Path, Path, str]:
    """Convert an Ultralytics dataset YAML (already loaded as ``data``) to COCO JSON in the cache, or reuse it.

    Returns:
        ``(train_json, image_root, val_json, image_root, name)``, the fields of
        :class:`e2edet.data.datasets.DatasetPaths`; the image root is the dataset root (``file_name`` relative
        to it). The cache key hashes the YAML's path and text, ``val_fraction`` and the modification times of
        every image and label file, so an edited label triggers a new conversion.

    Raises:
        DatasetError: bad ``path``/``train``/``val``/``names`` (naming the key), missing images, no label file
            at all, a bad label line (naming the file and line), or fewer than 2 images to split.
    """
    yaml_path = Path(yaml_path).resolve()
    base = data.get("path") or "."
    if not isinstance(base, str):
        raise dataset_error(yaml_path, "path", f"expected a folder, got {base!r}")
    root = (yaml_path.parent / Path(base).expanduser()).resolve()
    if not root.is_dir():
        raise dataset_error(yaml_path, "path", f"dataset root {root} does not exist")
    names = read_class_names(yaml_path)
    train_files = _images_of(yaml_path, root, "train", data["train"])
    val_files = _images_of(yaml_path, root, "val", data["val"]) if data.get("val") else None
    digest = hashlib.sha256(f"e2edet-ultralytics-v1\n{yaml_path}\n{read_text(yaml_path)}\n".encode())
    digest.update(f"{'' if val_files else val_fraction}\n".encode())
    for image in train_files + (val_files or []):
        label = label_path(image)
        stamp = label.stat().st_mtime_ns if label.is_file() else 0
        digest.update(f"{image}:{image.stat().st_mtime_ns}:{stamp}\n".encode())
    name = str(data.get("name") or yaml_path.stem)
    out = cache_dir() / "ultralytics" / f"{name}-{digest.hexdigest()[:16]}"
    train_json, val_json = out / "train.json", out / "val.json"
    if not (train_json.is_file() and val_json.is_file()):
        train = _to_coco(yaml_path, root, "train", train_files, names)
        if val_files:
            val = _to_coco(yaml_path, root, "val", val_files, names)
        else:
            train, val = split_coco(train, val_fraction, str(yaml_path))
            warnings.warn(f"{yaml_path}: no 'val' split; holding out {len(val['images'])} of "
                          f"{len(train['images']) + len(val['images'])} train images as validation "
                          f"(data.val_fraction={val_fraction}, seed {SPLIT_SEED})", UserWarning, stacklevel=2)
        save_coco_json(train, train_json)
        save_coco_json(val, val_json)
    return train_json, root, val_json, root, name
