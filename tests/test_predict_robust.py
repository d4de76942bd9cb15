"""Predictor.predict_files: unreadable images are skipped with a warning, odd image modes are drawn in 8-bit RGB."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from e2edet.data.errors import DatasetError
from e2edet.inference import Predictor


class FixedPredictor(Predictor):
    """A Predictor without a model: one box [1, 1, 5, 4] of class 0 with score 0.9 on every image."""

    def __init__(self):
        self.class_names = ["cell"]
        self.skipped = []

    def __call__(self, images, batch_size=4):
        for image in images:
            assert image.dtype == torch.uint8 and image.shape[0] == 3
        return [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 4.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([0])} for _ in images]


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    cut = tmp_path / "cut.jpg"
    Image.fromarray(pixels).save(cut, quality=90)
    cut.write_bytes(cut.read_bytes()[:300])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    return good, empty, cut, text


def test_unreadable_images_are_skipped_with_a_warning(files, tmp_path, capsys):
    good, empty, cut, text = files
    predictor = FixedPredictor()
    out = predictor.predict_files([empty, good, cut, text, tmp_path / "gone.png"], tmp_path / "out", score_thresh=0.5)
    records = json.loads(out.read_text())
    assert [r["file"] for r in records] == [str(good)]
    assert records[0]["detections"][0]["box_xyxy"] == [1.0, 1.0, 5.0, 4.0]
    assert (tmp_path / "out" / "good.png").is_file()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4
    assert err[0] == f"e2edet: warning: {empty}: skipped: file is empty (0 bytes)"
    # the project's wording; the PIL reason quoted after it differs between Pillow versions
    assert err[1].startswith(f"e2edet: warning: {cut}: skipped: truncated or corrupt image")
    assert err[2] == (f"e2edet: warning: {text}: skipped: not an image file PIL can read (unknown format or corrupt "
                      "header)")
    assert err[3] == f"e2edet: warning: {tmp_path / 'gone.png'}: skipped: file not found"
    assert [p.name for p, _ in predictor.skipped] == ["empty.jpg", "cut.jpg", "notes.png", "gone.png"]


def test_all_images_unreadable_is_a_dataset_error(files, tmp_path, capsys):
    _, empty, cut, _ = files
    with pytest.raises(DatasetError, match=r"empty\.jpg: image: file is empty \(0 bytes\); all 2 images are "):
        FixedPredictor().predict_files([empty, cut], tmp_path / "out")
    assert not (tmp_path / "out" / "detections.json").exists()
    assert capsys.readouterr().err == ""  # only the error: no warning lines before it
    with pytest.raises(DatasetError, match=r"cut\.jpg: image: .*; the image is unreadable, no detections written"):
        FixedPredictor().predict_files([cut], tmp_path / "out")


@pytest.mark.parametrize("mode", ["I;16", "I", "L", "LA", "P", "RGBA", "CMYK", "1"])
def test_any_image_mode_is_read_and_drawn(tmp_path, mode):
    ramp = np.arange(8 * 6, dtype=np.uint16).reshape(6, 8) * 1300  # up to 61100: 16-bit range
    if mode == "I;16":
        image = Image.fromarray(ramp)
    elif mode == "I":
        image = Image.fromarray(ramp.astype(np.int32))
    else:
        image = Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB").convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I", "CMYK") else "x.png")
    image.save(path)
    out = FixedPredictor().predict_files([path], tmp_path / "out", score_thresh=0.0)
    record = json.loads(out.read_text())[0]
    assert (record["width"], record["height"]) == (8, 6)
    with Image.open(record["picture"]) as drawn:
        assert drawn.mode == "RGB" and drawn.size == (8, 6)
    # above the 0.9 score nothing is drawn (a filled caption would cover this 8 x 6 image): the picture is the image
    out = FixedPredictor().predict_files([path], tmp_path / "plain", score_thresh=0.95)
    with Image.open(json.loads(out.read_text())[0]["picture"]) as drawn:
        pixels = np.asarray(drawn)
    if mode in ("I;16", "I"):  # scaled by 1/257, not clipped at 255: the far corner is bright, not saturated
        assert abs(int(pixels[5, 7, 0]) - round(61100 / 257)) <= 1 and int(pixels[5, 6, 0]) < int(pixels[5, 7, 0])
