"""COCO box (and, for models that predict masks, mask) evaluation with faster-coco-eval, with and without NMS from
one forward pass per batch."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from e2edet.engine.bootstrap import paired_bootstrap_ap
from e2edet.engine.coco_utils import as_coco, encode_masks, run_cocoeval
from e2edet.engine.crowd_metrics import crowd_metrics
from e2edet.engine.diagnostics import diagnostics, plot_pr_curves, plot_reliability
from e2edet.utils.dist import get_world_size, is_dist, is_main_process
from e2edet.utils.io import atomic_write_json

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""Names of COCOeval's 12 ``stats`` entries, in order."""

TABLE_ROWS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
MASK_TABLE_ROWS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Mask metrics of the table (``results["segm"]``), shown as ``maskAP``, ``maskAP50``, ..."""
IOU_TYPES = ("bbox", "segm")

DIAGNOSTIC_ROWS = {"dup%": "duplicate_rate", "ECE": "ece"}
CROWD_ROWS = {"mMR": "mMR", "recall": "recall"}
"""Table rows under :data:`TABLE_ROWS`: row name -> key of ``results["diagnostics"][column]``."""


class CocoEvaluator:
    """Accumulates detections and computes COCO box or mask AP/AR (percent, 0-100).

    Args:
        coco_gt: ground truth as a ``faster_coco_eval.COCO``, a COCO dataset dict, or a path to its JSON.
        label_to_cat_id: ``label_to_cat_id[label]`` is the COCO category id of contiguous label ``label``.
        iou_type: ``"bbox"`` (box AP) or ``"segm"`` (mask AP: the predictions carry ``masks``, stored as RLE; the
            ground truth needs ``segmentation`` entries).
    Raises:
        ValueError: a mapped category id is not among the ground-truth categories, or an unknown ``iou_type``.

    Under DDP every rank calls :meth:`update` with its own images and then :meth:`summarize` (collective);
    images seen by several ranks (a padded distributed sampler) count once.
    """

    def __init__(self, coco_gt: Any, label_to_cat_id: Sequence[int], iou_type: str = "bbox") -> None:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        self.iou_type = iou_type
        self.coco_gt = as_coco(coco_gt)
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        unknown = sorted(set(self.label_to_cat_id) - set(self.coco_gt.getCatIds()))
        if unknown:
            raise ValueError(f"label_to_cat_id maps to category ids {unknown} absent from the ground truth "
                             f"(known: {sorted(self.coco_gt.getCatIds())})")
        self._gt_image_ids = set(self.coco_gt.getImgIds())
        self._per_image: dict[int, list[dict[str, Any]]] = {}
        self._synced = False
        self._curves: dict[str, Any] | None = None

    def update(self, image_ids: Iterable[int], predictions: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Add the detections of a batch (adding an image again replaces its earlier detections).

        Args:
            image_ids: COCO image ids, one per prediction.
            predictions: per image ``{"boxes": [k, 4] xyxy pixels of the original image, "scores": [k],
                "labels": [k] contiguous labels}`` (the post-processor contract), and for ``iou_type="segm"``
                ``"masks": bool [k, H, W]`` in the original image. Mask results hold the RLE ``segmentation`` and no
                ``bbox``, so that COCO takes a detection's area (small/medium/large) from its mask, as detectron2
                and mmdet do.
        Raises:
            ValueError: length mismatch, unknown image id, a label outside ``label_to_cat_id``, or (``segm``)
                missing masks or a mask count that differs from the box count.
        """
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != len(predictions):
            raise ValueError(f"{len(image_ids)} image ids but {len(predictions)} predictions")
        num_labels = len(self.label_to_cat_id)
        for image_id, pred in zip(image_ids, predictions):
            if image_id not in self._gt_image_ids:
                raise ValueError(f"image id {image_id} is not in the ground-truth annotations")
            boxes = pred["boxes"].detach().float().cpu().reshape(-1, 4)
            scores = pred["scores"].detach().float().cpu().reshape(-1).tolist()
            labels = pred["labels"].detach().cpu().reshape(-1).tolist()
            bad = [lab for lab in labels if not 0 <= lab < num_labels]
            if bad:
                raise ValueError(f"labels {sorted(set(bad))} of image {image_id} are outside [0, {num_labels})")
            if self.iou_type == "segm":
                if "masks" not in pred or pred["masks"].shape[0] != len(scores):
                    found = tuple(pred["masks"].shape) if "masks" in pred else "none"
                    raise ValueError(f"image {image_id}: segm evaluation needs masks [k, H, W] for its {len(scores)} "
                                     f"detections, got {found}")
                regions = [{"segmentation": rle} for rle in encode_masks(pred["masks"])]
            else:
                xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
                regions = [{"bbox": box} for box in xywh]
            self._per_image[image_id] = [
                {"image_id": image_id, "category_id": self.label_to_cat_id[int(lab)], **region, "score": score}
                for region, score, lab in zip(regions, scores, labels)
            ]
        self._synced = False
        self._curves = None

    def synchronize(self) -> None:
        """Merge detections from all ranks (collective under DDP; the first rank holding an image wins)."""
        if self._synced:
            return
        if is_dist() and get_world_size() > 1:
            gathered: list[dict[int, list[dict[str, Any]]]] = [{} for _ in range(get_world_size())]
            dist.all_gather_object(gathered, self._per_image)
            merged: dict[int, list[dict[str, Any]]] = {}
            for part in gathered:
                for image_id, dets in part.items():
                    merged.setdefault(int(image_id), dets)
            self._per_image = merged
        self._synced = True

    @property
    def image_ids(self) -> list[int]:
        """Sorted ids of the images added so far (all ranks after :meth:`synchronize`)."""
        return sorted(self._per_image)

    def detections(self) -> list[dict[str, Any]]:
        """Detections in COCO results format (``image_id``, ``category_id``, ``bbox`` xywh or ``segmentation``
        RLE, ``score``)."""
        return [copy.copy(d) for image_id in self.image_ids for d in self._per_image[image_id]]

    def summarize(self) -> dict[str, float]:
        """COCO metrics over the images added so far (all GT images if none was added).

        Returns:
            ``{name: value}`` for :data:`METRIC_NAMES`, in percent (0-100). A metric that COCO leaves
            undefined (no ground truth in that area range) is ``-1.0``. Without any detection all are 0.
        """
        self.synchronize()
        dets = self.detections()
        image_ids = self.image_ids or sorted(self._gt_image_ids)
        if not dets:
            self._curves = self._curves_from(None, image_ids)
            return {name: 0.0 for name in METRIC_NAMES}
        coco_eval = run_cocoeval(self.coco_gt, dets, self.iou_type, image_ids)
        self._curves = self._curves_from(coco_eval, image_ids)
        return {name: (float(v) * 100.0 if v >= 0 else -1.0) for name, v in zip(METRIC_NAMES, coco_eval.stats)}

    def _curves_from(self, coco_eval: Any, image_ids: Sequence[int]) -> dict[str, Any]:
        """:meth:`pr_curves` from an accumulated ``COCOeval`` (``None``: no detection, precision 0)."""
        order = list(dict.fromkeys(self.label_to_cat_id)) + sorted(set(self.coco_gt.getCatIds())
                                                                   - set(self.label_to_cat_id))
        images = set(image_ids)
        num_gt = dict.fromkeys(order, 0)
        for ann in self.coco_gt.dataset.get("annotations", []):
            if int(ann["image_id"]) in images and not ann.get("iscrowd", 0) and int(ann["category_id"]) in num_gt:
                num_gt[int(ann["category_id"])] += 1
        if coco_eval is None:
            ious, recall = np.linspace(0.5, 0.95, 10), np.linspace(0.0, 1.0, 101)
            precision = np.zeros((len(ious), len(recall), len(order)))
            precision[:, :, [num_gt[c] == 0 for c in order]] = -1.0
        else:
            p = coco_eval.params
            ious, recall = np.asarray(p.iouThrs, dtype=np.float64), np.asarray(p.recThrs, dtype=np.float64)
            column = {int(c): k for k, c in enumerate(p.catIds)}
            # precision [T, R, K, A, M]: area range "all", the largest maxDets (100), categories in label order
            full = np.asarray(coco_eval.eval["precision"], dtype=np.float64)
            precision = full[:, :, [column[c] for c in order], p.areaRngLbl.index("all"), -1]
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in self.coco_gt.loadCats(order)}
        return {"iou_thresholds": ious, "recall": recall, "precision": precision, "category_ids": order,
                "names": [names[c] for c in order], "num_gt": [num_gt[c] for c in order]}

    def pr_curves(self) -> dict[str, Any]:
        """COCO's interpolated precision-recall curves of the last :meth:`summarize`, per class.

        Returns:
            ``{"iou_thresholds": [T] float (0.5 ... 0.95), "recall": [R] float (the 101 recall points 0 ... 1),
            "precision": [T, R, K] float in [0, 1] (area range "all", up to 100 detections per image; -1 for a
            class without ground truth), "category_ids": [K], "names": [K], "num_gt": [K] non-crowd GT boxes}``
            (NumPy arrays and lists), classes in label order (``label_to_cat_id``), then any other ground-truth
            category. The mean of ``precision[t, :, k]`` is the AP of class ``k`` at IoU threshold ``t``.
        Raises:
            RuntimeError: :meth:`summarize` was not called since the last :meth:`update`.
        """
        if self._curves is None:
            raise RuntimeError("CocoEvaluator.pr_curves() needs summarize() first")
        return self._curves


