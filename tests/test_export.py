"""ONNX export helpers: the set comparison of two runtimes' top-k detections, sizes and output paths."""

from __future__ import annotations

import numpy as np
import pytest

from e2edet.config import ConfigError
from e2edet.export import ExportError, check_size, compare_detections, parse_size


def _dets(n=6, seed=0):
    """One image of ``n`` sorted detections: distinct boxes, scores 0.9, 0.8, ..., labels 0/1."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 80, (n, 2))], axis=1).astype(np.float32)
    scores = np.linspace(0.9, 0.4, n).astype(np.float32)
    labels = np.arange(n) % 2
    return boxes[None], scores[None], labels[None].astype(np.int64)


def _copy(d):
    return tuple(a.copy() for a in d)


def test_identical_and_rounding_noise_agree():
    ref = _dets()
    got = _copy(ref)
    got[0][...] += 1e-3  # px
    got[1][...] += 3e-8
    assert compare_detections(ref, ref) == []
    assert compare_detections(ref, got) == []


def test_tie_swap_inside_the_top_k_is_not_a_difference():
    """Two detections with tied scores come out in the other order: index by index boxes differ by a lot."""
    ref = _dets()
    ref[1][0, 2] = ref[1][0, 3] = 0.7  # a tie
    got = _copy(ref)
    for a in got:
        a[0, [2, 3]] = a[0, [3, 2]]
    got[1][0, 2] += 2e-8
    assert np.abs(ref[0] - got[0]).max() > 10  # what the old index-by-index check reported
    assert compare_detections(ref, got) == []


def test_tie_at_the_cut_off_may_be_missing_on_either_side():
    """The N-th detection ties with one just outside the top N: each runtime keeps another one."""
    ref = _dets()
    got = _copy(ref)
    got[0][0, -1] = [5, 5, 20, 20]  # another (point, class) pair with the same score as the last one
    got[1][0, -1] = ref[1][0, -1] + 5e-8
    got[2][0, -1] = 1 - ref[2][0, -1]
    assert compare_detections(ref, got) == []
    assert compare_detections(got, ref) == []


def test_really_different_box_fails():
    ref = _dets()
    got = _copy(ref)
    got[0][0, 1] += np.array([30, 0, 30, 0], dtype=np.float32)  # moved 30 px
    problems = compare_detections(ref, got)
    assert len(problems) == 2  # the reference detection unmatched, and the moved one
    assert problems[0].startswith("image 0: reference detection 1 (label 1, score 0.8,")
    assert "closest same-label box: IoU" in problems[0]


@pytest.mark.parametrize("change", ["score", "label", "nan", "shape"])
def test_other_differences_fail(change):
    ref = _dets()
    got = _copy(ref)
    if change == "score":
        got[1][0, 0] -= 1e-3
    elif change == "label":
        got[2][0, 0] = 1 - got[2][0, 0]
    elif change == "nan":
        got[1][0, 2] = np.nan
    else:
        got = tuple(a[:, :-1] for a in got)
    assert compare_detections(ref, got)


def test_a_missing_confident_detection_is_not_a_tie():
    ref = _dets()
    got = _copy(ref)
    got[0][0, 0] = [5, 5, 20, 20]  # the top detection replaced by one at the cut-off score
    got[1][0, 0] = ref[1][0, -1]
    problems = compare_detections(ref, got)
    assert any("reference detection 0" in p for p in problems)


def test_tie_tolerance_is_tighter_than_score_tolerance():
    ref = _dets()
    got = _copy(ref)
    got[0][0, -1] = [5, 5, 20, 20]
    got[1][0, -1] = ref[1][0, -1] + 5e-5  # within score_tol, but no near-tie at the cut
    assert compare_detections(ref, got)
    assert compare_detections(ref, got, tie_tol=1e-4) == []


@pytest.mark.parametrize("text, size", [("416x576", (416, 576)), ("32X64", (32, 64)), (" 64 x 96 ", (64, 96)),
                                        ("416", (416, 416)), (" 96 ", (96, 96))])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, message", [
    ("416x", r"--size '416x': expected N \(square\) or HEIGHTxWIDTH"), ("axb", "expected N"), ("-32x64", "HEIGHTxWIDTH"),
    ("", "expected N"), ("416x576x3", "expected N"), ("100", "--size 100x100: height and width must be multiples"),
    ("0x0", "--size 0x0: height and width must be multiples of 32"), ("190x256", "e.g. 192x256"),
    ("32x99999", "between 32 and 8192"),
])
def test_bad_sizes_name_the_option(text, message):
    with pytest.raises(ExportError, match=message) as info:
        parse_size(text)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(ExportError, match="size 100x64"):
        check_size(100, 64)


def test_unwritable_outputs_name_the_path(tmp_path):
    from e2edet.export import _check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=f"{tmp_path}/file/m.onnx: cannot create the folder"):
        _check_writable(tmp_path / "file" / "m.onnx")
    with pytest.raises(ExportError, match="is a folder"):
        _check_writable(tmp_path)
    tmp = _check_writable(tmp_path / "new" / "m.onnx")
    assert tmp.is_file() and tmp.name == "m.onnx.tmp"


def test_the_worst_difference_comes_first():
    """A confident detection without a match is reported before a doubtful one (the CLI line shows the first)."""
    ref = _dets()
    got = _copy(ref)
    got[0][0, 4] += np.array([30, 0, 30, 0], dtype=np.float32)  # score 0.5
    got[0][0, 1] += np.array([30, 0, 30, 0], dtype=np.float32)  # score 0.8
    problems = compare_detections(ref, got)
    assert len(problems) == 4
    assert problems[0].startswith("image 0: reference detection 1 (label 1, score 0.8,")
    assert all("score 0.5" in p for p in problems[2:])


def test_mismatch_exits_1_and_missing_packages_name_the_extra(monkeypatch):
    import sys

    from e2edet.cli import _error_exit_code
    from e2edet.export import ExportMismatchError, _import_onnxruntime

    assert _error_exit_code(ExportMismatchError("m.onnx: differs")) == 1
    for name in ("onnx", "onnxruntime"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, name, None)  # `import name` raises ImportError
            with pytest.raises(ExportError, match=r'install the export extra: pip install "e2edet\[export\]"') as info:
                _import_onnxruntime()
            assert isinstance(info.value, ConfigError) and name in str(info.value)
