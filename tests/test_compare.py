"""`e2edet compare`: table rows from run summaries, Markdown/JSON outputs, argument handling; and an end-to-end
train -> eval -> export run of a query-based recipe through the command line (summary.json, stage losses)."""

import json

import pytest

from e2edet.cli import main
from e2edet.compare import compare, format_table, row_from_run
from e2edet.config import ConfigError
from tests.conftest import TINY_COMMON

QUERY_TINY = ["model.num_queries=10", "model.num_stages=2", "model.dim_feedforward=64", "model.dynamic_dim=8"]


def _summary(run_dir, ap, nms_iou=0.0):
    run_dir.mkdir(parents=True)
    coco = {"AP": ap, "AP50": ap + 20}
    rel = {"edges": [0.0, 0.5, 1.0], "counts": [3, 1], "confidences": [0.2, 0.9], "precisions": [0.33, 1.0]}
    ev = {"no_nms": coco, "nms": {"AP": ap + 1, "AP50": ap + 21}, "nms_iou": 0.6,
          "diagnostics": {"no_nms": {"duplicate_rate": 12.5, "ece": 7.0, "reliability": rel},
                          "nms": {"duplicate_rate": 0.0, "ece": 9.0, "reliability": rel}},
          "crowd": {"no_nms": {"AP50": 50.0, "mMR": 60.0, "recall": 90.0},
                    "nms": {"AP50": 51.0, "mMR": 55.0, "recall": 80.0}}}
    (run_dir / "summary.json").write_text(json.dumps({"recipe": run_dir.name, "iterations": 10, "sec_per_iter": 0.5,
                                                      "peak_mem_mb": 900.0, "nms_iou": nms_iou, "eval": ev}))


def test_rows_use_each_recipes_own_post_processing(tmp_path):
    _summary(tmp_path / "fcos", 30.0, nms_iou=0.6)
    _summary(tmp_path / "defcn", 35.0)
    fcos, defcn = row_from_run("fcos", tmp_path / "fcos"), row_from_run("defcn", tmp_path / "defcn")
    assert (fcos["post"], fcos["ap50"], fcos["mmr"], fcos["ece"]) == ("NMS", 51.0, 55.0, 9.0)
    assert (defcn["post"], defcn["ap50"], defcn["mmr"], defcn["ece"]) == ("no NMS", 55.0, 60.0, 7.0)
    assert fcos["dup_rate"] == defcn["dup_rate"] == 12.5  # always the raw (no-NMS) output
    table = format_table([fcos, defcn, {"recipe": "broken", "error": "exit 1"}])
    assert "| fcos | NMS | 30.0 | 31.0 | 51.0 | 55.0 | 80.0 | 12.5 | 9.0 | 0.500 | 900 |" in table
    assert "failed: exit 1" in table
    with pytest.raises(FileNotFoundError, match="summary.json"):
        row_from_run("missing", tmp_path / "missing")


def test_mask_ap_columns_appear_only_for_segmentation_runs(tmp_path):
    _summary(tmp_path / "det", 30.0)
    _summary(tmp_path / "seg", 20.0)
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    summary["eval"]["segm"] = {"no_nms": {"AP": 18.5}, "nms": {"AP": 19.25}}
    (tmp_path / "seg" / "summary.json").write_text(json.dumps(summary))
    det, seg = row_from_run("det", tmp_path / "det"), row_from_run("seg", tmp_path / "seg")
    assert (seg["mask_ap_no_nms"], seg["mask_ap_nms"]) == (18.5, 19.25) and det["mask_ap_no_nms"] is None
    assert "mask AP no NMS |" not in format_table([det]).splitlines()[0]
    table = format_table([det, seg])
    assert "| AP no NMS | AP NMS | mask AP no NMS | mask AP NMS | AP50 |" in table
    assert "| seg | no NMS | 20.0 | 21.0 | 18.5 | 19.2 | 40.0 |" in table
    assert "| det | no NMS | 30.0 | 31.0 | - | - | 50.0 |" in table


def test_compare_reuses_finished_runs_and_writes_reports(tmp_path, capsys):
    _summary(tmp_path / "runs" / "defcn_mnv2_cpu", 35.0)
    assert main(["compare", "defcn_mnv2_cpu", "data=bccd", "iters=3", "--out", str(tmp_path), "--reuse"]) == 0
    assert "| defcn_mnv2_cpu | no NMS | 35.0 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["overrides"] == ["data=bccd", "iters=3"] and report["rows"][0]["ap_no_nms"] == 35.0
    assert "overrides: data=bccd iters=3" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "reliability.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="output"):
        compare(["defcn_mnv2_cpu"], ["output=x"], tmp_path)
    assert main(["compare", "no_such_recipe", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_query_recipe_train_eval_export(bccd_subset, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "runs"
    args = ["train", "drmm_sparse_rcnn_mnv2_cpu", f"data={bccd_subset}", "iters=2", f"output={run}", "--pictures", "1",
            *TINY_COMMON, *QUERY_TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dup%" in out and "mMR" in out
    run_dir = run / "drmm_sparse_rcnn_mnv2_cpu"
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"stage0_mm_loss", "stage1_mm_loss", "total_loss"} <= set(train[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["peak_mem_mb"] > 0 and summary["sec_per_iter"] > 0
    assert set(summary["eval"]["diagnostics"]["no_nms"]) >= {"duplicate_rate", "ece", "reliability"}
    assert (run_dir / "reliability.png").stat().st_size > 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "q.onnx"), "--size", "192x256"]) == 0


@pytest.mark.slow
def test_detr_recipe_train_eval_export(bccd_subset, tmp_path, capsys):
    """Deformable DETR++ (two-stage, refine, mixed selection, look-forward-twice) through the command line on real
    BCCD images: train (per-layer and encoder set losses logged), evaluate, export to ONNX checked by onnxruntime."""
    pytest.importorskip("onnxruntime")
    run = tmp_path / "runs"
    tiny = ["model.fpn_channels=64", "model.num_queries=20", "model.enc_layers=1", "model.dec_layers=2",
            "model.dim_feedforward=64"]
    assert main(["train", "deformable_detr_pp_mnv2_cpu", f"data={bccd_subset}", "iters=2", f"output={run}",
                 "--pictures", "0", *TINY_COMMON, *tiny]) == 0
    run_dir = run / "deformable_detr_pp_mnv2_cpu"
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"stage0_loss_cls", "stage1_loss_bbox", "enc_loss_iou", "total_loss"} <= set(train[0])
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "eval.json")]) == 0
    assert "no_nms" in json.loads((tmp_path / "eval.json").read_text())
    assert main(["export", str(run_dir), "--out", str(tmp_path / "d.onnx"), "--size", "192x256"]) == 0
    assert "dup%" in capsys.readouterr().out
