"""Pascal VOC XML annotations → COCO detection dicts.

VOC ``<bndbox>`` coordinates are 1-based and inclusive: a box covering pixel columns 0..9 of the image
(0-based) is written ``xmin=1, xmax=10``. The conversion to 0-based continuous ``xyxy`` pixels follows
detectron2: ``x1 = xmin - 1``, ``y1 = ymin - 1``, ``x2 = xmax``, ``y2 = ymax``; COCO ``bbox`` is then
``[x1, y1, x2 - x1, y2 - y1]``.

Objects marked ``<difficult>1</difficult>`` become ``iscrowd = 1`` annotations: the dataset leaves them out
of training targets and COCO evaluation treats them as "ignore" regions (a detection on them is neither a
true nor a false positive), which matches how VOC evaluation treats difficult objects.
"""

from __future__ import annotations

import math
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from e2edet.data.errors import dataset_error, read_text
from e2edet.data.validate import decode_image_size
from e2edet.utils import error_text

__all__ = ["VocObject", "VocAnnotation", "parse_voc_xml", "read_split_ids", "voc_class_names", "voc_to_coco"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class VocObject:
    """One ``<object>`` of a VOC file: class name, raw 1-based inclusive corners, difficult flag.

    ``index`` is the 1-based position of the object in the file (used in error messages).
    """

    index: int
    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool


@dataclass
class VocAnnotation:
    """A parsed VOC XML file. ``width``/``height`` are ``None`` when ``<size>`` is missing or zero."""

    path: Path
    filename: str | None
    width: int | None
    height: int | None
    objects: list[VocObject] = field(default_factory=list)


def _text(elem: ET.Element, tag: str) -> str | None:
    child = elem.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def parse_voc_xml(path: str | Path, data: bytes | None = None) -> VocAnnotation:
    """Parse one Pascal VOC XML annotation file.

    Args:
        path: the XML file (read unless ``data`` is given; always used in messages).
        data: the file's bytes, for XML read from elsewhere (e.g. a wheel).

    Returns:
        A :class:`VocAnnotation` with the raw VOC coordinates (1-based, inclusive, pixels).

    Raises:
        DatasetError: the file is missing, is not well-formed XML, ``<size>`` is not numeric, or an
            ``<object>`` lacks a name or a ``<bndbox>`` with finite numeric ``xmin/ymin/xmax/ymax`` (NaN and
            infinity are rejected), or has a non-0/1 ``difficult`` flag.
    """
    path = Path(path)
    try:
        root = ET.fromstring(data) if data is not None else ET.parse(path).getroot()
    except FileNotFoundError:
        raise dataset_error(path, "file", "does not exist") from None
    except OSError as exc:
        raise dataset_error(path, "file", f"cannot be read: {exc}") from exc
    except ET.ParseError as exc:
        line, col = exc.position
        raise dataset_error(path, f"line {line} column {col}", f"malformed XML: {exc}") from exc
    except (ValueError, LookupError, RecursionError) as exc:  # e.g. an unknown encoding declaration
        raise dataset_error(path, "file", f"malformed XML: {error_text(exc)}") from exc
    width = height = None
    size = root.find("size")
    if size is not None:
        raw_size = (_text(size, "width") or "0", _text(size, "height") or "0")
        try:
            values = [float(v) for v in raw_size]
        except ValueError:
            given = f"{raw_size[0]!r} x {raw_size[1]!r}"
            raise dataset_error(path, "<size>", f"width/height are not numbers: {given}") from None
        if not all(math.isfinite(v) for v in values):
            given = f"{raw_size[0]} x {raw_size[1]}"
            raise dataset_error(path, "<size>", f"width/height must be finite numbers, got {given}")
        width, height = int(values[0]), int(values[1])
        if width <= 0 or height <= 0:
            width = height = None
    ann = VocAnnotation(path=path, filename=_text(root, "filename") or None, width=width, height=height)
    for index, obj in enumerate(root.iter("object"), start=1):
        record = f"<object> #{index}"
        name = _text(obj, "name")
        if not name:
            raise dataset_error(path, record, "has no <name>")
        box = obj.find("bndbox")
        if box is None:
            raise dataset_error(path, f"{record} ({name})", "has no <bndbox>")
        keys = ("xmin", "ymin", "xmax", "ymax")
        try:
            coords = [float(_text(box, k) or "") for k in keys]
        except ValueError:
            raise dataset_error(path, f"{record} ({name})", "<bndbox> needs numeric xmin, ymin, xmax, ymax") from None
        if not all(math.isfinite(c) for c in coords):
            given = ", ".join(f"{k}={_text(box, k)}" for k in keys)
            raise dataset_error(path, f"{record} ({name})", f"<bndbox> coordinates must be finite numbers, got {given}")
        difficult = _text(obj, "difficult") or "0"
        if difficult not in ("0", "1"):
            raise dataset_error(path, f"{record} ({name})", f"<difficult> must be 0 or 1, got {difficult!r}")
        ann.objects.append(VocObject(index, name, *coords, difficult=difficult == "1"))
    return ann


def read_split_ids(voc_root: str | Path, split: str) -> list[str]:
    """Read ``ImageSets/Main/<split>.txt``: one image id per line (first token), blank lines ignored.

    Raises:
        DatasetError: the split file is missing or lists no ids.
    """
    split_file = Path(voc_root) / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise dataset_error(split_file, "file", f"split '{split}' not found (expected one image id per line)")
    text = read_text(split_file)
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise dataset_error(split_file, "file", "lists no image ids")
    return ids


def _xml_files(voc_root: Path, split: str | None, ann_dir: str) -> list[Path]:
    folder = voc_root / ann_dir
    if not folder.is_dir():
        raise dataset_error(folder, "folder", "annotation folder does not exist (expected a Pascal VOC root)")
    if split is None:
        files = sorted(folder.glob("*.xml"))
        if not files:
            raise dataset_error(folder, "folder", "contains no .xml annotation files")
        return files
    split_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
    files = []
    for line_no, image_id in enumerate(read_split_ids(voc_root, split), start=1):
        xml = folder / f"{image_id}.xml"
        if not xml.is_file():
            raise dataset_error(split_file, f"line {line_no} ({image_id})", f"annotation {xml} not found")
        files.append(xml)
    return files


def voc_class_names(voc_root: str | Path, splits: list[str | None], ann_dir: str = "Annotations") -> list[str]:
    """Sorted set of the object class names used in the given splits (``None`` = every XML file)."""
    names: set[str] = set()
    for split in splits:
        for xml in _xml_files(Path(voc_root), split, ann_dir):
            names.update(obj.name for obj in parse_voc_xml(xml).objects)
    return sorted(names)


def _find_image(ann: VocAnnotation, image_root: Path) -> Path:
    candidates = []
    if ann.filename:
        candidates.append(image_root / Path(ann.filename).name)
    candidates += [image_root / (ann.path.stem + s) for s in IMAGE_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise dataset_error(ann.path, f"<filename> {ann.filename}", f"image not found in {image_root}")


def _image_size(ann: VocAnnotation, image: Path) -> tuple[int, int]:
    real = decode_image_size(image)  # decodes the whole file: truncated or corrupt images are rejected here
    if ann.width is not None and (ann.width, ann.height) != real:
        raise dataset_error(
            ann.path, "<size>", f"says {ann.width} x {ann.height} but image {image.name} is {real[0]} x {real[1]}"
        )
    return real


def border_tolerance(size: int) -> float:
    """Pixels a VOC box may extend past a border of an image side of ``size`` pixels and still be clipped.

    ``max(2, 0.5% of size)``: enough for 0-based exports (``xmin = 0``) and rounding, small enough to
    catch boxes annotated against a different image size.
    """
    return max(2.0, 0.005 * size)


def voc_box_to_xyxy(obj: VocObject, width: int, height: int, source: Path) -> tuple[list[float] | None, bool]:
    """Convert a VOC box to 0-based ``xyxy`` pixels clipped to the image.

    Returns:
        ``(box, clipped)``; ``box`` is ``None`` for a degenerate box (``xmax == xmin`` or ``ymax == ymin``,
        a 1-pixel line that is an annotation error to skip).

    Raises:
        DatasetError: inverted box (``xmax < xmin`` or ``ymax < ymin``) or a box extending past the image
            by more than :func:`border_tolerance`.
    """
    record = f"<object> #{obj.index} ({obj.name})"
    raw = f"[xmin={obj.xmin:g}, ymin={obj.ymin:g}, xmax={obj.xmax:g}, ymax={obj.ymax:g}]"
    if obj.xmax < obj.xmin or obj.ymax < obj.ymin:
        raise dataset_error(source, record, f"box {raw} has non-positive size")
    if obj.xmax == obj.xmin or obj.ymax == obj.ymin:
        return None, False
    x1, y1, x2, y2 = obj.xmin - 1, obj.ymin - 1, obj.xmax, obj.ymax
    tx, ty = border_tolerance(width), border_tolerance(height)
    if x1 < -tx or y1 < -ty or x2 > width + tx or y2 > height + ty:
        raise dataset_error(source, record, f"box {raw} lies outside the {width} x {height} image")
    box = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise dataset_error(source, record, f"box {raw} has non-positive size after clipping to the image")
    return box, box != [x1, y1, x2, y2]


def voc_to_coco(
    voc_root: str | Path,
    split: str | None = None,
    class_names: list[str] | None = None,
    image_dir: str = "JPEGImages",
    ann_dir: str = "Annotations",
) -> dict:
    """Convert a Pascal VOC dataset (or one split of it) to a COCO detection dict.

    Args:
        voc_root: folder holding ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``.
        split: name of ``ImageSets/Main/<split>.txt`` to read; ``None`` reads every ``*.xml``, sorted.
        class_names: the classes, in label order; ``None`` uses the sorted set of names found.
        image_dir, ann_dir: sub-folders of ``voc_root`` with the images and the XML files.

    Returns:
        COCO dict: images with ids ``1..N`` in split order, ``file_name`` relative to ``voc_root/image_dir``
        and the size of the decoded image; categories with ids ``1..K`` in class order;
        annotations with ``bbox`` COCO ``[x, y, w, h]`` pixels (see the module doc for the coordinate
        conversion) and ``iscrowd = 1`` for difficult objects. Boxes crossing the border by at most
        :func:`border_tolerance` are clipped and degenerate (zero-extent) boxes skipped, each kind
        reported by one counted ``UserWarning``.

    Raises:
        DatasetError: missing split/XML/image file, unreadable, empty or truncated image (the message names
            the image), ``<size>`` disagreeing with the image, a class name not in ``class_names``, a
            non-finite, inverted or far-outside box (the message names the XML file and the object), no
            object in any file, or ``class_names`` empty or with duplicates.
    """
    root = Path(voc_root)
    xml_files = _xml_files(root, split, ann_dir)
    annotations = [parse_voc_xml(xml) for xml in xml_files]
    if class_names is None:
        class_names = sorted({obj.name for ann in annotations for obj in ann.objects})
    if not class_names:
        raise dataset_error(root / ann_dir, "folder", f"no <object> found in any of the {len(xml_files)} XML files")
    if len(set(class_names)) != len(class_names):
        raise dataset_error(root, "class names", f"must be unique, got {list(class_names)}")
    label_of = {name: i for i, name in enumerate(class_names)}
    coco: dict = {
        "info": {"description": f"converted from Pascal VOC {root} split={split}"},
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(class_names)],
    }
    clipped: list[str] = []
    skipped: list[str] = []
    for image_id, ann in enumerate(annotations, start=1):
        image = _find_image(ann, root / image_dir)
        width, height = _image_size(ann, image)
        coco["images"].append({"id": image_id, "file_name": image.name, "width": width, "height": height})
        for obj in ann.objects:
            where = f"{ann.path.name} <object> #{obj.index} ({obj.name})"
            if obj.name not in label_of:
                raise dataset_error(
                    ann.path, f"<object> #{obj.index}", f"unknown class {obj.name!r}; known: {class_names}"
                )
            box, was_clipped = voc_box_to_xyxy(obj, width, height, ann.path)
            if box is None:
                skipped.append(where)
                continue
            if was_clipped:
                clipped.append(where)
            w, h = box[2] - box[0], box[3] - box[1]
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": label_of[obj.name] + 1,
                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(obj.difficult),
            })
    reports = ((clipped, "clipped to the image border"),
               (skipped, "skipped as zero-size (xmax == xmin or ymax == ymin)"))
    for items, what in reports:
        if items:
            examples = "; ".join(items[:5]) + (" ..." if len(items) > 5 else "")
            warnings.warn(f"{root}: {len(items)} VOC box(es) {what}: {examples}", UserWarning, stacklevel=2)
    return coco
