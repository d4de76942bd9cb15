"""Bad inputs through the command line: exit status 2, ONE line on stderr naming the file or key, no traceback.

Every case runs ``e2edet.cli.main`` in-process on tiny files made once per module (a 2-class COCO dataset of
96x128 images and weights of a freshly built, untrained ``defcn_mnv2_cpu`` shrunk with ``TINY``), so each case
takes about a second; two cases run ``python -m e2edet`` to check the real stderr (no warnings or tracebacks).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from e2edet.build import build_model
from e2edet.cli import _worker_message, main, one_line
from e2edet.config import apply_overrides, to_dict
from e2edet.engine.checkpoint import save_checkpoint
from e2edet.recipes import get_recipe
from tests.conftest import ROOT, TINY

CLASSES = ["cat", "dog"]


def _image(path: Path, size=(128, 96), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _coco(folder: Path, names: list[str], classes=CLASSES) -> dict:
    images = [{"id": i + 1, "file_name": n, "width": 128, "height": 96} for i, n in enumerate(names)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % len(classes), "bbox": [10, 10, 40, 30],
             "area": 1200, "iscrowd": 0} for i in range(len(names))]
    return {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}


def _dataset(root: Path, classes=CLASSES, bad_train_images: bool = False) -> Path:
    """A dataset YAML over 4 train / 2 val random images (with ``bad_train_images``: 2 train images, truncated)."""
    root.mkdir(parents=True)
    (root / "images").mkdir()
    names = [_image(root / "images" / f"{i}.png", seed=i).name for i in range(4)]
    train = names
    if bad_train_images:
        train = names[:2]
        for name in train:
            data = (root / "images" / name).read_bytes()
            (root / "images" / name).write_bytes(data[: len(data) // 3])
    (root / "train.json").write_text(json.dumps(_coco(root, train, classes)))
    (root / "val.json").write_text(json.dumps(_coco(root, names[2:], classes)))
    spec = {"train_json": "train.json", "train_images": "images", "val_json": "val.json", "val_images": "images"}
    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    return root / "data.yaml"


def _save_run(run_dir: Path, recipe: str, data: Path, classes: list[str], extra: list[str] = ()) -> Path:
    """A run folder with ``checkpoints/{best,last}`` of a freshly built (untrained) tiny model."""
    cfg = apply_overrides(get_recipe(recipe), [*TINY, f"data={data}", f"model.num_classes={len(classes)}",
                                               f"model.class_names=[{','.join(classes)}]", *extra])
    torch.manual_seed(0)
    model = build_model(cfg)
    for tag in ("best", "last"):
        save_checkpoint(run_dir, tag, model, None, None, {}, to_dict(cfg))
    return run_dir


def _edit_weights(src: Path, dst: Path, edit) -> Path:
    """Copy of the weights file ``src`` (same metadata) with ``edit(state_dict)`` applied."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(src))
    edit(state)
    save_file(state, str(dst), metadata=metadata)
    return dst


