"""Reading and validating COCO detection annotation files.

A COCO detection file is a JSON object with ``images`` (``id``, ``file_name``, ``width``, ``height``),
``categories`` (``id``, ``name``) and ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox``
as COCO ``[x, y, w, h]`` in pixels with the origin at the top-left image corner, optional ``iscrowd``).
"""

from __future__ import annotations

import math
import reprlib
from numbers import Real
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from e2edet.data.errors import DatasetError, dataset_error, parse_json
from e2edet.utils import error_text

__all__ = [
    "load_coco_json", "validate_coco", "decode_image_size", "image_problem", "is_finite_number", "require_image_file",
    "BOX_TOLERANCE", "MAX_LISTED_PROBLEMS",
]

BOX_TOLERANCE = 1.0
"""Pixels a COCO box may extend past the image border before it is reported as outside the image."""

MAX_LISTED_PROBLEMS = 20
"""How many problems one :class:`DatasetError` from :func:`validate_coco` lists (the count is always given)."""


def image_problem(exc: BaseException) -> str:
    """One line saying why an image file could not be decoded, from the exception PIL (or torchvision) raised."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file PIL can read (unknown format or corrupt header)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large to decode safely: {exc}"
    text = error_text(exc)
    if "truncated" in text.lower() or isinstance(exc, (EOFError, SyntaxError)):
        return f"truncated or corrupt image (PIL: {text})"
    return f"cannot decode the image ({type(exc).__name__}: {text})"


def require_image_file(path: str | Path) -> Path:
    """``path`` as a ``Path`` once it is known to be a non-empty file.

    Raises:
        DatasetError: ``"<image>: image: file not found"`` or ``"... file is empty (0 bytes)"``.
    """
    path = Path(path)
    if not path.is_file():
        raise dataset_error(path, "image", "file not found")
    if path.stat().st_size == 0:
        raise dataset_error(path, "image", "file is empty (0 bytes)")
    return path


def decode_image_size(path: str | Path) -> tuple[int, int]:
    """Decode an image file completely (PIL) and return its ``(width, height)``.

    JPEGs are decoded at reduced scale (``draft``), which still reads every byte of the compressed data, so a
    truncated or corrupt file is found at a fraction of the cost of a full decode.

    Raises:
        DatasetError: ``"<image>: image: <problem>"`` when the file is missing, empty (0 bytes), not an image,
            truncated or otherwise undecodable.
    """
    path = require_image_file(path)
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for corrupt files
        raise dataset_error(path, "image", image_problem(exc)) from exc
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise dataset_error(path, "image", f"has no pixels ({width} x {height})")
    return width, height


def load_coco_json(path: str | Path) -> dict:
    """Read a COCO JSON file.

    Args:
        path: the ``.json`` file.

    Returns:
        The parsed JSON value (normally a dict; pass it to :func:`validate_coco`).

    Raises:
        DatasetError: the file does not exist, is a directory, is empty (0 bytes or only whitespace),
            is not UTF-8, or is not valid JSON (the message gives line and column of the error).
    """
    path = Path(path)
    if not path.exists():
        raise dataset_error(path, "file", "does not exist")
    if path.is_dir():
        raise dataset_error(path, "file", "is a directory, expected a COCO .json file")
    raw = path.read_bytes()
    if not raw.strip():
        raise dataset_error(path, "file", f"is empty ({len(raw)} bytes), expected a COCO JSON object")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise dataset_error(path, f"byte {exc.start}", "is not UTF-8 text") from exc
    return parse_json(text, path)


def is_finite_number(value: Any) -> bool:
    """A finite real number (not a bool, NaN or infinity; JSON's ``NaN``/``Infinity`` and huge integers fail)."""
    if not isinstance(value, Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError):
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _malformed(section: str, index: int, item: Any, keys: tuple[str, ...], problems: list[str]) -> bool:
    """Record a problem and return True when ``item`` (``section[index]``) is not an object with all ``keys``."""
    if not isinstance(item, dict):
        problems.append(f"{section}[{index}]: is not an object")
        return True
    missing = [k for k in keys if k not in item]
    if missing:
        problems.append(f"{section}[{index}]: missing key(s) {', '.join(missing)}")
    return bool(missing)


def _check_image_file(record: str, path: Path, img: dict, problems: list[str]) -> None:
    """Decode ``path`` and compare its size with the record's ``width``/``height``; append problems."""
    try:
        width, height = decode_image_size(path)
    except DatasetError as exc:
        problems.append(f"{record}: image file {path}: {exc.problem or exc}")
        return
    if (width, height) != (img["width"], img["height"]):
        problems.append(
            f"{record}: JSON says width x height = {img['width']:g} x {img['height']:g} "
            f"but the image file {path} is {width} x {height}"
        )


def _check_images(
    images: list, problems: list[str], image_root: Path | None, decode: bool = False,
    rejected: set[int] | None = None,
) -> dict[int, dict]:
    """Check the image records; returns the valid ones by id and adds the ids of invalid ones to ``rejected``."""
    by_id: dict[int, dict] = {}
    rejected = set() if rejected is None else rejected
    for index, img in enumerate(images):
        if _malformed("images", index, img, ("id", "file_name", "width", "height"), problems):
            continue
        img_id, name = img["id"], img["file_name"]
        record = f"image id {img_id!r} ({name})"
        if not _is_int(img_id):
            problems.append(f"images[{index}]: id {img_id!r} is not an integer")
            continue
        if img_id in by_id:
            problems.append(f"{record}: duplicate image id (also used by {by_id[img_id]['file_name']})")
            continue
        if not isinstance(name, str) or not name:
            problems.append(f"{record}: file_name must be a non-empty string")
            rejected.add(img_id)
            continue
        w, h = img["width"], img["height"]
        if not (is_finite_number(w) and is_finite_number(h) and w > 0 and h > 0):
            got = f"{reprlib.repr(w)} x {reprlib.repr(h)}"
            problems.append(f"{record}: width/height must be positive numbers, got {got}")
            rejected.add(img_id)
            continue
        if image_root is not None and not (image_root / name).is_file():
            problems.append(f"{record}: image file {image_root / name} not found")
        elif image_root is not None and decode:
            _check_image_file(record, image_root / name, img, problems)
        by_id[img_id] = img
    return by_id


def _check_categories(categories: list, problems: list[str]) -> set[int]:
    ids: set[int] = set()
    for index, cat in enumerate(categories):
        if _malformed("categories", index, cat, ("id", "name"), problems):
            continue
        if not _is_int(cat["id"]):
            problems.append(f"categories[{index}]: id {cat['id']!r} is not an integer")
        elif cat["id"] in ids:
            problems.append(f"category id {cat['id']} ({cat['name']}): duplicate category id")
        else:
            ids.add(cat["id"])
    return ids


def _check_box(record: str, bbox: Any, img: dict, problems: list[str]) -> None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(is_finite_number(v) for v in bbox):
        problems.append(f"{record}: bbox must be 4 finite numbers [x, y, w, h], got {reprlib.repr(bbox)}")
        return
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        problems.append(f"{record}: bbox {list(bbox)} has non-positive width or height")
        return
    W, H, tol = float(img["width"]), float(img["height"]), BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
        problems.append(
            f"{record}: bbox [x={x:g}, y={y:g}, w={w:g}, h={h:g}] lies outside the image "
            f"{img['file_name']} of size {W:g} x {H:g} (tolerance {tol:g} px)"
        )


def _check_annotations(
    anns: list, images: dict[int, dict], cat_ids: set[int], problems: list[str],
    rejected: set[int] | frozenset[int] = frozenset(),
) -> None:
    seen: set[Any] = set()
    for index, ann in enumerate(anns):
        if _malformed("annotations", index, ann, ("id", "image_id", "category_id", "bbox"), problems):
            continue
        record = f"annotation id {ann['id']!r} (image id {ann['image_id']!r})"
        bad = [k for k in ("id", "image_id", "category_id") if not _is_int(ann[k])]
        if bad:
            problems.append(f"{record}: {', '.join(bad)} must be integer(s)")
            continue
        if ann["id"] in seen:
            problems.append(f"{record}: duplicate annotation id")
        seen.add(ann["id"])
        img = images.get(ann["image_id"])
        if img is None and ann["image_id"] not in rejected:  # a rejected image was reported already
            problems.append(f"{record}: unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in cat_ids:
            problems.append(f"{record}: unknown category_id {ann['category_id']!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            problems.append(f"{record}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        if img is not None:
            _check_box(record, ann["bbox"], img, problems)


def validate_coco(
    coco: Any,
    source: str | Path,
    image_root: str | Path | None = None,
    check_files: bool = True,
    decode_images: bool = True,
) -> None:
    """Check a COCO detection dict and report every problem at once.

    Checked: the value is a non-empty dict with ``images`` and ``categories`` lists (``annotations``
    may be absent, meaning no boxes); required keys of every record; unique image, category and
    annotation ids; annotations refer to existing images and categories; ``bbox`` is 4 finite numbers
    ``[x, y, w, h]`` (COCO xywh, pixels) with ``w > 0`` and ``h > 0`` that lies inside the image up to
    :data:`BOX_TOLERANCE` pixels; ``iscrowd`` is 0/1; and, when ``check_files`` and ``image_root`` are
    given, that every ``image_root / file_name`` exists and (``decode_images``) decodes completely (not empty,
    not truncated, see :func:`decode_image_size`) to the ``width`` x ``height`` the record gives.

    Args:
        coco: the parsed JSON (see :func:`load_coco_json`).
        source: the file it came from, used in messages.
        image_root: folder the ``file_name`` entries are relative to.
        check_files: check that the image files exist (needs ``image_root``).
        decode_images: with ``check_files``, also decode every image and compare its size with the record
            (slow on large datasets; :class:`~e2edet.data.coco.CocoDetection` turns it off and checks each
            image when it loads it).

    Raises:
        DatasetError: listing up to :data:`MAX_LISTED_PROBLEMS` problems, one per line in the form
            ``"<source>: <record>: <problem>"``, after a line giving their total count.
    """
    if not isinstance(coco, dict):
        raise dataset_error(source, "top level", f"expected a JSON object, got {type(coco).__name__}")
    if not coco:
        raise dataset_error(source, "top level", "empty JSON object, expected images/annotations/categories")
    for key in ("images", "categories"):
        if key not in coco:
            raise dataset_error(source, "top level", f"no '{key}' list (is this a COCO detection file?)")
        if not isinstance(coco[key], list):
            raise dataset_error(source, key, f"expected a list, got {type(coco[key]).__name__}")
    if not coco["categories"]:
        raise dataset_error(source, "categories", "the list is empty; at least one category is needed")
    anns = coco.get("annotations", [])
    if not isinstance(anns, list):
        raise dataset_error(source, "annotations", f"expected a list, got {type(anns).__name__}")

    problems: list[str] = []
    root = Path(image_root) if (check_files and image_root is not None) else None
    if root is not None and not root.is_dir():
        raise dataset_error(source, "image_root", f"image folder {root} does not exist")
    rejected: set[int] = set()
    images = _check_images(coco["images"], problems, root, decode=decode_images, rejected=rejected)
    cat_ids = _check_categories(coco["categories"], problems)
    _check_annotations(anns, images, cat_ids, problems, rejected)
    if not problems:
        return
    if len(problems) == 1:
        raise DatasetError(f"{source}: {problems[0]}")
    shown = problems[:MAX_LISTED_PROBLEMS]
    lines = [f"{source}: {len(problems)} problems found (showing {len(shown)}):"]
    lines += [f"{source}: {p}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"... and {len(problems) - len(shown)} more")
    raise DatasetError("\n".join(lines))
