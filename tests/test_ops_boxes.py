"""e2edet.ops.boxes: the functions not covered by the model tests, checked against torch/torchvision, and the rule
that the ops layer imports nothing from e2edet."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_convert

from e2edet.ops.boxes import (as_image_sizes, image_whwh, inverse_sigmoid, normalized_cxcywh_to_xyxy, rescale_boxes,
                              xyxy_to_xyzr, xyzr_to_xyxy)

OPS = Path(__file__).resolve().parents[1] / "src" / "e2edet" / "ops"


def test_ops_import_nothing_from_e2edet():
    for file in OPS.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "e2edet" for n in names), f"{file.name} imports {names}"


def test_inverse_sigmoid_inverts_sigmoid_and_stays_finite_at_the_ends():
    x = torch.linspace(1e-4, 1 - 1e-4, 101, dtype=torch.float64)
    assert torch.allclose(inverse_sigmoid(x), torch.logit(x), atol=1e-9)
    assert torch.allclose(torch.sigmoid(inverse_sigmoid(x)), x, atol=1e-12)
    ends = inverse_sigmoid(torch.tensor([-0.5, 0.0, 1.0, 1.5], dtype=torch.float64))
    expected = torch.log(torch.tensor(1e-5, dtype=torch.float64))  # log(eps / 1)
    assert torch.allclose(ends, torch.stack([expected, expected, -expected, -expected]))


def test_normalized_cxcywh_to_xyxy_matches_torchvision_times_the_image_size():
    boxes = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[480.0, 640.0], [100.0, 50.0]])  # (h, w)
    out = normalized_cxcywh_to_xyxy(boxes, sizes)
    for b, (h, w) in enumerate(sizes.tolist()):
        assert torch.allclose(out[b], box_convert(boxes, "cxcywh", "xyxy") * torch.tensor([w, h, w, h]))


def test_xyzr_round_trip():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 8.0, 2.0]])
    assert torch.allclose(xyzr_to_xyxy(xyxy_to_xyzr(boxes)), boxes, atol=1e-5)


def test_image_whwh_and_rescale_boxes():
    targets = [{"size": torch.tensor([480, 640])}, {"size": [20, 10]}]
    assert image_whwh(targets, torch.device("cpu")).tolist() == [[640, 480, 640, 480], [10, 20, 10, 20]]
    with pytest.raises(ValueError, match=r"targets\[0\] has no 'size'"):
        image_whwh([{}], torch.device("cpu"))
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert rescale_boxes(boxes, (100, 200), (50, 400)).tolist() == [[20.0, 10.0, 60.0, 20.0]]


def test_as_image_sizes_accepts_the_usual_forms():
    expected = torch.tensor([[4.0, 6.0], [8.0, 2.0]], dtype=torch.float64)
    for form in ([[4, 6], [8, 2]], torch.tensor([[4, 6], [8, 2]]), [torch.tensor([4, 6]), torch.tensor([8, 2])]):
        assert torch.equal(as_image_sizes(form, 2, "sizes"), expected)
    with pytest.raises(ValueError, match="orig_sizes has 1 rows for a batch of 2"):
        as_image_sizes([[4, 6]], 2, "orig_sizes")
