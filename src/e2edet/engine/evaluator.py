"""COCO box evaluation with faster-coco-eval, with and without NMS from one forward pass per batch."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from faster_coco_eval import COCOeval_faster
from torch import nn
from tqdm import tqdm

from e2edet.engine.coco_utils import as_coco, quiet_print
from e2edet.engine.crowd_metrics import crowd_metrics
from e2edet.engine.diagnostics import diagnostics, plot_reliability
from e2edet.utils.dist import get_world_size, is_dist, is_main_process
from e2edet.utils.io import atomic_write_json

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""Names of COCOeval's 12 ``stats`` entries, in order."""

TABLE_ROWS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")

DIAGNOSTIC_ROWS = {"dup%": "duplicate_rate", "ECE": "ece"}
CROWD_ROWS = {"mMR": "mMR", "recall": "recall"}
"""Table rows under :data:`TABLE_ROWS`: row name -> key of ``results["diagnostics"][column]``."""


class CocoEvaluator:
    """Accumulates detections and computes COCO box AP/AR (percent, 0-100).

    Args:
        coco_gt: ground truth as a ``faster_coco_eval.COCO``, a COCO dataset dict, or a path to its JSON.
        label_to_cat_id: ``label_to_cat_id[label]`` is the COCO category id of contiguous label ``label``.
    Raises:
        ValueError: a mapped category id is not among the ground-truth categories.

    Under DDP every rank calls :meth:`update` with its own images and then :meth:`summarize` (collective);
    images seen by several ranks (a padded distributed sampler) count once.
    """

    def __init__(self, coco_gt: Any, label_to_cat_id: Sequence[int]) -> None:
        self.coco_gt = as_coco(coco_gt)
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        unknown = sorted(set(self.label_to_cat_id) - set(self.coco_gt.getCatIds()))
        if unknown:
            raise ValueError(f"label_to_cat_id maps to category ids {unknown} absent from the ground truth "
                             f"(known: {sorted(self.coco_gt.getCatIds())})")
        self._gt_image_ids = set(self.coco_gt.getImgIds())
        self._per_image: dict[int, list[dict[str, Any]]] = {}
        self._synced = False

    def update(self, image_ids: Iterable[int], predictions: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Add the detections of a batch (adding an image again replaces its earlier detections).

        Args:
            image_ids: COCO image ids, one per prediction.
            predictions: per image ``{"boxes": [k, 4] xyxy pixels of the original image, "scores": [k],
                "labels": [k] contiguous labels}`` (the post-processor contract).
        Raises:
            ValueError: length mismatch, unknown image id, or a label outside ``label_to_cat_id``.
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
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            self._per_image[image_id] = [
                {"image_id": image_id, "category_id": self.label_to_cat_id[int(lab)], "bbox": box,
                 "score": score}
                for box, score, lab in zip(xywh, scores, labels)
            ]
        self._synced = False

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
        """Detections in COCO results format (``image_id``, ``category_id``, ``bbox`` xywh, ``score``)."""
        return [copy.copy(d) for image_id in self.image_ids for d in self._per_image[image_id]]

    def summarize(self) -> dict[str, float]:
        """COCO metrics over the images added so far (all GT images if none was added).

        Returns:
            ``{name: value}`` for :data:`METRIC_NAMES`, in percent (0-100). A metric that COCO leaves
            undefined (no ground truth in that area range) is ``-1.0``. Without any detection all are 0.
        """
        self.synchronize()
        dets = self.detections()
        if not dets:
            return {name: 0.0 for name in METRIC_NAMES}
        coco_dt = self.coco_gt.loadRes(dets)
        coco_eval = COCOeval_faster(self.coco_gt, coco_dt, iouType="bbox", print_function=quiet_print)
        coco_eval.params.imgIds = self.image_ids or sorted(self._gt_image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return {name: (float(v) * 100.0 if v >= 0 else -1.0) for name, v in zip(METRIC_NAMES, coco_eval.stats)}


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
    Returns:
        ``{"no_nms": metrics, "nms": metrics, "nms_iou": nms_iou, "num_images": n, "seconds": wall time,
        "diagnostics": {"no_nms": diag, "nms": diag}, "crowd": {"no_nms": crowd, "nms": crowd}}`` (metrics as in
        :meth:`CocoEvaluator.summarize`, ``diag`` as in :func:`e2edet.engine.diagnostics.diagnostics` with its
        defaults: IoU 0.5, duplicates among scores >= 0.3, 20 calibration bins; ``crowd`` = AP50, mMR and recall
        of the CrowdHuman protocol, :func:`e2edet.engine.crowd_metrics.crowd_metrics`, class-aware on multi-class
        data; ``None`` when the ground truth has no non-crowd box). Under DDP every rank returns the same numbers (computed from the
        detections gathered by the collective :meth:`CocoEvaluator.summarize`).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    plain, with_nms = CocoEvaluator(coco_gt, label_to_cat_id), CocoEvaluator(coco_gt, label_to_cat_id)
    start = time.perf_counter()
    try:
        for images, targets in tqdm(loader, desc="eval", disable=not (progress and is_main_process()),
                                    dynamic_ncols=True, leave=False):
            sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(device)
            outputs = model(images.to(device, non_blocking=True), sizes)
            orig = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
            ids = [int(t["image_id"]) for t in targets]
            plain.update(ids, postprocessor(outputs, sizes, orig, nms_iou=None))
            with_nms.update(ids, postprocessor(outputs, sizes, orig, nms_iou=nms_iou))
    finally:
        model.train(was_training)
    results: dict[str, Any] = {"no_nms": plain.summarize(), "nms": with_nms.summarize(), "nms_iou": nms_iou,
                               "num_images": len(plain.image_ids), "seconds": time.perf_counter() - start}
    # summarize() synchronised both evaluators (collective), so every rank holds all detections here
    results["diagnostics"] = {"no_nms": diagnostics(plain.coco_gt, plain.detections()),
                              "nms": diagnostics(with_nms.coco_gt, with_nms.detections())}
    has_gt = any(not a.get("iscrowd", 0) for a in plain.coco_gt.dataset.get("annotations", []))
    results["crowd"] = {name: crowd_metrics(ev.coco_gt, ev.detections()) if has_gt else None
                        for name, ev in (("no_nms", plain), ("nms", with_nms))}
    if plot_path is not None and is_main_process():
        plot_reliability({"no NMS": results["diagnostics"]["no_nms"],
                          f"NMS {nms_iou:g}": results["diagnostics"]["nms"]}, plot_path,
                         title=f"Reliability (TP at IoU >= 0.5), {results['num_images']} images")
    if return_detections:
        results["detections"] = plain.detections()
    return results


def format_results_table(results: Mapping[str, Any]) -> str:
    """Text table of :func:`evaluate` results, columns "no NMS" and "NMS <iou>".

    Rows AP ... AR100, then "dup%" (duplicate rate, percent) and "ECE" (percent) from ``results["diagnostics"]``,
    and "mMR" / "recall" (CrowdHuman protocol, percent) from ``results["crowd"]``; a missing value shows as "-".
    """
    nms_name = f"NMS {results.get('nms_iou', 0.6):g}"
    lines = [f"{'metric':<8}{'no NMS':>10}{nms_name:>10}"]
    for row in TABLE_ROWS:
        cells = []
        for column in ("no_nms", "nms"):
            value = (results.get(column) or {}).get(row)
            cells.append("-" if value is None or value < 0 else f"{value:.1f}")
        lines.append(f"{row:<8}{cells[0]:>10}{cells[1]:>10}")
    for section, rows in (("diagnostics", DIAGNOSTIC_ROWS), ("crowd", CROWD_ROWS)):
        block = results.get(section) or {}
        for row, key in rows.items():
            cells = []
            for column in ("no_nms", "nms"):
                value = (block.get(column) or {}).get(key)
                cells.append("-" if value is None else f"{value:.1f}")
            lines.append(f"{row:<8}{cells[0]:>10}{cells[1]:>10}")
    return "\n".join(lines)


def save_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` as indented JSON atomically (:func:`e2edet.utils.io.atomic_write_json`); returns the path."""
    return atomic_write_json(path, results, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v))
