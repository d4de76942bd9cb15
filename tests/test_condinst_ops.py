"""CondInst pieces of O2F's instance-segmentation variant against the official code and hand-computed cases: the
169-parameter split, the dynamic convolution (loop reference), relative coordinates, ``aligned_bilinear``, dice loss,
the mask-centroid prior and the semantic targets.

``tests/fixtures/condinst_official.json`` was produced by running functions copied verbatim from ``strongwolf/o2f``
``condinst_head.py`` (``aligned_bilinear``, ``dice_coefficient``, ``E2ECondInstHead.parse_dynamic_params``,
``get_mask_head_inputs``, ``forward_mask_decode``, ``_get_points_single`` with mmdet 2.x's ``AnchorFreeHead``
base, the center-sampling block of ``_get_target_single`` and the ``sem_loss_on`` block of ``loss``; attributes as
the ``condinst_r50`` config sets them: 8 bases, 8 dynamic channels, 3 layers, strides 8-128, mask out stride 4) in a
scratch script outside the project (they need only torch), on inputs drawn from ``torch.Generator().manual_seed(2023)``
in float64: a ``[8, 5, 6]`` mask feature, 3 instances at P3/P4/P5 points with ``randn(3, 169) * 0.5`` parameters, a
``[2, 3, 3, 4]`` map upsampled x2 and x4, ``[4, 1, 6, 5]`` sigmoid predictions against random binary targets (one
all-zero), three hand-drawn masks (an L shape, a random blob, a 4x4 square) on a 40x48 image with points of strides
8 and 16, and overlapping masks of two classes on two 32x32 images. Masks are stored as rows of '0'/'1'.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from e2edet.assign.prior import center_prior, mask_centroids
from e2edet.losses.masks import dice_loss, semantic_targets
from e2edet.ops.dynamic_mask import (
    aligned_bilinear,
    dynamic_mask_logits,
    dynamic_param_counts,
    num_dynamic_params,
    parse_dynamic_params,
    relative_coordinates,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "condinst_official.json").read_text())


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def _bits(rows):
    """Rows of '0'/'1' strings (nested) -> int64 tensor."""
    if isinstance(rows[0], str):
        return torch.tensor([[int(c) for c in row] for row in rows])
    return torch.stack([_bits(r) for r in rows])


def test_parameter_split_169_per_instance_as_official():
    assert dynamic_param_counts() == (FIXTURE["weight_nums"], FIXTURE["bias_nums"]) == ([80, 64, 8], [8, 8, 1])
    assert num_dynamic_params() == FIXTURE["num_gen_params"] == 169
    case = FIXTURE["mask_head"]
    params = _t(case["params"])
    weights, biases = parse_dynamic_params(params)
    assert [tuple(w.shape) for w in weights] == [(3, 8, 10), (3, 8, 8), (3, 1, 8)]
    assert [tuple(b.shape) for b in biases] == [(3, 8), (3, 8), (3, 1)]
    # the official grouped-conv kernels [N * out, in, 1, 1] hold the same numbers in the same order
    assert case["weight_shapes"] == [[24, 10, 1, 1], [24, 8, 1, 1], [3, 8, 1, 1]]
    for ours, official in zip(weights, case["weights"]):
        torch.testing.assert_close(ours.reshape(-1), _t(official).reshape(-1), rtol=0, atol=0)
    for ours, official in zip(biases, case["biases"]):
        torch.testing.assert_close(ours.reshape(-1), _t(official).reshape(-1), rtol=0, atol=0)
    # hand check of the layout: weights of all layers first, then the biases
    assert torch.equal(weights[0][1, 2, 3], params[1, 2 * 10 + 3]) and torch.equal(biases[2][2, 0], params[2, 168])
    assert torch.equal(biases[0][0, 0], params[0, 152])
    with pytest.raises(ValueError, match="169"):
        parse_dynamic_params(params[:, :168])


def test_relative_coordinates_and_mask_logits_equal_official():
    case = FIXTURE["mask_head"]
    feat, points, strides, params = (_t(case[k]) for k in ("mask_feat", "points", "strides", "params"))
    rel = relative_coordinates(points, strides, 5, 6, feat_stride=8)
    torch.testing.assert_close(rel.double(), _t(case["rel_coords"]), rtol=0, atol=1e-6)
    logits = dynamic_mask_logits(feat, params, points, strides, feat_stride=8, out_stride=4)
    assert logits.shape == (3, 1, 10, 12) and logits.dtype == torch.float64
    torch.testing.assert_close(logits, _t(case["logits"]), rtol=1e-6, atol=1e-6)


def test_dynamic_convolution_against_a_per_instance_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 7, 9, generator=g)
    n = 5
    params = torch.randn(n, 169, generator=g) * 0.3
    points = torch.tensor([[4.0, 4.0], [20.0, 12.0], [36.0, 52.0], [16.0, 16.0], [48.0, 32.0]])
    strides = torch.tensor([8.0, 8.0, 16.0, 32.0, 64.0])
    got = dynamic_mask_logits(feats, params, points, strides, feat_stride=8, out_stride=8)  # no upsampling
    ys, xs = torch.meshgrid(torch.arange(7) * 8.0 + 4, torch.arange(9) * 8.0 + 4, indexing="ij")
    for i in range(n):
        rel = torch.stack([(points[i, 0] - xs), (points[i, 1] - ys)]) / (strides[i] * 8)
        x = torch.cat([rel, feats])[None]  # [1, 10, 7, 9]
        p = params[i]
        w0, w1, w2 = p[:80].reshape(8, 10, 1, 1), p[80:144].reshape(8, 8, 1, 1), p[144:152].reshape(1, 8, 1, 1)
        b0, b1, b2 = p[152:160], p[160:168], p[168:169]
        x = F.relu(F.conv2d(x, w0, b0))
        x = F.relu(F.conv2d(x, w1, b1))
        x = F.conv2d(x, w2, b2)
        torch.testing.assert_close(got[i : i + 1], x, rtol=1e-5, atol=1e-5)
    assert dynamic_mask_logits(feats, params[:0], points[:0], strides[:0], 8).shape == (0, 1, 14, 18)


def test_aligned_bilinear_equals_official():
    case = FIXTURE["aligned_bilinear"]
    x = _t(case["input"])
    torch.testing.assert_close(aligned_bilinear(x, 2), _t(case["x2"]), rtol=0, atol=1e-12)
    torch.testing.assert_close(aligned_bilinear(x, 4), _t(case["x4"]), rtol=0, atol=1e-12)
    assert aligned_bilinear(x, 1) is x
    # a constant map stays constant; the x2 map keeps the source pixel at the top-left of each 2x2 cell
    torch.testing.assert_close(aligned_bilinear(torch.full((1, 1, 3, 3), 2.5), 2), torch.full((1, 1, 6, 6), 2.5))
    assert torch.equal(aligned_bilinear(x, 2)[..., 1::2, 1::2], x)


def test_dice_loss_hand_computed_and_official():
    pred = torch.tensor([[[0.5, 1.0], [0.0, 0.25]], [[0.2, 0.2], [0.2, 0.2]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # instance 0: 2 * (0.5 + 1) / (0.25 + 1 + 0.0625 + 2 + 1e-5); instance 1: no overlap -> 1
    expected = torch.tensor([1 - 3.0 / (3.3125 + 1e-5), 1.0])
    torch.testing.assert_close(dice_loss(pred, target), expected)
    assert float(dice_loss(target[:1], target[:1])) == pytest.approx(1e-5 / 4, abs=1e-7)  # perfect mask
    case = FIXTURE["dice"]
    official_target = _bits(case["target"]).double().unsqueeze(1)
    torch.testing.assert_close(dice_loss(_t(case["pred"]), official_target).double(), _t(case["dice"]),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        dice_loss(pred, target[:1])


def test_mask_centroids_hand_computed():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True  # rectangle: columns 2..5, rows 1..2 -> (3.5, 1.5)
    masks[1, 0, 0] = masks[1, 0, 7] = masks[1, 5, 7] = True  # three corners -> (14/3, 5/3)
    boxes = torch.tensor([[2.0, 1.0, 6.0, 3.0], [0.0, 0.0, 8.0, 6.0], [1.0, 1.0, 3.0, 5.0]])
    # mask 2 is empty: its box center (2, 3) (the official code would give (0, 0))
    torch.testing.assert_close(mask_centroids(masks, boxes), torch.tensor([[3.5, 1.5], [14 / 3, 5 / 3], [2.0, 3.0]]))


def test_mask_centroid_prior_equals_official():
    case = FIXTURE["center_prior"]
    masks, boxes = _bits(case["masks"]).bool(), _t(case["boxes"], torch.float32)
    centers = mask_centroids(masks, boxes)
    torch.testing.assert_close(centers[:, 0].double(), _t(case["centers_x"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(centers[:, 1].double(), _t(case["centers_y"]), rtol=0, atol=1e-5)
    points, strides = _t(case["points"], torch.float32), _t(case["strides"], torch.float32)
    prior = center_prior(points, strides, boxes, 1.5, centers=centers)
    assert torch.equal(prior, _bits(case["inside"]).bool())
    # pixel indices, no half-pixel offset (official): the 4x4 square's centroid is its box center minus 0.5
    torch.testing.assert_close(centers[2], (boxes[2, :2] + boxes[2, 2:]) / 2 - 0.5)


def test_semantic_targets_equal_official():
    case = FIXTURE["semantic"]
    for masks, labels, expected in zip(case["masks"], case["labels"], case["targets"]):
        got = semantic_targets(_bits(masks).to(torch.uint8), torch.tensor(labels), num_classes=2, stride=8)
        assert got.tolist() == expected
    assert semantic_targets(torch.zeros(0, 16, 16), torch.zeros(0, dtype=torch.int64), 3, 8).tolist() == [[3, 3]] * 2
