"""CrowdHuman ``.odgt`` annotations → COCO detection dicts.

An ``.odgt`` file has one JSON object per line, one line per image::

    {"ID": "273271,c9db000d5146c15", "gtboxes": [
        {"tag": "person", "fbox": [x, y, w, h], "vbox": [x, y, w, h], "hbox": [x, y, w, h],
         "extra": {"ignore": 0, ...}, "head_attr": {"ignore": 0, ...}}, ...]}

Boxes are ``[x, y, w, h]`` in pixels (top-left corner and size): ``fbox`` the full (amodal) body,
``vbox`` the visible body, ``hbox`` the head. The image is ``<images_dir>/<ID>.jpg``.

Normal boxes and ignore regions follow the official CrowdHuman evaluation (``load_gt_boxes`` in
Megvii-BaseDetection/cvpods ``cvpods/evaluation/crowdhumantools.py``, identical in strongwolf/o2f
``crowdhuman/crowdhuman_metric.py``): a box is a normal ground truth (COCO ``iscrowd = 0``) when its
``tag`` is the class name (``"person"``) and ``extra.ignore`` is absent or 0; every other box, i.e. a
``"person"`` with ``extra.ignore != 0`` or any other tag (``"mask"``: crowds, reflections, posters), is an
ignore region (``iscrowd = 1``). For head boxes (``box_type="hbox"``) ``head_attr.ignore != 0`` also makes
the box an ignore region, as in the official head evaluation mode.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from e2edet.data.errors import dataset_error, parse_json, read_text
from e2edet.data.validate import decode_image_size, is_finite_number

__all__ = ["BOX_TYPES", "read_odgt", "odgt_to_coco"]

BOX_TYPES = ("fbox", "vbox", "hbox")
"""The box kinds of a CrowdHuman ``gtboxes`` entry: full body, visible body, head."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_odgt(path: str | Path) -> list[tuple[int, dict]]:
    """Read an ``.odgt`` file: one JSON object per non-empty line.

    Returns:
        ``(line_number, record)`` pairs (1-based line numbers, blank lines skipped).

    Raises:
        DatasetError: missing/unreadable file, a line that is not valid JSON or not a JSON object, or a
            file without any record; the message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise dataset_error(path, "file", "does not exist")
    text = read_text(path)
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = parse_json(line, path, line=line_no)
        if not isinstance(record, dict):
            raise dataset_error(path, f"line {line_no}", f"expected a JSON object, got {type(record).__name__}")
        records.append((line_no, record))
    if not records:
        raise dataset_error(path, "file", "contains no records (one JSON object per line expected)")
    return records


def _find_image(images_dir: Path, image_id: str) -> Path | None:
    candidates = [images_dir / image_id] if image_id.lower().endswith(IMAGE_SUFFIXES) else []
    candidates += [images_dir / (image_id + suffix) for suffix in IMAGE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def _flag(entry: dict, key: str, source: Path, record: str) -> bool:
    """``entry[key]["ignore"] != 0`` (False when absent)."""
    attrs = entry.get(key, {})
    if not isinstance(attrs, dict):
        raise dataset_error(source, record, f"'{key}' must be an object, got {attrs!r}")
    value = attrs.get("ignore", 0)
    if not is_finite_number(value):
        raise dataset_error(source, record, f"'{key}.ignore' must be a number, got {value!r}")
    return value != 0


def odgt_to_coco(
    odgt_path: str | Path, images_dir: str | Path, box_type: str = "fbox", class_name: str = "person"
) -> dict:
    """Convert a CrowdHuman ``.odgt`` annotation file to a COCO detection dict.

    Args:
        odgt_path: the ``.odgt`` file (one JSON object per line; blank lines are skipped).
        images_dir: folder with the images, ``<ID>.jpg`` (also ``<ID>.jpeg``/``.png``, or ``<ID>`` when
            the ID already ends with one of these suffixes).
        box_type: which box of each entry to convert: ``"fbox"`` (full body, the DeFCN / One-to-Few
            CrowdHuman setting), ``"vbox"`` (visible body) or ``"hbox"`` (head).
        class_name: the tag of normal boxes and the name of the single category (id 1).

    Returns:
        COCO dict: images with ids ``1..N`` in file order, ``file_name`` relative to ``images_dir`` and
        ``width``/``height`` of the decoded image; ``categories = [{"id": 1, "name": class_name}]``;
        annotations with ``bbox`` COCO ``[x, y, w, h]`` pixels clipped to the image, ``area = w * h`` (after
        clipping), ``category_id = 1`` and ``iscrowd`` 0 (normal) or 1 (ignore region, see the module doc).
        Full-body boxes often extend past the image: every box is clipped to ``[0, W] x [0, H]`` and boxes
        with zero area after clipping are dropped; both are reported by one ``UserWarning`` with counts.

    Raises:
        ValueError: ``box_type`` not in :data:`BOX_TYPES`.
        DatasetError: missing or unreadable ``.odgt`` file, a line that is not a JSON object, a record
            without an ``ID`` or a ``gtboxes`` list, a duplicate ID, a missing image, an unreadable, empty or
            truncated image (the message names the image), an entry
            without a ``tag`` or with a bad box (not 4 finite numbers, or negative width/height); the message
            names the ``.odgt`` file and the line number (and the entry index in ``gtboxes``).
    """
    if box_type not in BOX_TYPES:
        raise ValueError(f"odgt_to_coco: box_type must be one of {BOX_TYPES}, got {box_type!r}")
    odgt_path, images_dir = Path(odgt_path), Path(images_dir)
    records = read_odgt(odgt_path)
    if not images_dir.is_dir():
        raise dataset_error(images_dir, "folder", "images folder does not exist")
    coco: dict = {
        "info": {"description": f"converted from CrowdHuman {odgt_path.name} ({box_type})"},
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": class_name}],
    }
    seen: dict[str, int] = {}
    clipped: list[str] = []
    dropped: list[str] = []
    for image_id, (line_no, record) in enumerate(records, start=1):
        where = f"line {line_no}"
        raw_id = record.get("ID")
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool) or str(raw_id) == "":
            raise dataset_error(odgt_path, where, f"missing or empty 'ID' (got {raw_id!r})")
        name = str(raw_id)
        where = f"line {line_no} (ID {name})"
        if name in seen:
            raise dataset_error(odgt_path, where, f"duplicate ID, first seen on line {seen[name]}")
        seen[name] = line_no
        image = _find_image(images_dir, name)
        if image is None:
            tried = ", ".join(f"{name}{s}" for s in IMAGE_SUFFIXES)
            raise dataset_error(odgt_path, where, f"image not found in {images_dir} (tried {tried})")
        width, height = decode_image_size(image)  # decodes the whole file: truncated images are rejected
        try:
            file_name = image.relative_to(images_dir).as_posix()
        except ValueError:
            raise dataset_error(odgt_path, where, f"ID must name a file inside {images_dir}") from None
        coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        entries = record.get("gtboxes")
        if not isinstance(entries, list):
            raise dataset_error(odgt_path, where, f"'gtboxes' must be a list, got {entries!r}")
        for index, entry in enumerate(entries):
            record_name = f"{where} gtboxes[{index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("tag"), str):
                raise dataset_error(odgt_path, record_name, "expected an object with a string 'tag'")
            box = entry.get(box_type)
            if not isinstance(box, list) or len(box) != 4 or not all(is_finite_number(v) for v in box):
                raise dataset_error(odgt_path, record_name, f"bad {box_type} {box!r}: expected 4 numbers [x, y, w, h]")
            x, y, w, h = (float(v) for v in box)
            if w < 0 or h < 0:
                raise dataset_error(odgt_path, record_name, f"bad {box_type} {box!r}: negative width or height")
            ignore = entry["tag"] != class_name or _flag(entry, "extra", odgt_path, record_name)
            if box_type == "hbox":
                ignore = ignore or _flag(entry, "head_attr", odgt_path, record_name)
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                dropped.append(record_name)
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                clipped.append(record_name)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(ignore),
            })
    if clipped or dropped:
        examples = "; ".join((dropped + clipped)[:3]) + (" ..." if len(dropped) + len(clipped) > 3 else "")
        warnings.warn(
            f"{odgt_path}: {len(clipped)} {box_type} box(es) clipped to the image border, {len(dropped)} dropped "
            f"with zero area inside the image (e.g. {examples})", UserWarning, stacklevel=2,
        )
    return coco