@pytest.fixture(scope="module")
def f(tmp_path_factory) -> dict[str, Path]:
    """Every file the cases need, by name (see the comments)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    p: dict[str, Path] = {"tmp": tmp}
    p["data"] = _dataset(tmp / "ds")
    p["data3"] = _dataset(tmp / "ds3", classes=["a", "b", "c"])  # another class count
    p["data_badimg"] = _dataset(tmp / "ds_badimg", bad_train_images=True)
    p["run"] = _save_run(tmp / "runs" / "tiny", "defcn_mnv2_cpu", p["data"], CLASSES)
    p["fcos"] = _save_run(tmp / "runs" / "fcos", "fcos_mnv2_cpu", p["data"], CLASSES)
    good = p["run"] / "checkpoints" / "best" / "model.safetensors"
    p["weights"] = good
    cls_key = next(k for k in load_file(str(good)) if "cls" in k and k.endswith("weight"))

    def drop(s):
        del s[cls_key]

    def extra(s):
        s["head.extra.weight"] = torch.zeros(3)

    def reshape(s):
        s[cls_key] = torch.zeros(3, *s[cls_key].shape[1:])

    def nan(s):
        s[cls_key][0] = float("nan")

    def inf(s):
        s[cls_key].fill_(float("inf"))

    for name, edit in (("missing", drop), ("extra", extra), ("shape", reshape), ("nan", nan), ("inf", inf)):
        p[name] = _edit_weights(good, tmp / f"{name}.safetensors", edit)
    for name in ("nan", "missing"):  # run folders for --resume
        run = tmp / "runs" / f"run_{name}"
        (run / "checkpoints" / "last").mkdir(parents=True)
        (run / "checkpoints" / "last" / "model.safetensors").write_bytes(p[name].read_bytes())
        (run / "checkpoints" / "last" / "state.pt").write_bytes((good.parent / "state.pt").read_bytes())
        p[f"run_{name}"] = run
    p["garbage"] = tmp / "garbage.safetensors"
    p["garbage"].write_bytes(b"\x00garbage" * 10)
    p["truncated"] = tmp / "truncated.safetensors"
    p["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    p["plain"] = tmp / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(p["plain"]))
    p["foreign"] = tmp / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(p["foreign"]), metadata={"format": "other-v9"})
    p["img"] = _image(tmp / "img.png")
    p["notimg"] = tmp / "notimg.png"
    p["notimg"].write_bytes(b"this is not a png")
    p["file"] = tmp / "a_file"
    p["file"].write_text("x")
    (tmp / "outdir").mkdir()
    p["bad_yaml"] = tmp / "bad.yaml"
    p["bad_yaml"].write_text("train: [unclosed\n")
    p["bad_key_yaml"] = tmp / "badkey.yaml"
    p["bad_key_yaml"].write_text("train:\n  epochz: 3\n")
    p["bad_json"] = tmp / "bad.json"
    p["bad_json"].write_text("{not json")

    # data-side inputs: a VOC folder with a nan coordinate, one with a truncated JPEG, COCO files whose images are
    # empty, truncated or of another size than recorded, a YOLO tree
    for name, xmin, truncate in (("voc_nan", "nan", False), ("voc_trunc", "10", True)):
        voc = tmp / name
        (voc / "Annotations").mkdir(parents=True)
        (voc / "JPEGImages").mkdir()
        jpg = voc / "JPEGImages" / "a.jpg"
        _image(jpg)
        if truncate:
            jpg.write_bytes(jpg.read_bytes()[:200])
        (voc / "Annotations" / "a.xml").write_text(
            "<annotation><filename>a.jpg</filename><size><width>128</width><height>96</height><depth>3</depth>"
            f"</size><object><name>cat</name><difficult>0</difficult><bndbox><xmin>{xmin}</xmin><ymin>10</ymin>"
            "<xmax>50</xmax><ymax>40</ymax></bndbox></object></annotation>")
        p[name] = voc
    for name in ("empty", "trunc", "size"):
        folder = tmp / f"check_{name}"
        folder.mkdir()
        img = _image(folder / "a.png")
        coco = _coco(folder, ["a.png"])
        if name == "empty":
            img.write_bytes(b"")
        elif name == "trunc":
            img.write_bytes(img.read_bytes()[:100])
        else:
            coco["images"][0]["width"] = 640
        (folder / "ann.json").write_text(json.dumps(coco))
        p[f"check_{name}"] = folder
    yolo = tmp / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    _image(yolo / "images" / "a.png")
    (yolo / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (yolo / "names.txt").write_text("cat\n")
    p["yolo"] = yolo
    return p


def _t(tmp: Path, *parts: str) -> str:
    return str(tmp.joinpath(*parts))


# (id, argv built from the fixture dict f, text the one line must contain); "{name}" is replaced by str(f[name]).
CASES = [
    # --- recipes, config files and overrides
    ("unknown recipe", ["train", "no_such_recipe"], "no_such_recipe"),
    ("missing config yaml", ["train", "{tmp}/no_such.yaml"], "no_such.yaml"),
    ("invalid yaml", ["train", "{bad_yaml}"], "bad.yaml"),
    ("unknown key in yaml", ["train", "{bad_key_yaml}"], "train.epochz"),
    ("unknown override key", ["train", "defcn_mnv2_cpu", "train.epoch=3"], "train.epoch"),
    ("override without =", ["train", "defcn_mnv2_cpu", "epochs"], "'epochs'"),
    ("option without value", ["train", "defcn_mnv2_cpu", "--resume"], "--resume"),
    ("badly typed int", ["train", "defcn_mnv2_cpu", "train.epochs=abc"], "train.epochs"),
    ("badly typed bool", ["train", "defcn_mnv2_cpu", "model.pretrained=maybe"], "model.pretrained"),
    ("bad choice", ["train", "defcn_mnv2_cpu", "loss.assigner=hungarian"], "loss.assigner"),
    ("fpn_channels 0", ["train", "defcn_mnv2_cpu", "model.fpn_channels=0"], "model.fpn_channels"),
    ("num_convs -1", ["train", "defcn_mnv2_cpu", "model.num_convs=-1"], "model.num_convs"),
    ("num_queries 0", ["train", "sparse_rcnn_mnv2_cpu", "model.num_queries=0"], "model.num_queries"),
    ("key of another architecture", ["train", "defcn_mnv2_cpu", "model.num_queries=50"],
     "model.num_queries belongs to model.arch=sparse_rcnn or adamixer"),
    ("unknown architecture", ["train", "defcn_mnv2_cpu", "model.arch=detr"], "model.arch='detr'"),
    ("topk_candidates 0", ["train", "defcn_mnv2_cpu", "test.topk_candidates=0"], "test.topk_candidates"),
    ("max_detections 0", ["eval", "{run}", "test.max_detections=0"], "test.max_detections"),
    ("score_thresh 1.5", ["train", "defcn_mnv2_cpu", "test.score_thresh=1.5"], "test.score_thresh"),
    ("nms_iou 1", ["train", "defcn_mnv2_cpu", "test.nms_iou=1"], "test.nms_iou"),
    ("negative lr", ["train", "defcn_mnv2_cpu", "lr=-0.01"], "train.lr"),
    ("nan lr", ["train", "defcn_mnv2_cpu", "lr=nan"], "train.lr"),
    ("batch 0", ["train", "defcn_mnv2_cpu", "batch=0"], "train.batch_size"),
    ("workers -1", ["train", "defcn_mnv2_cpu", "workers=-1"], "train.workers"),
    ("momentum 1.5", ["train", "defcn_mnv2_cpu", "train.momentum=1.5"], "train.momentum"),
    ("epochs and iters 0", ["train", "defcn_mnv2_cpu", "epochs=0", "iters=0"], "train.epochs"),
    ("test_min_size 0", ["train", "defcn_mnv2_cpu", "data.test_min_size=0"], "data.test_min_size"),
    ("train_min_sizes 0", ["train", "defcn_mnv2_cpu", "data.train_min_sizes=0,640"], "data.train_min_sizes"),
    ("dropout 1", ["train", "sparse_rcnn_mnv2_cpu", "model.dropout=1"], "model.dropout"),
    ("unknown backbone", ["train", "defcn_mnv2_cpu", "data={data}", "backbone=resnet5", *TINY], "model.backbone"),
    ("coco recipe without data", ["train", "defcn_r50_3x_ms"], "data=PATH"),
    ("missing data folder", ["train", "defcn_mnv2_cpu", "data={tmp}/no/such/folder"], "no/such/folder"),
    # --- devices
    ("device gpu", ["train", "defcn_mnv2_cpu", "device=gpu"], "train.device"),
    ("device tpu", ["train", "defcn_mnv2_cpu", "device=tpu"], "train.device"),
    ("device cuda:x", ["train", "defcn_mnv2_cpu", "device=cuda:x"], "train.device"),
    ("device list", ["train", "defcn_mnv2_cpu", "device=0,1"], "train.device"),
    ("absent cuda device", ["train", "defcn_mnv2_cpu", "data={data}", "device=cuda:99", *TINY], "train.device"),
    ("predict --device gpu", ["predict", "{run}", "{img}", "--device", "gpu"], "--device"),
    ("predict absent gpu index", ["predict", "{run}", "{img}", "--device", "99"], "--device"),
    ("eval absent cuda:99", ["eval", "{run}", "--device", "cuda:99"], "--device"),
    ("eval negative --bootstrap", ["eval", "{run}", "--bootstrap", "-1"], "--bootstrap"),
    # --- weights
    ("missing weights path", ["predict", "{tmp}/no/such/run", "{img}"], "no/such/run"),
    ("corrupt safetensors", ["predict", "{garbage}", "{img}"], "garbage.safetensors"),
    ("truncated safetensors", ["eval", "{truncated}"], "truncated.safetensors"),
    ("weights without config", ["predict", "{plain}", "{img}"], "plain.safetensors"),
    ("weights of another format", ["predict", "{foreign}", "{img}"], "other-v9"),
    ("predict: missing tensor", ["predict", "{missing}", "{img}"], "missing.safetensors: does not match"),
    ("predict: extra tensor", ["predict", "{extra}", "{img}"], "extra.safetensors: does not match"),
    ("predict: mis-shaped tensor", ["predict", "{shape}", "{img}"], "shape.safetensors: does not match"),
    ("eval: missing tensor", ["eval", "{missing}"], "1 missing key"),
    ("export: mis-shaped tensor", ["export", "{shape}", "--size", "64x64", "--out", "{tmp}/s.onnx"],
     "1 shape mismatch"),
    ("predict: NaN weights", ["predict", "{nan}", "{img}", "--out", "{tmp}/pred"], "nan.safetensors: tensor "),
    ("eval: inf weights", ["eval", "{inf}"], "inf.safetensors: tensor "),
    ("resume: another class count", ["train", "defcn_mnv2_cpu", "data={data3}", "--resume", "{run}", *TINY],
     "model.safetensors: does not match"),
    ("resume: another recipe", ["train", "poto_mnv2_cpu", "data={data}", "--resume", "{run}", *TINY],
     "model.safetensors: does not match"),
    ("resume: missing tensor", ["train", "defcn_mnv2_cpu", "data={data}", "--resume", "{run_missing}", *TINY],
     "1 missing key"),
    ("resume: NaN weights", ["train", "defcn_mnv2_cpu", "data={data}", "--resume", "{run_nan}", *TINY],
     "model.safetensors: tensor "),
    ("resume: no such run", ["train", "defcn_mnv2_cpu", "data={data}", "--resume", "{tmp}/no_run", *TINY], "no_run"),
    # --- predict / export options
    ("predict missing image", ["predict", "{run}", "{tmp}/no_such.jpg"], "no_such.jpg"),
    ("predict --score 2", ["predict", "{run}", "{img}", "--score", "2"], "--score"),
    ("export --size 416x", ["export", "{run}", "--size", "416x"], "--size"),  # a square N is accepted
    ("export --size axb", ["export", "{run}", "--size", "axb"], "--size"),
    ("export --size 0x0", ["export", "{run}", "--size", "0x0"], "--size"),
    ("export --size 190x256", ["export", "{run}", "--size", "190x256"], "--size"),
    ("export --size missing", ["export", "{run}", "--size"], "--size"),
    ("export under a file", ["export", "{run}", "--size", "64x64", "--out", "{file}/m.onnx"], "a_file/m.onnx"),
    ("export to a folder", ["export", "{run}", "--size", "64x64", "--out", "{tmp}/outdir"], "outdir"),
    ("export of an NMS recipe", ["export", "{fcos}", "--size", "64x64", "--out", "{tmp}/f.onnx"], "test.nms_iou"),
    ("unknown command", ["bogus"], "bogus"),
    ("unknown option", ["predict", "{run}", "{img}", "--scroe", "0.5"], "--scroe"),
    # --- data files
    ("data check missing json", ["data", "check", "{tmp}/none.json"], "none.json"),
    ("data check invalid json", ["data", "check", "{bad_json}"], "bad.json"),
    ("data convert yolo without --classes", ["data", "convert", "yolo", "{yolo}/images", "{yolo}/labels",
                                             "--out", "{tmp}/y.json"], "--classes"),
    ("train: truncated image in a worker", ["train", "defcn_mnv2_cpu", "data={data_badimg}", "iters=1", *TINY,
                                            "workers=2", "output={tmp}/runs_w"], "ds_badimg/images/"),
    # --- data files: conversion, checks and images
    ("voc nan xmin", ["data", "convert", "voc", "{voc_nan}", "--out", "{tmp}/v.json"], "a.xml"),
    ("voc truncated jpeg", ["data", "convert", "voc", "{voc_trunc}", "--out", "{tmp}/v2.json"], "a.jpg"),
    ("check 0-byte image", ["data", "check", "{check_empty}/ann.json", "--images", "{check_empty}"], "a.png"),
    ("check truncated image", ["data", "check", "{check_trunc}/ann.json", "--images", "{check_trunc}"], "a.png"),
    ("check wrong width", ["data", "check", "{check_size}/ann.json", "--images", "{check_size}"], "a.png"),
    ("yolo mistyped labels folder", ["data", "convert", "yolo", "{yolo}/images", "{yolo}/lables", "--classes",
                                     "{yolo}/names.txt", "--out", "{tmp}/y.json"], "lables"),
    ("predict on a non-image file", ["predict", "{run}", "{notimg}", "--out", "{tmp}/pred2"], "notimg.png"),
]


def _argv(template: list[str], f: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in f.items()}) for a in template]


def _check(rc: int, err: str, out: str, expected: str, code: int = 2) -> None:
    # the training progress bar (tqdm, on stderr) is output, not an error line
    lines = [line for line in err.splitlines() if line and not re.match(r"epoch \d+/\d+: ", line)]
    assert "Traceback" not in err + out, err
    assert rc == code, (rc, err)
    assert len(lines) == 1 and lines[0].strip(), err
    assert lines[0].startswith("e2edet: error: ") and lines[0].endswith("(set E2EDET_DEBUG=1 for a traceback)")
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_one_line_exit_2(argv, expected, f, capsys, monkeypatch):
    monkeypatch.chdir(f["tmp"])  # nothing may be written into the checkout
    monkeypatch.delenv("E2EDET_DEBUG", raising=False)
    rc = main(_argv(argv, f))
    captured = capsys.readouterr()
    _check(rc, captured.err, captured.out, expected)
    print(f"{argv[0]}: {captured.err.strip()}")  # the table of messages, with -s


@pytest.mark.parametrize("device", ["cuda", "0", "cuda:0"])
def test_absent_cuda_is_one_line(device, f, capsys, monkeypatch):
    """``device=cuda`` / ``device=0`` on a machine without CUDA (forced here, so a GPU machine tests it too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.chdir(f["tmp"])
    rc = main(_argv(["train", "defcn_mnv2_cpu", "data={data}", f"device={device}", *TINY], f))
    captured = capsys.readouterr()
    _check(rc, captured.err, captured.out, f"train.device='{device}': CUDA is not available")


def test_export_without_onnxruntime_is_one_line(f, capsys, monkeypatch):
    """``onnx``/``onnxruntime`` not installed (an import failure, forced): exit 2 naming the export extra."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    monkeypatch.chdir(f["tmp"])
    monkeypatch.delenv("E2EDET_DEBUG", raising=False)
    out = f["tmp"] / "no_ort.onnx"
    rc = main(["export", str(f["run"]), "--size", "64x64", "--out", str(out)])
    captured = capsys.readouterr()
    _check(rc, captured.err, captured.out, 'install the export extra: pip install "e2edet[export]"')
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_export_mismatch_is_one_line_exit_1(f, capsys, monkeypatch):
    """onnxruntime's detections differing from PyTorch's (forced) is a failed check, not bad input: exit 1, one
    line naming the ONNX file and the worst difference; no ONNX file is left behind."""
    import e2edet.export as export

    worst = "image 0: reference detection 0 (label 1, score 0.9, box [1.0, 2.0, 3.0, 4.0]) has no match"
    monkeypatch.setattr(export, "compare_detections", lambda ref, got: [worst, "image 0: another difference"])
    monkeypatch.chdir(f["tmp"])
    monkeypatch.delenv("E2EDET_DEBUG", raising=False)
    out = f["tmp"] / "mismatch.onnx"
    rc = main(["export", str(f["run"]), "--size", "64x64", "--out", str(out)])
    captured = capsys.readouterr()
    _check(rc, captured.err, captured.out, f"{out}: onnxruntime differs from PyTorch on a random input; "
                                           f"worst difference: {worst} (+1 more)", code=1)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_real_stderr_is_one_line(f):
    """The same promise in a real process: no warning or traceback reaches stderr either."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("E2EDET_DEBUG", None)
    argv = _argv(["predict", "{missing}", "{img}"], f)
    proc = subprocess.run([sys.executable, "-m", "e2edet", *argv], capture_output=True, text=True, cwd=f["tmp"],
                          env=env, timeout=300)
    _check(proc.returncode, proc.stderr, proc.stdout, "missing.safetensors: does not match")


@pytest.mark.parametrize("spec, available, count, result", [
    ("auto", False, 0, "cpu"), ("auto", True, 2, "cuda:0"), ("cuda", True, 2, "cuda:0"), ("0", True, 2, "cuda:0"),
    ("1", True, 2, "cuda:1"), ("cuda:1", True, 2, "cuda:1"), ("CPU", True, 2, "cpu"),
    ("cuda", False, 0, "--device='cuda': CUDA is not available on this machine"),
    ("1", True, 1, "--device='1': there is no CUDA device 1 on this machine (1 found: cuda:0)"),
    ("cuda:4", True, 2, "there is no CUDA device 4 on this machine (2 found: cuda:0 .. cuda:1)"),
    ("gpu", True, 2, "--device='gpu' is not a device"),
])
def test_select_device(spec, available, count, result, monkeypatch):
    from e2edet.config import ConfigError
    from e2edet.engine.device import DeviceError, select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if result == "cpu" or re.fullmatch(r"cuda:\d", result):
        assert str(select_device(spec, key="--device")) == result
    else:
        with pytest.raises(DeviceError, match=re.escape(result)) as info:
            select_device(spec, key="--device")
        assert isinstance(info.value, ConfigError) and isinstance(info.value, RuntimeError)


def test_debug_env_gives_the_traceback(f, monkeypatch):
    monkeypatch.setenv("E2EDET_DEBUG", "1")
    with pytest.raises(Exception, match="does not match"):
        main(_argv(["predict", "{missing}", "{img}"], f))


@pytest.mark.parametrize("exc, code, line", [
    (KeyboardInterrupt(), 130, "e2edet: interrupted"),
    (type("TrainingInterrupted", (Exception,), {"exit_code": 130})("interrupted at iteration 3/10; resume with "
                                                                  "--resume runs/x"),
     130, "e2edet: interrupted at iteration 3/10; resume with --resume runs/x"),
    (type("CheckFailed", (RuntimeError,), {"exit_code": 1})("m.onnx: outputs differ"), 1,
     "e2edet: error: m.onnx: outputs differ (set E2EDET_DEBUG=1 for a traceback)"),
    (FloatingPointError("non-finite loss at iteration 2 (epoch 0): loss_cls=nan"), 2,
     "e2edet: error: non-finite loss at iteration 2 (epoch 0): loss_cls=nan (set E2EDET_DEBUG=1 for a traceback)"),
    (PermissionError(13, "Permission denied", "/x/y.json"), 2,
     "e2edet: error: [Errno 13] Permission denied: '/x/y.json' (set E2EDET_DEBUG=1 for a traceback)"),
])
def test_interrupts_and_error_types(exc, code, line, monkeypatch, capsys):
    """Ctrl-C anywhere exits 130 with one line; an exception with ``exit_code`` uses it and its own message (an
    error line for codes other than 130)."""
    import e2edet.cli as cli

    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "_cmd_recipes", boom)
    assert main(["recipes"]) == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_runtime_errors_of_model_code_keep_their_traceback(monkeypatch):
    import e2edet.cli as cli

    def boom(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(cli, "_cmd_recipes", boom)
    with pytest.raises(RuntimeError, match="mat1"):
        main(["recipes"])


def test_worker_message_and_one_line():
    wrapped = ("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "/x/worker.py", line 349, in _worker_loop\n    data = fetcher.fetch(index)\n'
               "e2edet.data.errors.DatasetError: /d/img/0.png: image: truncated file\n")
    assert _worker_message(wrapped) == "/d/img/0.png: image: truncated file"
    assert one_line(wrapped) == "/d/img/0.png: image: truncated file"
    assert _worker_message("plain message") == "plain message"
    many = "a.json: 5 problems:\n  image 1: x\n  image 2: y\n  image 3: z\n  image 4: w\n  image 5: v"
    assert one_line(many) == "a.json: 5 problems: image 1: x; image 2: y; image 3: z; ... (2 more)"
    assert one_line("one line") == "one line"
