"""A dataset's optional test split: read from the dataset YAML, evaluated once at the end of training."""

from __future__ import annotations

import json

import pytest
import yaml

from e2edet.cli import main
from e2edet.data.datasets import resolve_dataset
from e2edet.data.errors import DatasetError
from tests.conftest import TINY


@pytest.fixture()
def with_test(bccd_subset, tmp_path):
    spec = yaml.safe_load(bccd_subset.read_text())
    for key in ("train_json", "val_json"):
        spec[key] = str(bccd_subset.parent / spec[key])
    spec["test_json"], spec["test_images"] = spec["val_json"], spec["val_images"]
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_yaml_test_split_is_optional_and_checked(with_test, bccd_subset):
    assert resolve_dataset(str(bccd_subset)).test_json is None
    paths = resolve_dataset(str(with_test))
    assert paths.test_json == paths.val_json and paths.test_images == paths.val_images
    spec = yaml.safe_load(with_test.read_text())
    del spec["test_images"]
    with_test.write_text(yaml.safe_dump(spec))
    with pytest.raises(DatasetError, match="test_json and test_images go together"):
        resolve_dataset(str(with_test))


def test_training_evaluates_the_test_split_at_the_end(with_test, tmp_path, capsys):
    argv = ["train", "defcn_mnv2_cpu", f"data={with_test}", "iters=2", f"output={tmp_path}", "--pictures", "1",
            *TINY]
    assert main(argv) == 0
    run = tmp_path / "defcn_mnv2_cpu"
    out = capsys.readouterr().out
    assert "Test split" in out and "(final model)" in out
    summary = json.loads((run / "summary.json").read_text())
    test = json.loads((run / "eval_test.json").read_text())
    assert summary["test"]["no_nms"] == test["no_nms"] and test["num_images"] == 3
    assert summary["eval"]["no_nms"] == test["no_nms"]  # the same images and final model as the val evaluation
    assert len(list((run / "predictions").glob("*.png"))) == 1  # val and test share their first image
