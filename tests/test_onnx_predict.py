"""Self-contained ONNX deployment: the file's metadata, dynamic height/width, and `e2edet predict model.onnx`
giving the PyTorch predictor's detections on a non-square real image (BCCD, 640 x 480)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from e2edet.build import build_model
from e2edet.cli import main
from e2edet.config import apply_overrides, to_dict
from e2edet.engine.checkpoint import save_checkpoint
from e2edet.export import ExportError, compare_detections, export_onnx, supports_dynamic_size
from e2edet.inference import OnnxPredictor, Predictor, read_image
from e2edet.recipes import get_recipe
from tests.conftest import TINY, TINY_COMMON

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

CLASSES = ["Platelets", "RBC", "WBC"]
DETR = [*TINY_COMMON, "model.num_queries=20", "model.dim_feedforward=64", "model.enc_layers=1", "model.dec_layers=1"]


def _model(recipe: str, overrides: list[str]):
    cfg = apply_overrides(get_recipe(recipe), [*overrides, "model.num_classes=3"])
    cfg.model.class_names = tuple(CLASSES)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return model, cfg


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """An untrained DeFCN run folder (scores spread by a random class bias) and its ONNX file at 256x256."""
    model, cfg = _model("defcn_mnv2_cpu", TINY)
    torch.nn.init.normal_(model.head.cls_score.bias, 0.0, 1.5)
    run = tmp_path_factory.mktemp("dense_run")
    save_checkpoint(run, "best", model, None, None, {}, to_dict(cfg))
    assert main(["export", str(run), "--out", str(run / "m.onnx"), "--size", "256"]) == 0  # square: --size N
    return run


def _as_batch(det: dict):
    return det["boxes"][None], det["scores"][None], det["labels"][None]


def test_metadata_round_trip(dense_run):
    path = dense_run / "m.onnx"
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["e2edet_format"] == "e2edet-onnx-v1"
    assert [i.name for i in proto.graph.input] == ["images"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]  # a dense graph takes any size
    onnx_pred = OnnxPredictor(path)
    torch_pred = Predictor.from_weights(dense_run, device="cpu")
    m = onnx_pred.metadata
    assert onnx_pred.class_names == CLASSES and m["recipe"] == "defcn_mnv2_cpu" and m["score"] == "cls_filter"
    assert m["input_size"] == [256, 256] and m["dynamic_size"] is True and m["max_detections"] == 100
    assert m["resize"] == {"rule": "shortest_edge", "min_size": 192, "max_size": 256}
    assert m["postprocess"] == {"score_thresh": 0.05, "clip": True} and m["e2edet_config"]["name"] == "defcn_mnv2_cpu"
    assert onnx_pred.preprocess == torch_pred.preprocess  # same resize, mean/std and padding to multiples of 32
    assert m["e2edet_version"] == __import__("e2edet").__version__


def test_onnx_predict_equals_pytorch_on_a_non_square_real_image(dense_run, bccd_root, tmp_path, capsys):
    image_file = bccd_root / "JPEGImages" / "BloodImage_00000.jpg"
    image = read_image(image_file)
    assert tuple(image.shape) == (3, 480, 640)  # resized to 192 x 256, not the 256 x 256 the file was traced at
    ref = Predictor.from_weights(dense_run, device="cpu")(image)[0]
    got = OnnxPredictor(dense_run / "m.onnx")(image)[0]
    assert 0 < len(got["scores"]) == len(ref["scores"]) <= 100 and (got["scores"] > 0.05).all()
    assert compare_detections(_as_batch(ref), _as_batch(got)) == []
    assert got["boxes"][:, 2].max() <= 640 and got["boxes"][:, 3].max() <= 480  # clipped to the original image

    for name, weights in (("pt", dense_run), ("onnx", dense_run / "m.onnx")):
        assert main(["predict", str(weights), str(image_file), "--out", str(tmp_path / name), "--score", "0.1",
                     "--no-draw", "--coco-json"]) == 0
    pt, ox = (json.loads((tmp_path / n / "detections.json").read_text())[0]["detections"] for n in ("pt", "onnx"))
    assert len(pt) == len(ox) > 0
    for a, b in zip(sorted(pt, key=lambda d: -d["score"]), sorted(ox, key=lambda d: -d["score"])):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 2e-4
        assert np.abs(np.subtract(a["box_xyxy"], b["box_xyxy"])).max() <= 0.05
    assert len(json.loads((tmp_path / "onnx" / "results.json").read_text())) == len(got["scores"])
    assert "COCO results" in capsys.readouterr().out


def test_deformable_detr_is_fixed_size_with_image_sizes(bccd_root, tmp_path):
    """DETR graphs keep the export size (deformable attention's level sizes are constants) and take image_sizes;
    the ONNX predictor letterboxes into that size and matches PyTorch with the same padding."""
    model, cfg = _model("deformable_detr_two_stage_mnv2_cpu", DETR)
    assert not supports_dynamic_size(model)
    with pytest.raises(ExportError, match="fixed size"):
        export_onnx(model, cfg, tmp_path / "x.onnx", 256, 320, dynamic=True)
    path = export_onnx(model, cfg, tmp_path / "d.onnx", 256, 320)
    onnx_pred = OnnxPredictor(path)
    assert onnx_pred.inputs == ["images", "image_sizes"] and onnx_pred.preprocess.fixed_size == (256, 320)
    image = read_image(bccd_root / "JPEGImages" / "BloodImage_00001.jpg")
    got = onnx_pred(image)[0]
    torch_pred = Predictor(model, cfg, device="cpu")
    torch_pred.preprocess = replace(torch_pred.preprocess, fixed_size=(256, 320))  # what the graph sees
    ref = torch_pred(image)[0]
    assert len(got["scores"]) == len(ref["scores"]) == 60  # 20 queries x 3 classes, no threshold
    assert compare_detections(_as_batch(ref), _as_batch(got)) == []


def test_static_export_and_coco_ids_from_a_dataset_file(dense_run, bccd_root, tmp_path, capsys):
    path = tmp_path / "static.onnx"
    assert main(["export", str(dense_run), "--out", str(path), "--size", "192x256", "--static"]) == 0
    assert "images [B, 3, 192, 256]" in capsys.readouterr().out
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 192, 256]
    onnx_pred = OnnxPredictor(path)
    assert onnx_pred.preprocess.fixed_size == (192, 256) and onnx_pred.metadata["dynamic_size"] is False
    image_file = bccd_root / "JPEGImages" / "BloodImage_00000.jpg"
    ref = Predictor.from_weights(dense_run, device="cpu")(image_file)[0]  # resized to 192 x 256: the same input
    assert compare_detections(_as_batch(ref), _as_batch(onnx_pred(image_file)[0])) == []

    ann = {"images": [{"id": 42, "file_name": image_file.name, "height": 480, "width": 640}], "annotations": [],
           "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    out = tmp_path / "pred"
    assert main(["predict", str(path), str(image_file), "--out", str(out), "--no-draw", "--coco-ann",
                 str(tmp_path / "ann.json")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} == {42} and not (out / "images.json").exists()
    assert main(["predict", str(path), str(image_file), "--coco-ann", str(tmp_path / "no.json")]) == 2
    assert "--coco-ann" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("class_names", None), ("resize", "{not json")])
def test_damaged_metadata_is_one_line(dense_run, tmp_path, key, value):
    proto = onnx.load(str(dense_run / "m.onnx"))
    kept = [p for p in proto.metadata_props if p.key != key]
    del proto.metadata_props[:]
    for p in kept:
        proto.metadata_props.add(key=p.key, value=p.value)
    if value is not None:
        proto.metadata_props.add(key=key, value=value)
    path = tmp_path / "damaged.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match=r"damaged\.onnx: damaged e2edet metadata .*export it again"):
        OnnxPredictor(path)
