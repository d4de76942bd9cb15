"""Fine-tuning (``train.weights`` / ``weights=``): tensors that fit are loaded, the class logits of another class
count are re-initialised with a one-line report; bad weights and ``--resume`` of another class count are one-line
errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from e2edet.build import build_model
from e2edet.cli import main
from e2edet.config import ConfigError, apply_overrides, to_dict
from e2edet.engine.checkpoint import load_matching_weights, save_checkpoint
from e2edet.recipes import get_recipe
from tests.conftest import TINY


def _cfg(classes: list[str], *extra: str):
    return apply_overrides(get_recipe("defcn_mnv2_cpu"), [*TINY, f"model.num_classes={len(classes)}",
                                                          f"model.class_names=[{','.join(classes)}]", *extra])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A run folder (``checkpoints/{best,last}``) of a tiny 2-class DeFCN with weights unlike a fresh model's."""
    run = tmp_path_factory.mktemp("finetune") / "src"
    cfg = _cfg(["cat", "dog"])
    torch.manual_seed(123)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    for tag in ("best", "last"):
        save_checkpoint(run, tag, model, None, None, {}, to_dict(cfg))
    return run


def test_matching_tensors_load_and_the_class_logits_are_reinitialised(source):
    torch.manual_seed(0)
    model = build_model(_cfg(["a", "b", "c"]))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_matching_weights(model, source)
    src = load_file(str(source / "checkpoints" / "best" / "model.safetensors"))
    now = model.state_dict()
    assert report.mismatched and set(report.mismatched) == {k for k in src if src[k].shape != fresh[k].shape}
    assert all(report.mismatched[k][0][0] == 2 and report.mismatched[k][1][0] == 3 for k in report.mismatched)
    assert not report.missing and not report.ignored and len(report.loaded) == len(now) - len(report.mismatched)
    assert all(torch.equal(now[k], src[k]) for k in report.loaded)
    assert all(torch.equal(now[k], fresh[k]) for k in report.mismatched)
    key = next(iter(report.mismatched))
    assert str(report).startswith(f"loaded {len(report.loaded)}/{len(now)} tensors from "
                                  f"{source / 'checkpoints' / 'best' / 'model.safetensors'}; re-initialised "
                                  f"{len(report.mismatched)} (shape mismatch: {key} [2, ")


def test_missing_and_unknown_tensors_are_reported(source, tmp_path):
    src = load_file(str(source / "checkpoints" / "last" / "model.safetensors"))
    first = min(src)
    del src[first]
    src["extra.weight"] = torch.zeros(2)
    save_file(src, str(tmp_path / "edited.safetensors"))
    report = load_matching_weights(build_model(_cfg(["cat", "dog"])), tmp_path / "edited.safetensors")
    assert report.missing == (first,) and report.ignored == ("extra.weight",) and not report.mismatched
    assert f"re-initialised 1 (not in the file: {first})" in str(report)
    assert str(report).endswith("; ignored 1 not in the model (extra.weight)")


def test_weights_that_do_not_fit_are_an_error(tmp_path):
    save_file({"w": torch.zeros(2), "n": torch.tensor(0)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"^train.weights: no tensor of .*other.safetensors fits the model"):
        load_matching_weights(build_model(_cfg(["cat", "dog"])), tmp_path / "other.safetensors")


def _train(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["train", "defcn_mnv2_cpu", *TINY, "--pictures", "0", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_on_another_class_count_through_the_cli(source, bccd_subset, tmp_path, capsys):
    code, out, err = _train([f"data={bccd_subset}", "iters=2", "lr=1e-9", f"weights={source}",
                             f"output={tmp_path}"], capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("train.weights: "))
    assert line.startswith("train.weights: loaded ") and "re-initialised 2 (shape mismatch: " in line
    assert "[2, 32, 3, 3] vs [3, 32, 3, 3]" in line
    run = tmp_path / "defcn_mnv2_cpu"
    assert f"weights: {source}" in (run / "config.yaml").read_text()
    src = load_file(str(source / "checkpoints" / "best" / "model.safetensors"))
    tuned = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    same = [k for k in src if src[k].shape == tuned[k].shape and src[k].is_floating_point() and "running" not in k]
    assert len(same) > 50 and all(torch.allclose(tuned[k], src[k], atol=1e-5) for k in same)  # lr 1e-9: ~untouched
    assert tuned["head.cls_score.weight"].shape[0] == 3
    state = torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["trainer_state"]["iteration"] == 2  # optimizer, schedule and iterations start anew


@pytest.mark.parametrize("case", ["missing", "garbage", "foreign"])
def test_bad_weights_are_one_line_errors(case, bccd_subset, tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    if case == "garbage":
        path.write_bytes(b"\x00not safetensors" * 4)
    elif case == "foreign":
        save_file({"w": torch.zeros(2)}, str(path))
    code, _, err = _train([f"data={bccd_subset}", "iters=2", f"weights={path}", f"output={tmp_path}"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("e2edet: error: train.weights: "), err
    assert str(path) in lines[0] and not (tmp_path / "defcn_mnv2_cpu").exists()


def test_resume_with_another_class_count_names_the_folder(source, bccd_subset, tmp_path, capsys):
    code, _, err = _train([f"data={bccd_subset}", "--resume", str(source)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"cannot resume from {source}: its model was trained on 2 classes ['cat', 'dog'], this run has 3" in err
    assert f"train.weights={source}" in err
