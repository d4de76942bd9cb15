"""YOLO text labels → COCO detection dicts, and class-name lists.

A YOLO label file ``labels_dir/<image stem>.txt`` has one object per line, ``class cx cy w h``, where
``class`` is a 0-based class index and the box is centre/size normalised by the image width and height
(``cx, w`` divided by W, ``cy, h`` divided by H, all in ``[0, 1]``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import yaml

from e2edet.data.errors import dataset_error, read_text
from e2edet.data.validate import decode_image_size

__all__ = ["read_class_names", "yolo_to_coco", "yolo_pairs_to_coco", "YOLO_TOLERANCE", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
YOLO_TOLERANCE = 1e-3
"""How far a normalised YOLO value may lie outside ``[0, 1]`` (rounding) before it is an error."""


def read_class_names(path: str | Path) -> list[str]:
    """Read class names from a text file (one per line) or a YOLO ``data.yaml`` (key ``names``).

    ``names`` may be a list, or a dict ``{index: name}`` whose keys are ``0..K-1``.

    Returns:
        The names in label order.

    Raises:
        DatasetError: missing file, invalid YAML, no ``names``, non-contiguous dict keys, an empty list
            or a duplicate name.
    """
    path = Path(path)
    if not path.is_file():
        raise dataset_error(path, "file", "class-name file does not exist")
    text = read_text(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise dataset_error(path, "file", f"invalid YAML: {exc}") from exc
        if not isinstance(data, dict) or "names" not in data:
            raise dataset_error(path, "top level", "no 'names' key (list or {index: name} mapping)")
        names = data["names"]
        if isinstance(names, dict):
            keys = list(names)
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(
                range(len(keys))
            ):
                raise dataset_error(path, "names", f"keys must be 0..{len(names) - 1}, got {keys}")
            names = [names[i] for i in range(len(names))]
        if not isinstance(names, list):
            raise dataset_error(path, "names", f"expected a list or mapping, got {type(names).__name__}")
        names = [str(n).strip() for n in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise dataset_error(path, "names", "no class names found")
    for index, name in enumerate(names):
        if not name or names.index(name) != index:
            raise dataset_error(path, f"class {index}", f"empty or duplicate class name {name!r}")
    return names


def _parse_line(label_file: Path, line_no: int, line: str, num_classes: int) -> tuple[int, list[float]]:
    record = f"line {line_no}"
    fields = line.split()
    if len(fields) != 5:
        raise dataset_error(label_file, record, f"expected 5 fields 'class cx cy w h', got {len(fields)}: {line!r}")
    try:
        cls_value = float(fields[0])
        values = [float(v) for v in fields[1:]]
    except ValueError:
        raise dataset_error(label_file, record, f"fields must be numbers: {line!r}") from None
    if not all(math.isfinite(v) for v in (cls_value, *values)):
        raise dataset_error(label_file, record, f"fields must be finite numbers (no nan/inf): {line!r}")
    if not cls_value.is_integer() or not 0 <= cls_value < num_classes:
        raise dataset_error(label_file, record, f"class {fields[0]} out of range 0..{num_classes - 1}")
    if not all(-YOLO_TOLERANCE <= v <= 1 + YOLO_TOLERANCE for v in values):
        raise dataset_error(label_file, record, f"normalised values must be in [0, 1], got {fields[1:]}")
    if values[2] <= 0 or values[3] <= 0:
        raise dataset_error(label_file, record, f"box width/height must be positive, got {fields[3:]}")
    return int(cls_value), values


def yolo_to_coco(
    images_dir: str | Path, labels_dir: str | Path, class_names: Sequence[str] | str | Path
) -> dict:
    """Convert a folder of images with YOLO label files to a COCO detection dict.

    Args:
        images_dir: folder with the images (``.jpg .jpeg .png .bmp .tif .tiff .webp``; not recursive).
        labels_dir: folder with ``<image stem>.txt`` label files. An image without one has no boxes (a
            background image), but at least one image must have a label file.
        class_names: names in class-index order, or a file for :func:`read_class_names`.

    Returns:
        COCO dict: images with ids ``1..N`` in sorted file-name order (size of the decoded image,
        ``file_name`` relative to ``images_dir``), categories ``1..K`` in class order, annotations with
        ``bbox`` COCO ``[x, y, w, h]`` pixels, clipped to the image. Label files without an image are
        reported by one counted ``UserWarning``.

    Raises:
        DatasetError: a missing images or labels folder, no images, no label file for any image, an
            unreadable, empty or truncated image (the message names it), or a bad label line (field count,
            non-numeric or non-finite, class out of range, value outside ``[0, 1]`` by more than
            :data:`YOLO_TOLERANCE`, non-positive size); the message names the label file and the line number.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    if not isinstance(class_names, (list, tuple)):
        class_names = read_class_names(class_names)
    if not images_dir.is_dir():
        raise dataset_error(images_dir, "folder", "images folder does not exist")
    if not labels_dir.is_dir():
        raise dataset_error(labels_dir, "folder", "labels folder does not exist")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise dataset_error(images_dir, "folder", f"contains no images ({', '.join(IMAGE_SUFFIXES)})")
    if not any((labels_dir / f"{image.stem}.txt").is_file() for image in images):
        raise dataset_error(
            labels_dir, "folder", f"has no label file for any of the {len(images)} images in {images_dir} "
            f"(expected <image stem>.txt, e.g. {images[0].stem}.txt)"
        )
    pairs = [(image, labels_dir / f"{image.stem}.txt", image.name) for image in images]
    coco = yolo_pairs_to_coco(pairs, class_names, f"YOLO labels {labels_dir}")
    stems = {p.stem for p in images}
    orphans = sorted(p.name for p in labels_dir.glob("*.txt") if p.stem not in stems) if labels_dir.is_dir() else []
    orphans = [n for n in orphans if n != "classes.txt"]
    if orphans:
        message = f"{labels_dir}: {len(orphans)} label file(s) without an image: {orphans[:5]}"
        warnings.warn(message, UserWarning, stacklevel=2)
    return coco


def yolo_pairs_to_coco(
    pairs: Sequence[tuple[Path, Path, str]], class_names: Sequence[str], description: str
) -> dict:
    """COCO detection dict of ``(image file, label file, file_name)`` triples (YOLO label format, module doc).

    ``file_name`` is what the COCO record stores (relative to the image root the dataset is read from). An image
    whose label file does not exist has no boxes (a background image). Image ids are ``1..N`` in ``pairs`` order,
    categories ``1..K`` in class order, ``bbox`` COCO ``[x, y, w, h]`` pixels clipped to the decoded image.

    Raises:
        DatasetError: an unreadable, empty or truncated image, or a bad label line (see :func:`yolo_to_coco`).
    """
    coco: dict = {
        "info": {"description": f"converted from {description}"},
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)],
    }
    for image_id, (image, label_file, file_name) in enumerate(pairs, start=1):
        width, height = decode_image_size(image)  # decodes the whole file: truncated images are rejected
        coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        if not label_file.is_file():
            continue
        text = read_text(label_file)
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            cls, (cx, cy, w, h) = _parse_line(label_file, line_no, line, len(class_names))
            x1, y1 = max((cx - w / 2) * width, 0.0), max((cy - h / 2) * height, 0.0)
            x2, y2 = min((cx + w / 2) * width, width), min((cy + h / 2) * height, height)
            if x2 <= x1 or y2 <= y1:
                raise dataset_error(label_file, f"line {line_no}", "box has no area inside the image")
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": cls + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    return coco
