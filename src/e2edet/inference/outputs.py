"""Predictor outputs: pictures with the detections drawn, and COCO results JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from e2edet.data.errors import dataset_error
from e2edet.engine.coco_utils import encode_masks
from e2edet.utils import error_text

#: Score threshold of pictures and ``detections.json`` when the run stores no F1-optimal one.
DEFAULT_SCORE = 0.3


def draw_detections(
    image: torch.Tensor, det: dict, class_names: Sequence[str], score_thresh: float = 0.0
) -> torch.Tensor:
    """Draw boxes with ``label score`` captions on ``image`` (``uint8 [3, H, W]``); returns a new uint8 image.

    ``det`` holds ``boxes [k, 4]`` xyxy pixels of ``image``, ``scores [k]`` and ``labels [k]`` (contiguous), and for
    instance-segmentation models ``masks`` ``bool [k, H, W]``: each mask is filled in a colour of its own (alpha 0.45,
    ``torchvision.utils.draw_segmentation_masks``) under its box, so that touching instances stay apart.
    """
    keep = det["scores"] >= score_thresh
    boxes, scores, labels = det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()
    if len(boxes) == 0:
        return image.clone()
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]
    names = [class_names[int(c)] if int(c) < len(class_names) else str(int(c)) for c in labels]
    captions = [f"{n} {s:.2f}" for n, s in zip(names, scores)]
    colors = [palette[int(c) % len(palette)] for c in labels]
    width = max(1, round(max(image.shape[1:]) / 400))
    if "masks" in det:
        masks = det["masks"][keep].cpu().bool()
        instance_colors = [palette[i % len(palette)] for i in range(len(masks))]
        image = draw_segmentation_masks(image, masks, alpha=0.45, colors=instance_colors)
        colors = instance_colors
    # captions in white on a box-coloured background, readable on any image
    return draw_bounding_boxes(image, boxes, labels=captions, colors=colors, width=width, label_colors="white",
                               fill_labels=True)


def coco_ann_index(ann_file: str | Path, class_names: Sequence[str]) -> tuple[dict[str, list[dict]], list[int]]:
    """Images of a COCO dataset file by file base name, and its category ids in label order (ascending id, as
    :class:`e2edet.data.coco.CocoDetection` maps them).

    Raises:
        DatasetError: unreadable JSON, no ``images``/``categories`` lists, or categories that differ from the
            model's ``class_names`` (names the file).
    """
    ann_file = Path(ann_file)
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, ValueError) as err:
        raise dataset_error(ann_file, "file", f"cannot read it as JSON ({error_text(err)})") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("categories"), list):
        raise dataset_error(ann_file, "file", "not a COCO dataset file (needs 'images' and 'categories' lists)")
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        names = [str(c["name"]) for c in cats]
        index: dict[str, list[dict]] = {}
        for img in data["images"]:
            int(img["id"])
            index.setdefault(Path(str(img["file_name"])).name, []).append(img)
    except (KeyError, TypeError, ValueError) as err:
        raise dataset_error(ann_file, "images/categories", f"an entry lacks an integer id, file_name or name "
                                                           f"({error_text(err)})") from err
    if names != list(class_names):
        raise dataset_error(ann_file, "categories", f"{names} (in id order) differ from the model's classes "
                                                    f"{list(class_names)}")
    return index, [int(c["id"]) for c in cats]


def coco_results(
    images: Sequence[tuple[str | Path, int, int, dict]], class_names: Sequence[str], coco_ann: str | Path | None = None
) -> tuple[list[dict], dict | None]:
    """Detections in the COCO results format (what ``COCO.loadRes`` and the COCO evaluation servers read).

    Args:
        images: per image ``(file, height, width, det)`` with ``det`` a predictor result (``boxes [k, 4]`` xyxy
            pixels of the original image, ``scores [k]``, ``labels [k]`` contiguous; with ``masks [k, H, W]``, or
            their COCO RLEs as ``rles`` (a list), each result also holds its ``segmentation`` RLE).
        class_names: the model's classes (label order).
        coco_ann: a COCO dataset JSON the images come from: image ids are taken from it (an image is found by its
            file name, and by the trailing path when two share a name) and labels become its category ids
            (ascending id order, as training maps them). None: images are numbered 1, 2, ... in the given order and
            label ``l`` becomes category id ``l + 1``.
    Returns:
        ``(results, image_list)``: one ``{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}`` per
        detection, image by image in score order; and, without ``coco_ann``, a COCO dataset skeleton
        ``{"images": [{"id", "file_name", "height", "width"}], "categories": [{"id", "name"}],
        "annotations": []}`` naming those ids (None with ``coco_ann``).
    Raises:
        DatasetError: ``coco_ann`` unreadable or not COCO, its categories differ from ``class_names``, an image is
            not in it (or ambiguous, or of another size); the one-line message names the file.
    """
    results: list[dict] = []
    skeleton = None
    if coco_ann is None:
        category_ids = list(range(1, len(class_names) + 1))
        skeleton = {"images": [], "annotations": [],
                    "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    else:
        index, category_ids = coco_ann_index(coco_ann, class_names)
    for number, (file, height, width, det) in enumerate(images, start=1):
        if skeleton is not None:
            image_id = number
            skeleton["images"].append({"id": number, "file_name": str(file), "height": height, "width": width})
        else:
            found = index.get(Path(file).name, [])
            if len(found) > 1:
                found = [i for i in found if Path(file).as_posix().endswith(Path(str(i["file_name"])).as_posix())]
            if len(found) != 1:
                problem = "no image has this file name" if not found else "several images match it"
                raise dataset_error(coco_ann, f"image {file}", f"{problem} (images are matched by file_name)")
            entry = found[0]
            if (entry.get("height", height), entry.get("width", width)) != (height, width):
                raise dataset_error(coco_ann, f"image id {entry['id']} ({entry['file_name']})",
                                    f"is {entry.get('width')}x{entry.get('height')} but {file} is {width}x{height}")
            image_id = int(entry["id"])
        rles = det.get("rles") or (encode_masks(det["masks"]) if "masks" in det else None)
        for i, (box, score, label) in enumerate(zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                    det["labels"].tolist())):
            x1, y1, x2, y2 = box
            results.append({"image_id": image_id, "category_id": category_ids[int(label)],
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": round(score, 5)})
            if rles is not None:
                results[-1]["segmentation"] = rles[i]
    return results, skeleton