def per_class_ap(curves: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-class AP (IoU 0.50:0.95) and AP50 from :meth:`CocoEvaluator.pr_curves`, the detectron2 way.

    AP of class ``k`` is the mean of ``precision[:, :, k]`` over its valid entries (> -1), AP50 the mean of the
    row at IoU 0.5; COCO's AP is the mean of these over the classes with ground truth.

    Returns:
        One ``{"category_id", "name", "num_gt", "AP", "AP50"}`` per class, in the order of ``curves``; AP and
        AP50 in percent (0-100), ``None`` for a class without ground truth in the evaluated images.
    """
    precision = np.asarray(curves["precision"], dtype=np.float64)
    at50 = int(np.argmin(np.abs(np.asarray(curves["iou_thresholds"], dtype=np.float64) - 0.5)))
    rows = []
    for k, (cat_id, name, num_gt) in enumerate(zip(curves["category_ids"], curves["names"], curves["num_gt"])):
        values = []
        for p in (precision[:, :, k], precision[at50, :, k]):
            p = p[p > -1]
            values.append(float(p.mean()) * 100.0 if p.size else None)
        rows.append({"category_id": int(cat_id), "name": str(name), "num_gt": int(num_gt), "AP": values[0],
                     "AP50": values[1]})
    return rows


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocessor: Any,
    loader: Iterable,
    device: torch.device | str,
    coco_gt: Any,
    label_to_cat_id: Sequence[int],
    nms_iou: float = 0.6,
    return_detections: bool = False,
    progress: bool = True,
    plot_path: str | Path | None = None,
    pr_curve_path: str | Path | None = None,
    bootstrap: int = 0,
) -> dict[str, Any]:
    """COCO AP and end-to-end diagnostics of ``model`` with and without NMS, running the model once per batch.

    Args:
        model: detector, called as ``model(images, image_sizes)`` (``image_sizes`` int64 ``[B, 2]`` (h, w) of the
            unpadded inputs); put in eval mode here.
        postprocessor: called twice on the same outputs, ``postprocessor(outputs, image_sizes, orig_sizes,
            nms_iou=None)`` and ``(..., nms_iou=nms_iou)``; ``image_sizes``/``orig_sizes`` are int64 ``[B, 2]``
            ``(h, w)`` tensors on ``device`` stacked from ``targets[i]["size"]``/``["orig_size"]``.
        loader: yields ``(images [B, 3, H, W], targets)`` batches (the collate contract).
        device: where the model runs.
        coco_gt: ground truth (see :class:`CocoEvaluator`).
        label_to_cat_id: contiguous label -> COCO category id.
        nms_iou: IoU threshold of the "with NMS" column.
        return_detections: also return the no-NMS detections in COCO results format under ``"detections"``.
        progress: show a progress bar on the main process.
        plot_path: if given, the main process writes the reliability diagram of both columns there (PNG, see
            :func:`e2edet.engine.diagnostics.plot_reliability`).
        pr_curve_path: if given, the main process writes the per-class precision-recall curves of both columns
            there (PNG, IoU 0.5 and the mean over IoU 0.5:0.95, see
            :func:`e2edet.engine.diagnostics.plot_pr_curves`).
        bootstrap: if > 0, that many paired bootstrap resamples of the images give a 95 % confidence interval of
            box AP without NMS minus AP with NMS (:func:`e2edet.engine.bootstrap.paired_bootstrap_ap`, seed 0),
            returned under ``"bootstrap"``; each resample costs two COCO evaluations of the image set.
    Returns:
        ``{"no_nms": metrics, "nms": metrics, "nms_iou": nms_iou, "num_images": n, "seconds": wall time,
        "diagnostics": {"no_nms": diag, "nms": diag}, "crowd": {"no_nms": crowd, "nms": crowd},
        "per_class": {"no_nms": rows, "nms": rows}}`` and, when the post-processor returns ``masks`` (instance
        segmentation models), ``"segm": {"no_nms": metrics, "nms": metrics}``: COCO mask AP (faster-coco-eval
        ``segm``) of the same detections, the NMS column with NMS on their boxes (metrics as in
        :meth:`CocoEvaluator.summarize`, ``diag`` as in :func:`e2edet.engine.diagnostics.diagnostics` with its
        defaults: IoU 0.5, duplicates among scores >= 0.3, 20 calibration bins; ``crowd`` = AP50, mMR and recall
        of the CrowdHuman protocol, :func:`e2edet.engine.crowd_metrics.crowd_metrics`, class-aware on multi-class
        data; ``None`` when the ground truth has no non-crowd box; ``rows`` as in :func:`per_class_ap`). Under
        DDP every rank returns the same numbers (computed from the detections gathered by the collective
        :meth:`CocoEvaluator.summarize`).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    plain, with_nms = CocoEvaluator(coco_gt, label_to_cat_id), CocoEvaluator(coco_gt, label_to_cat_id)
    masks: dict[str, CocoEvaluator] = {}  # "no_nms"/"nms" mask evaluators, once the post-processor gives masks
    start = time.perf_counter()
    try:
        for images, targets in tqdm(loader, desc="eval", disable=not (progress and is_main_process()),
                                    dynamic_ncols=True, leave=False):
            sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(device)
            outputs = model(images.to(device, non_blocking=True), sizes)
            orig = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
            ids = [int(t["image_id"]) for t in targets]
            for column, evaluator, iou in (("no_nms", plain, None), ("nms", with_nms, nms_iou)):
                detections = postprocessor(outputs, sizes, orig, nms_iou=iou)
                evaluator.update(ids, detections)
                if detections and "masks" in detections[0]:
                    if column not in masks:
                        masks[column] = CocoEvaluator(evaluator.coco_gt, label_to_cat_id, iou_type="segm")
                    masks[column].update(ids, detections)
    finally:
        model.train(was_training)
    results: dict[str, Any] = {"no_nms": plain.summarize(), "nms": with_nms.summarize(), "nms_iou": nms_iou,
                               "num_images": len(plain.image_ids), "seconds": time.perf_counter() - start}
    if is_dist() and get_world_size() > 1:  # every rank takes part in the mask collectives, or none does
        gathered: list[bool] = [False] * get_world_size()
        dist.all_gather_object(gathered, bool(masks))
        if any(gathered) and not masks:  # this rank saw no image: empty evaluators for the collectives
            masks = {c: CocoEvaluator(plain.coco_gt, label_to_cat_id, iou_type="segm") for c in ("no_nms", "nms")}
    if masks:
        results["segm"] = {column: masks[column].summarize() for column in ("no_nms", "nms")}
    # summarize() synchronised both evaluators (collective), so every rank holds all detections here
    results["per_class"] = {"no_nms": per_class_ap(plain.pr_curves()), "nms": per_class_ap(with_nms.pr_curves())}
    results["diagnostics"] = {"no_nms": diagnostics(plain.coco_gt, plain.detections()),
                              "nms": diagnostics(with_nms.coco_gt, with_nms.detections())}
    has_gt = any(not a.get("iscrowd", 0) for a in plain.coco_gt.dataset.get("annotations", []))
    results["crowd"] = {name: crowd_metrics(ev.coco_gt, ev.detections()) if has_gt else None
                        for name, ev in (("no_nms", plain), ("nms", with_nms))}
    if plot_path is not None and is_main_process():
        plot_reliability({"no NMS": results["diagnostics"]["no_nms"],
                          f"NMS {nms_iou:g}": results["diagnostics"]["nms"]}, plot_path,
                         title=f"Reliability (TP at IoU >= 0.5), {results['num_images']} images")
    if pr_curve_path is not None and is_main_process():
        plot_pr_curves({"no NMS": plain.pr_curves(), f"NMS {nms_iou:g}": with_nms.pr_curves()}, pr_curve_path,
                       title=f"Precision-recall, {results['num_images']} images")
    if bootstrap > 0:
        results["bootstrap"] = paired_bootstrap_ap(plain.coco_gt, plain.detections(), with_nms.detections(),
                                                   bootstrap, image_ids=plain.image_ids or None)
    if return_detections:
        results["detections"] = plain.detections()
    return results


def format_results_table(results: Mapping[str, Any], per_class: bool = True) -> str:
    """Text table of :func:`evaluate` results, columns "no NMS" and "NMS <iou>".

    Rows AP ... AR100 (boxes), then ``maskAP`` ... ``maskAPl`` when the results hold mask metrics (``segm``), then
    "dup%" (duplicate rate, percent) and "ECE" (percent) from ``results["diagnostics"]``,
    and "mMR" / "recall" (CrowdHuman protocol, percent) from ``results["crowd"]``; a missing value shows as "-".
    A line on the bootstrap interval of the AP difference follows when the results hold one (``"bootstrap"``).
    With ``per_class`` and more than one class in ``results["per_class"]``, :func:`format_per_class_table`
    follows after a blank line.
    """
    main = _main_table(results)
    boot = results.get("bootstrap")
    if boot:
        main += (f"\nAP no NMS - NMS {results.get('nms_iou', 0.6):g}: {boot['difference']:+.2f}, "
                 f"{100 * boot['confidence']:.0f}% CI [{boot['ci'][0]:+.2f}, {boot['ci'][1]:+.2f}] over "
                 f"{boot['num_samples']} paired resamples of the {boot['num_images']} images "
                 f"(no NMS >= NMS in {100 * boot['share_a_ge_b']:.0f}% of them)")
    rows = (results.get("per_class") or {}).get("no_nms") or []
    return f"{main}\n\n{format_per_class_table(results)}" if per_class and len(rows) > 1 else main


def format_per_class_table(results: Mapping[str, Any]) -> str:
    """Per-class table of :func:`evaluate` results: class name, GT boxes, AP and AP50 without and with NMS.

    Reads ``results["per_class"]`` (:func:`per_class_ap` rows per column); a missing value shows as "-", a
    class name longer than 20 characters is cut. Empty string when the results have no per-class rows.
    """
    block = results.get("per_class") or {}
    columns = [block.get("no_nms") or [], block.get("nms") or []]
    if not any(columns):
        return ""
    by_id = [{r["category_id"]: r for r in rows} for rows in columns]
    ids = list(dict.fromkeys(r["category_id"] for rows in columns for r in rows))
    names = {r["category_id"]: str(r["name"])[:20] for rows in columns for r in rows}
    width = max(8, *(len(n) + 1 for n in names.values()))
    nms_name = f"NMS {results.get('nms_iou', 0.6):g}"
    lines = [f"{'':<{width}}{'':>7}{'no NMS':>16}{nms_name:>16}",
             f"{'class':<{width}}{'GT':>7}" + f"{'AP':>8}{'AP50':>8}" * 2]
    for cat_id in ids:
        cells, num_gt = [], None
        for table in by_id:
            row = table.get(cat_id) or {}
            num_gt = row.get("num_gt", num_gt)
            cells += ["-" if row.get(key) is None else f"{row[key]:.1f}" for key in ("AP", "AP50")]
        lines.append(f"{names[cat_id]:<{width}}{'-' if num_gt is None else num_gt:>7}"
                     + "".join(f"{c:>8}" for c in cells))
    return "\n".join(lines)


def _row(label: str, block: Mapping[str, Any], key: str, negative_is_missing: bool) -> str:
    """One table row: ``label``, then ``block[column][key]`` for the no-NMS and NMS columns ("-" when missing)."""
    cells = []
    for column in ("no_nms", "nms"):
        value = (block.get(column) or {}).get(key)
        missing = value is None or (negative_is_missing and value < 0)  # COCO writes -1 for an empty area range
        cells.append("-" if missing else f"{value:.1f}")
    return f"{label:<8}{cells[0]:>10}{cells[1]:>10}"


def _main_table(results: Mapping[str, Any]) -> str:
    """The metric rows of :func:`format_results_table`."""
    nms_name = f"NMS {results.get('nms_iou', 0.6):g}"
    lines = [f"{'metric':<8}{'no NMS':>10}{nms_name:>10}"]
    lines += [_row(row, results, row, True) for row in TABLE_ROWS]
    segm = results.get("segm") or {}
    if segm:
        lines += [_row("mask" + row, segm, row, True) for row in MASK_TABLE_ROWS]
    for section, rows in (("diagnostics", DIAGNOSTIC_ROWS), ("crowd", CROWD_ROWS)):
        lines += [_row(row, results.get(section) or {}, key, False) for row, key in rows.items()]
    return "\n".join(lines)


def save_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` as indented JSON atomically (:func:`e2edet.utils.io.atomic_write_json`); returns the path."""
    return atomic_write_json(path, results, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v))
