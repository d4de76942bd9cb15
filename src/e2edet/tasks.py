"""The jobs behind the command line: train a recipe, evaluate weights, predict on images.

Each job prints a short report and writes its files into the run folder (``output_dir/name``):
``config.yaml``, ``metrics.jsonl``, ``loss.png``, ``checkpoints/``, ``eval_*.json`` and ``predictions/``.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
from pathlib import Path

import torch

from e2edet.build import build_criterion, build_datasets, build_model, build_postprocessor, fill_classes
from e2edet.config import Config, ConfigError, apply_overrides, save_config, to_dict
from e2edet.data.loader import build_loader
from e2edet.engine.checkpoint import load_matching_weights
from e2edet.engine.device import init_distributed
from e2edet.engine.evaluator import evaluate, format_results_table, save_results
from e2edet.engine.logger import read_metrics
from e2edet.engine.rng import seed_everything
from e2edet.engine.run_dir import acquire_run_lock, clear_run, new_run_dir, remove_if_unused, run_dir_of_checkpoint
from e2edet.engine.trainer import Trainer
from e2edet.inference import DEFAULT_SCORE, Predictor, load_predictor
from e2edet.utils.dist import broadcast_object, is_main_process


def primary_metric(cfg: Config) -> str:
    """The metric that selects the best checkpoint: AP of the method's own post-processing.

    End-to-end recipes (``test.nms_iou == 0``) are judged without NMS, one-to-many baselines (FCOS) with it;
    instance-segmentation recipes (``model.masks``) by mask AP (``segm.no_nms.AP``), as the O2F CondInst table is.
    """
    column = "nms" if cfg.test.nms_iou > 0 else "no_nms"
    return f"segm.{column}.AP" if getattr(cfg.model, "masks", False) else f"{column}.AP"


def _report(results: dict, cfg: Config, title: str) -> None:
    if is_main_process():
        print(f"\n{title}")
        print(format_results_table(results))
        print(f"(primary metric for {cfg.name}: {primary_metric(cfg)})")


def train(cfg: Config, resume: str | Path | None = None, num_pictures: int = 8, exist_ok: bool = False) -> dict:
    """Train ``cfg``, evaluating AP with and without NMS on the validation split, and draw predictions.

    The run folder is ``cfg.run_dir`` (``output_dir/name``), or its first free numbered sibling (``name-2``,
    ``name-3``, ...) when that already holds files; ``exist_ok`` reuses it instead, removing the previous run's
    outputs (:func:`e2edet.engine.run_dir.clear_run`) once the lock is held and the data and model are built.
    ``resume`` trains on in the folder it names. A lock file keeps a second training out of a folder in use; a new
    folder that a failed start left empty is removed. ``cfg.train.weights`` (a new run only) starts from those
    weights where names and shapes fit (:func:`e2edet.engine.checkpoint.load_matching_weights`) and prints its
    one-line report.

    Returns:
        The final evaluation results (``{"no_nms": {...}, "nms": {...}, ...}``); empty when a resumed run had
        nothing left to train.
    Raises:
        ConfigError / DatasetError: bad config or data (before any training starts); the run folder is locked by
            another training.
        FloatingPointError: the training diverged (see :class:`e2edet.engine.trainer.Trainer`).
        TrainingInterrupted: SIGINT/SIGTERM; ``checkpoints/last`` holds the current iteration.
    """
    device, _ = init_distributed(cfg.train.device)  # before the loaders: their samplers shard by rank
    run_dir = run_dir_of_checkpoint(resume) if resume is not None else None
    lock, error = None, None
    if is_main_process():  # rank 0 picks and locks the folder; every rank gets the folder or the error
        try:
            run_dir = run_dir or new_run_dir(cfg.run_dir, exist_ok=exist_ok)
            lock = acquire_run_lock(run_dir)
        except ConfigError as err:
            error = str(err)
    run_dir, error = broadcast_object((run_dir, error))
    if error is not None:
        raise ConfigError(error)
    try:
        return _train(cfg, run_dir, device, resume, num_pictures, clear=exist_ok and resume is None)
    except BaseException:
        if lock is not None:
            lock.release()
            lock = None
            if resume is None:
                remove_if_unused(run_dir)
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, run_dir: Path, device: torch.device, resume: str | Path | None, num_pictures: int,
           clear: bool) -> dict:
    """:func:`train` inside its locked run folder; ``clear`` removes a previous run's outputs first (``exist_ok``)."""
    data = build_datasets(cfg)
    fill_classes(cfg, data.train.class_names)
    seed_everything(cfg.train.seed)  # model initialisation is part of a repeatable run
    model = build_model(cfg)
    if cfg.train.weights and resume is None:  # fine-tuning: a resumed run restores its own weights instead
        report = load_matching_weights(model, cfg.train.weights)
        if is_main_process():
            print(f"train.weights: {report}")
    criterion = build_criterion(cfg)
    postprocessor = build_postprocessor(cfg)
    t = cfg.train
    train_loader = build_loader(data.train, t.batch_size, train=True, workers=t.workers, seed=t.seed)
    val_loader = build_loader(data.val, t.batch_size, train=False, workers=t.workers, seed=t.seed)
    if is_main_process():
        n_train, n_val = len(data.train), len(data.val)
        print(f"{cfg.name}: {n_train} train / {n_val} val images, {cfg.model.num_classes} classes "
              f"{list(cfg.model.class_names)}; run folder {run_dir}")

    def evaluate_fn(net: torch.nn.Module, epoch: int) -> dict:
        device = next(net.parameters()).device
        results = evaluate(net, postprocessor, val_loader, device, data.val.coco, data.val.label_to_cat_id,
                           nms_iou=cfg.test.eval_nms_iou, plot_path=run_dir / "reliability.png",
                           pr_curve_path=run_dir / "pr_curve.png")
        _report(results, cfg, f"Evaluation after epoch {epoch} on {data.paths.val_json}")
        return results

    if clear and is_main_process():  # data and model are built: the new run is about to write
        clear_run(run_dir)
    trainer = Trainer(model, criterion, train_loader, t, run_dir, config_dict=to_dict(cfg),
                      evaluate_fn=evaluate_fn, best_metric=primary_metric(cfg))
    try:
        if resume is not None:
            trainer.resume(resume)  # a checkpoint of another model fails here, before config.yaml is touched
        if is_main_process():
            save_config(cfg, run_dir / "config.yaml")
        summary = trainer.fit()
    finally:
        trainer.close()
    results = summary["eval"]
    test_results = None
    if results is not None and data.test is not None:  # once, with the final (EMA) model, on every rank
        test_loader = build_loader(data.test, t.batch_size, train=False, workers=t.workers, seed=t.seed)
        test_results = evaluate(trainer.eval_model, postprocessor, test_loader, device, data.test.coco,
                                data.test.label_to_cat_id, nms_iou=cfg.test.eval_nms_iou)
        _report(test_results, cfg, f"Test split {data.paths.test_json} (final model)")
        if is_main_process():
            save_results(test_results, run_dir / "eval_test.json")
    if is_main_process() and results is not None:
        write_summary(cfg, run_dir, results, device, test_results)
    if results is None and is_main_process():  # e.g. resuming a run that had already finished
        print(f"{run_dir}: no training left to do (iteration {summary['iteration']}); see `e2edet eval {run_dir}`")
        return {}
    cfg.test.predict_score = float(trainer.config_dict["test"].get("predict_score", 0.0))  # the last evaluation's
    if is_main_process() and num_pictures > 0:
        files = [Path(data.paths.val_images) / img["file_name"] for img in data.val.coco["images"][:num_pictures]]
        if data.test is not None:  # the test split's images too
            files += [Path(data.paths.test_images) / i["file_name"] for i in data.test.coco["images"][:num_pictures]]
            files = list(dict.fromkeys(files))
        Predictor(trainer.eval_model, cfg, device=device).predict_files(files, run_dir / "predictions")
        print(f"prediction pictures: {run_dir / 'predictions'}")
    return results


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA allocation of ``device`` (MiB), or on CPU the peak resident set size of this process (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def write_summary(cfg: Config, run_dir: Path, results: dict, device: torch.device, test: dict | None = None) -> Path:
    """Write ``run_dir/summary.json``: recipe, iterations, median seconds per iteration (from the train records of
    ``metrics.jsonl``, the first one left out as warm-up when there are several), peak memory and the final
    evaluation (read by ``e2edet compare``), and the test split's evaluation under ``"test"`` when given."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("type") == "train" and "time" in r]
    times = [float(r["time"]) for r in (records[1:] if len(records) > 1 else records)]
    summary = {"recipe": cfg.name, "iterations": records[-1]["iteration"] if records else 0,
               "sec_per_iter": statistics.median(times) if times else None, "peak_mem_mb": peak_memory_mb(device),
               "device": str(device), "nms_iou": cfg.test.nms_iou, "eval": results}
    if test is not None:
        summary["test"] = test
    path = run_dir / "summary.json"
    save_results(summary, path)
    return path


def evaluate_weights(weights: str | Path, overrides: list[str], out: str | Path | None = None,
                     device: str = "auto", bootstrap: int = 0) -> dict:
    """Evaluate trained weights on the validation split of their dataset (or ``data=...`` from ``overrides``).

    Writes the results JSON to ``out`` (default: ``eval.json`` beside the weights), the reliability diagram and
    the precision-recall curves beside it (``<stem>_reliability.png``, ``<stem>_pr_curve.png``) and prints the
    tables (metrics, then AP per class). ``bootstrap`` > 0 adds the paired bootstrap interval of AP without NMS
    minus AP with NMS over that many resamples of the images (see :func:`e2edet.engine.evaluator.evaluate`).

    Raises:
        ConfigError: the dataset's classes differ from the model's.
    """
    predictor = Predictor.from_weights(weights, device=device)
    cfg = apply_overrides(predictor.cfg, overrides)
    data = build_datasets(cfg, train=False)
    if tuple(data.val.class_names) != tuple(cfg.model.class_names):
        raise ConfigError(f"{data.paths.val_json}: classes {data.val.class_names} differ from the model's "
                          f"{list(cfg.model.class_names)}")
    loader = build_loader(data.val, cfg.train.batch_size, train=False, workers=cfg.train.workers, seed=cfg.train.seed)
    postprocessor = build_postprocessor(cfg)
    weights = Path(weights)
    out = Path(out) if out else (weights if weights.is_dir() else weights.parent) / "eval.json"
    results = evaluate(predictor.model, postprocessor, loader, predictor.device, data.val.coco,
                       data.val.label_to_cat_id, nms_iou=cfg.test.eval_nms_iou,
                       plot_path=out.with_name(out.stem + "_reliability.png"),
                       pr_curve_path=out.with_name(out.stem + "_pr_curve.png"), bootstrap=bootstrap)
    save_results(results, out)
    _report(results, cfg, f"{weights} on {data.paths.val_json}")
    print(f"results: {out}")
    return results


def predict(weights: str | Path, files: list[Path], out: str | Path, score_thresh: float | None, draw: bool = True,
            device: str = "auto", coco_json: bool = False, coco_ann: str | Path | None = None) -> Path:
    """Run trained weights (run folder, checkpoint, ``.safetensors``) or an exported ``.onnx`` file (onnxruntime,
    :class:`e2edet.inference.OnnxPredictor`) on image files; writes ``detections.json``, pictures and, with
    ``coco_json``/``coco_ann``, ``results.json`` (COCO results) into ``out``
    (:meth:`e2edet.inference.BasePredictor.predict_files`)."""
    predictor = load_predictor(weights, device=device)
    json_path = predictor.predict_files(files, out, score_thresh=score_thresh, draw=draw, coco_json=coco_json,
                                        coco_ann=coco_ann)
    records = json.loads(json_path.read_text())
    n = sum(len(r["detections"]) for r in records)
    used = predictor.default_score if score_thresh is None else score_thresh
    stored = score_thresh is None and predictor.default_score != DEFAULT_SCORE
    origin = " (the run's F1-optimal threshold)" if stored else ""
    print(f"{len(records)} images, {n} detections with score >= {used:g}{origin}: {json_path}")
    if coco_json or coco_ann is not None:
        print(f"COCO results (every detection): {json_path.parent / 'results.json'}")
    return json_path
