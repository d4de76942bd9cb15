"""Command-line smoke tests, and the whole train → eval → predict path on a handful of real BCCD images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2edet.cli import main
from tests.conftest import TINY


def test_recipes_list_and_show(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "defcn_mnv2_cpu" in out and "fcos_r50_3x_ms" in out
    assert main(["recipes", "show", "defcn_r50_3x_ms"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["loss"]["assigner"] == "poto" and shown["model"]["max_filter"] is True


@pytest.mark.parametrize("argv, message", [
    (["train", "defcn_mnv2_cpu", "train.epoch=3"], "unknown config key 'train.epoch'"),
    (["train", "no_such_recipe"], "unknown recipe"),
    (["train", "defcn_r50_3x_ms"], "needs a dataset: add data=PATH"),
    (["train", "defcn_mnv2_cpu", "data=/no/such/folder"], "/no/such/folder"),
    (["predict", "/no/such/weights", "x.jpg"], "no such image file or folder"),
    (["eval", "/no/such/run"], "/no/such/run"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_data_convert_and_check(bccd_root, tmp_path, capsys):
    out = tmp_path / "val.json"
    with pytest.warns(UserWarning, match="zero-size"):  # BCCD has one degenerate RBC box in val
        assert main(["data", "convert", "voc", str(bccd_root), "--split", "val", "--out", str(out)]) == 0
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == 87 and [c["name"] for c in coco["categories"]] == ["Platelets", "RBC", "WBC"]
    assert main(["data", "check", str(out), "--images", str(bccd_root / "JPEGImages")]) == 0
    assert "OK (87 images" in capsys.readouterr().out
    coco["annotations"][0]["category_id"] = 99
    out.write_text(json.dumps(coco))
    assert main(["data", "check", str(out)]) == 2
    assert "99" in capsys.readouterr().err


@pytest.mark.slow
def test_train_eval_predict_on_real_images(bccd_subset, tmp_path, capsys):
    run = tmp_path / "runs"
    args = ["train", "defcn_mnv2_cpu", f"data={bccd_subset}", "iters=4", f"output={run}", "--pictures", "2", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no NMS" in out and "NMS 0.6" in out and "AP50" in out
    run_dir = run / "defcn_mnv2_cpu"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert all(r["num_fg_per_gt"] == pytest.approx(1.0) for r in train)  # POTO: one positive per GT
    assert {"loss_cls", "loss_box", "loss_cls_aux"} <= set(train[0])
    assert (run_dir / "loss.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").is_file()
    assert len(list((run_dir / "predictions").glob("*.png"))) == 2

    assert main(["eval", str(run_dir), "--out", str(tmp_path / "eval.json"), "--bootstrap", "4"]) == 0
    assert "paired resamples of the 3 images" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results["no_nms"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}
    assert results["num_images"] == 3
    assert results["bootstrap"]["num_samples"] == 4
    assert results["bootstrap"]["a"] == pytest.approx(results["no_nms"]["AP"], abs=1e-4)

    images = yaml.safe_load(bccd_subset.read_text())["val_images"]
    first = sorted(Path(images).glob("*.jpg"))[:2]
    assert main(["predict", str(run_dir), *map(str, first), "--out", str(tmp_path / "pred"), "--score", "0"]) == 0
    dets = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert [d["file"] for d in dets] == [str(p) for p in first]
    for record in dets:
        assert len(record["detections"]) <= 100
        scores = [d["score"] for d in record["detections"]]
        assert scores == sorted(scores, reverse=True)
        for d in record["detections"]:
            x1, y1, x2, y2 = d["box_xyxy"]
            assert 0 <= x1 < x2 <= record["width"] and 0 <= y1 < y2 <= record["height"]
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2


@pytest.mark.slow
def test_export_onnx_matches_pytorch(bccd_subset, tmp_path):
    """`e2edet export` writes an NMS-free ONNX graph whose outputs match the PyTorch predictor's top-k."""
    ort = pytest.importorskip("onnxruntime")
    import torch

    from e2edet.export import EndToEndDetector, compare_detections
    from e2edet.inference import Predictor

    run = tmp_path / "runs"
    assert main(["train", "defcn_mnv2_cpu", f"data={bccd_subset}", "iters=1", f"output={run}", "--pictures", "0",
                 *TINY]) == 0
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(run / "defcn_mnv2_cpu"), "--out", str(onnx_path), "--size", "192x256"]) == 0
    predictor = Predictor.from_weights(run / "defcn_mnv2_cpu", device="cpu")
    images = torch.randn(2, 3, 192, 256)
    boxes, scores, labels = ort.InferenceSession(str(onnx_path)).run(None, {"images": images.numpy()})
    assert boxes.shape == (2, 100, 4) and scores.shape == (2, 100) and labels.shape == (2, 100)
    with torch.no_grad():
        ref = EndToEndDetector(predictor.model, "cls_filter", 100)(images)
    # near-tied scores may swap places (or cross the top-100 cut-off): compare the detections as sets
    assert compare_detections(ref, (boxes, scores, labels)) == []
    assert torch.allclose(torch.from_numpy(scores), ref[1], atol=1e-5)  # sorted scores agree position by position
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # sorted, no NMS
    assert main(["export", str(run / "defcn_mnv2_cpu"), "--out", str(onnx_path), "--size", "190x256"]) == 2
