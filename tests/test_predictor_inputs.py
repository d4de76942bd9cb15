"""Predictor inputs (paths, PIL images, numpy arrays, uint8 tensors, lists; a lone [3, H, W] tensor is one image),
the shared preprocessing, and COCO results JSON from predict."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from e2edet.build import build_model
from e2edet.config import apply_overrides
from e2edet.data.collate import pad_images
from e2edet.data.errors import DatasetError
from e2edet.data.transforms import ResizeShortestEdge, build_eval_transforms
from e2edet.engine.coco_utils import as_coco
from e2edet.inference import Predictor, Preprocessing, as_images, coco_results, read_image  # noqa: F401 (README)
from e2edet.recipes import get_recipe
from tests.conftest import TINY

#: Shortest-edge 64, longest 96: tiny network inputs.
SMALL = [*TINY, "model.num_classes=3", "data.test_min_size=64", "data.test_max_size=96"]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    cfg = apply_overrides(get_recipe("defcn_mnv2_cpu"), SMALL)
    cfg.model.class_names = ("a", "b", "c")
    model = build_model(cfg)
    torch.nn.init.normal_(model.head.cls_score.bias, 0.0, 1.0)  # spread the scores (the prior makes all 0.01)
    return Predictor(model, cfg, device="cpu")


def _image(h=50, w=70, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_every_input_kind_gives_the_tensor_result(predictor, tmp_path):
    image = _image()
    ref = predictor(image)
    assert len(ref) == 1 and ref[0]["boxes"].shape[-1] == 4 and len(ref[0]["scores"]) > 0
    path = tmp_path / "x.png"
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
    for kind in (str(path), path, Image.open(path), array, np.asfortranarray(array), [image], (image,)):
        _same(predictor(kind), ref)
    _same(predictor(Image.fromarray(array).convert("RGBA")), ref)  # any PIL mode becomes RGB


def test_a_lone_tensor_is_one_image_and_a_4d_tensor_is_a_batch(predictor):
    a, b = _image(seed=1), _image(seed=2)
    assert len(predictor(a)) == 1  # not 3 (one per channel), as before
    batch = predictor(torch.stack([a, b]))
    assert len(batch) == 2
    _same(batch, predictor([a, b]))
    _same(predictor([a, torch.stack([b, a])]), predictor([a, b, a]))
    assert predictor([]) == []


@pytest.mark.parametrize("bad, error, message", [
    (torch.rand(3, 20, 30), ValueError, r"image: tensor of dtype torch.float32; expected torch.uint8 .*\* 255"),
    (torch.zeros(20, 30, 3, dtype=torch.uint8), ValueError, r"shape \[20, 30, 3\].*x.permute\(2, 0, 1\)"),
    (torch.zeros(1, 20, 30, dtype=torch.uint8), ValueError, r"expected \[3, H, W\] \(one RGB image\) or \[B, 3"),
    (torch.zeros(3, 0, 30, dtype=torch.uint8), ValueError, r"shape \[3, 0, 30\]"),
    (np.zeros((20, 30, 3), np.float32), ValueError, "numpy array of dtype float32; expected uint8"),
    (np.zeros((3, 20, 30), np.uint8), ValueError, r"shape \(3, 20, 30\); expected H x W x 3 .*torch.from_numpy"),
    (np.zeros((20, 30), np.uint8), ValueError, "expected H x W x 3"),
    (42, TypeError, "image: int is not an image"),
    ([_image(), [_image()]], TypeError, "image 1: a nested list"),
    ([_image(), torch.rand(3, 8, 8)], ValueError, "image 1: tensor of dtype torch.float32"),
])
def test_bad_inputs_are_one_line_errors(predictor, bad, error, message):
    with pytest.raises(error, match=message) as info:
        predictor(bad)
    assert "\n" not in str(info.value)


def test_a_missing_path_names_the_file(predictor, tmp_path):
    with pytest.raises(DatasetError, match="nope.jpg"):
        predictor(tmp_path / "nope.jpg")


@pytest.mark.parametrize("h, w", [(480, 640), (640, 480), (333, 1000), (64, 64), (7, 5000)])
def test_preprocessing_is_the_evaluation_transform(h, w):
    """Resize rule and pixels equal the evaluation pipeline (ResizeShortestEdge + ToDtype + Normalize, padded)."""
    pre = Preprocessing(320, 480)
    assert pre.resized_shape(h, w) == ResizeShortestEdge(320, 480).make_params([torch.zeros(3, h, w)])["size"]
    if h * w <= 640 * 480:
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h))
        batch, sizes, orig = pre([image])
        ref = build_eval_transforms(320, 480)(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        assert torch.equal(batch, pad_images([ref], 32))
        assert sizes.tolist() == [list(ref.shape[-2:])] and orig.tolist() == [[h, w]]


def test_fixed_size_shrinks_to_fit_and_pads_to_it():
    pre = Preprocessing(320, 480, fixed_size=(256, 256))
    batch, sizes, _ = pre([_image(480, 640), _image(100, 100)])
    assert batch.shape == (2, 3, 256, 256)
    assert sizes.tolist() == [[192, 256], [256, 256]]  # 640 x 480 -> 256 wide (the rule alone gives 427 x 320)
    assert (batch[0, :, 192:] == 0).all()
    assert replace(pre, fixed_size=None)([_image(480, 640)])[0].shape == (1, 3, 320, 448)


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_coco_results_without_and_with_a_dataset_file(tmp_path):
    dets = [("imgs/a.jpg", 40, 60, _det([[1, 2, 11, 22]], [0.9], [1])),
            ("other/b.jpg", 30, 30, _det([[0, 0, 5, 5], [2, 2, 4, 8]], [0.8, 0.1], [0, 2]))]
    results, images = coco_results(dets, ["a", "b", "c"])
    assert results[0] == {"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.9}
    assert [r["image_id"] for r in results] == [1, 2, 2] and [r["category_id"] for r in results] == [2, 1, 3]
    assert images["images"][1] == {"id": 2, "file_name": "other/b.jpg", "height": 30, "width": 30}
    assert images["categories"][2] == {"id": 3, "name": "c"}
    loaded = as_coco(images).loadRes(results)  # what COCO evaluation reads
    assert len(loaded.getAnnIds()) == 3

    ann = {"images": [{"id": 17, "file_name": "data/b.jpg", "height": 30, "width": 30},
                      {"id": 5, "file_name": "a.jpg", "height": 40, "width": 60}],
           "categories": [{"id": 9, "name": "c"}, {"id": 1, "name": "a"}, {"id": 4, "name": "b"}],
           "annotations": []}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    results, images = coco_results(dets, ["a", "b", "c"], tmp_path / "ann.json")
    assert images is None
    assert [(r["image_id"], r["category_id"]) for r in results] == [(5, 4), (17, 1), (17, 9)]

    for change, message in [(lambda a: a["categories"].pop(), r"categories: \['a', 'c'\] \(in id order\) differ"),
                            (lambda a: a["images"].pop(), "image imgs/a.jpg: no image has this file name"),
                            (lambda a: a["images"][1].update(width=61), "is 61x40 but imgs/a.jpg is 60x40"),
                            (lambda a: a.pop("images"), "not a COCO dataset file")]:
        broken = json.loads(json.dumps(ann))
        change(broken)
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(DatasetError, match=message):
            coco_results(dets, ["a", "b", "c"], tmp_path / "bad.json")


def test_predict_files_writes_coco_results(predictor, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(_image(60, 90).permute(1, 2, 0).numpy()).save(path)
    out = predictor.predict_files([path], tmp_path / "out", score_thresh=0.99, draw=False, coco_json=True)
    assert json.loads(out.read_text())[0]["detections"] == []  # --score applies to detections.json ...
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == len(predictor(path)[0]["scores"]) > 0  # ... not to the COCO results
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    assert images["images"] == [{"id": 1, "file_name": str(path), "height": 60, "width": 90}]


@pytest.mark.parametrize("batch_size", [0, -2, 1.5])
def test_bad_batch_size_is_refused(predictor, batch_size):
    with pytest.raises(ValueError, match=r"batch_size .*: must be an integer >= 1"):
        predictor(_image(), batch_size=batch_size)


def test_export_refuses_a_per_level_topk_below_max_detections(predictor, tmp_path):
    from e2edet.export import ExportError, export_onnx

    cfg = apply_overrides(predictor.cfg, ["test.topk_candidates=10"])
    with pytest.raises(ExportError, match=r"test\.topk_candidates=10 < test\.max_detections=100"):
        export_onnx(predictor.model, cfg, tmp_path / "m.onnx", 64, 96)
    assert not (tmp_path / "m.onnx").exists()


def test_coco_ann_of_other_classes_fails_before_any_picture(predictor, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "height": 20, "width": 30}],
                               "categories": [{"id": 1, "name": "other"}], "annotations": []}))
    with pytest.raises(DatasetError, match=r"ann\.json: categories: \['other'\] .* differ from the model's classes"):
        predictor.predict_files([image], tmp_path / "out", coco_ann=ann)
    assert not (tmp_path / "out").exists()
