"""The F1-optimal score threshold: computed on validation, stored by training, the default of predict."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from e2edet.build import build_model
from e2edet.config import apply_overrides
from e2edet.engine.diagnostics import best_f1, diagnostics
from e2edet.engine.trainer import Trainer
from e2edet.inference import DEFAULT_SCORE, Predictor
from e2edet.recipes import get_recipe
from e2edet.tasks import primary_metric
from tests.conftest import TINY


def test_best_f1_by_hand():
    # kept 1..4: P 1, 1/2, 2/3, 1/2; R 1/2, 1/2, 1, 1; F1 2/3, 1/2, 4/5, 2/3 -> keep 3, threshold 0.7
    out = best_f1([0.6, 0.9, 0.7, 0.8], [False, True, True, False], num_gt=2)
    assert out == pytest.approx({"f1": 0.8, "threshold": 0.7, "precision": 2 / 3, "recall": 1.0})


def test_best_f1_keeps_equal_scores_together():
    # cutting between the two 0.5 scores would give F1 1.0, but a threshold cannot split them: 0.9 or 0.5
    out = best_f1([0.9, 0.5, 0.5], [True, True, False], num_gt=2)
    assert out == pytest.approx({"f1": 0.8, "threshold": 0.5, "precision": 2 / 3, "recall": 1.0})


@pytest.mark.parametrize("scores, tp, num_gt", [([], [], 3), ([0.4], [False], 1), ([0.4], [True], 0)])
def test_best_f1_without_a_match_is_zero(scores, tp, num_gt):
    assert best_f1(scores, tp, num_gt) == {"f1": 0.0, "threshold": 0.0, "precision": 0.0, "recall": 0.0}


def test_best_f1_errors():
    with pytest.raises(ValueError, match="2 scores, 1 TP flags"):
        best_f1([0.1, 0.2], [True], 1)


def test_diagnostics_report_f1_over_non_crowd_gt():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100,
                           "iscrowd": 0},
                          {"id": 3, "image_id": 1, "category_id": 1, "bbox": [80, 0, 20, 20], "area": 400,
                           "iscrowd": 1}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},   # TP
            {"image_id": 1, "category_id": 1, "bbox": [85, 5, 5, 5], "score": 0.8},    # in the crowd box: ignored
            {"image_id": 1, "category_id": 1, "bbox": [30, 30, 10, 10], "score": 0.7},  # FP
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.2}]  # TP
    d = diagnostics(gt, dets)
    # kept 1: P 1, R 1/2, F1 2/3; kept 3 (crowd one left out): P 2/3, R 1, F1 4/5
    assert (d["f1"], d["f1_threshold"], d["f1_precision"], d["f1_recall"]) == pytest.approx((0.8, 0.2, 2 / 3, 1))


def test_trainer_stores_the_threshold_of_the_primary_column():
    result = {"diagnostics": {"no_nms": {"f1_threshold": 0.41234}, "nms": {"f1_threshold": 0.2}}}
    owner = SimpleNamespace(best_metric="no_nms.AP", config_dict={"test": {"predict_score": 0.0}})
    Trainer._store_predict_score(owner, result)
    assert owner.config_dict["test"]["predict_score"] == 0.4123
    owner.best_metric = "nms.AP"  # FCOS: judged with NMS
    Trainer._store_predict_score(owner, result)
    assert owner.config_dict["test"]["predict_score"] == 0.2
    Trainer._store_predict_score(owner, {"diagnostics": {"nms": {"f1_threshold": 0.0}}})  # nothing matched
    assert owner.config_dict["test"]["predict_score"] == 0.2
    owner.best_metric = "segm.no_nms.AP"  # instance segmentation: judged by mask AP, thresholded like the boxes
    Trainer._store_predict_score(owner, result)
    assert owner.config_dict["test"]["predict_score"] == 0.4123


def test_primary_metric_is_the_own_post_processing_and_mask_ap_for_masks():
    assert primary_metric(get_recipe("fcos_mnv2_cpu")) == "nms.AP"
    assert primary_metric(get_recipe("defcn_mnv2_cpu")) == "no_nms.AP"
    assert primary_metric(get_recipe("o2f_condinst_mnv2_cpu")) == "segm.no_nms.AP"
    assert primary_metric(get_recipe("sparse_rcnn_mnv2_cpu")) == "no_nms.AP"


@pytest.mark.parametrize("stored, expected", [(0.0, DEFAULT_SCORE), (0.35, 0.35)])
def test_predict_files_default_threshold(stored, expected, tmp_path, bccd_root):
    torch.manual_seed(0)
    cfg = apply_overrides(get_recipe("defcn_mnv2_cpu"), [*TINY, "model.num_classes=3", "data.test_min_size=64",
                                                          "data.test_max_size=96", f"test.predict_score={stored}"])
    cfg.model.class_names = ("a", "b", "c")
    model = build_model(cfg)
    torch.nn.init.normal_(model.head.cls_score.bias, 0.0, 1.0)  # away from the 0.01 prior
    predictor = Predictor(model, cfg, device="cpu")
    assert predictor.default_score == expected
    image = sorted((bccd_root / "JPEGImages").glob("*.jpg"))[0]
    path = predictor.predict_files([image], tmp_path / "out", draw=True)
    scores = [d["score"] for d in json.loads(path.read_text())[0]["detections"]]
    everything = predictor(image)[0]["scores"]
    assert scores and min(scores) >= expected and len(scores) == int((everything >= expected).sum())
    if stored:  # scores of this untrained model lie in 0.33-0.37: the stored threshold removes some
        assert len(scores) < len(everything)
    assert (tmp_path / "out" / f"{image.stem}.png").is_file()
