"""Anchor points, ltrb box coding and centerness target (spec dense.md 1.8.1, 1.8.5, 1.8.6)."""

import torch

from e2edet.ops.boxes import centerness_target, decode_ltrb, encode_ltrb
from e2edet.models.dense.points import anchor_points

STRIDES = [8, 16, 32, 64, 128]


def _sizes(h, w):
    sizes = []
    for s in STRIDES:
        sizes.append((-(-h // s), -(-w // s)))
    return sizes


def test_first_point_of_stride8_level_is_cell_centre():
    points, strides, levels, counts = anchor_points([(2, 3)], [8])
    assert points[0].tolist() == [4.0, 4.0]
    # row-major: y outer, x inner
    assert points[:3].tolist() == [[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]]
    assert points[3].tolist() == [4.0, 12.0]
    assert strides.tolist() == [8.0] * 6 and levels.tolist() == [0] * 6 and counts == [6]


def test_800x1344_gives_22400_points_in_level_order():
    sizes = _sizes(800, 1344)
    assert sizes == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    points, strides, levels, counts = anchor_points(sizes, STRIDES)
    assert points.shape == (22400, 2) and sum(counts) == 22400
    assert counts == [16800, 4200, 1050, 273, 77]
    assert torch.all(levels[1:] >= levels[:-1])
    assert strides.dtype == torch.float32 and levels.dtype == torch.int64
    start = 0
    for lvl, (n, s) in enumerate(zip(counts, STRIDES)):
        assert torch.all(levels[start : start + n] == lvl)
        assert torch.all(strides[start : start + n] == s)
        assert points[start].tolist() == [s / 2, s / 2]
        start += n


def test_offset_zero_and_dtype_device():
    points, *_ = anchor_points([(1, 2)], [16], offset=0.0, dtype=torch.float64, device="cpu")
    assert points.dtype == torch.float64 and points.tolist() == [[0.0, 0.0], [16.0, 0.0]]


def test_encode_decode_round_trip_for_any_point():
    g = torch.Generator().manual_seed(0)
    xy1 = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([xy1, xy1 + torch.rand(50, 2, generator=g) * 80 + 1], dim=1)
    points = torch.rand(50, 2, generator=g) * 300 - 50  # inside and outside the boxes
    ltrb = encode_ltrb(points, boxes)
    torch.testing.assert_close(decode_ltrb(points, ltrb), boxes)
    # broadcasting: R points x G boxes
    ltrb_rg = encode_ltrb(points[:, None], boxes[None])
    assert ltrb_rg.shape == (50, 50, 4)
    torch.testing.assert_close(decode_ltrb(points[:, None], ltrb_rg), boxes[None].expand(50, 50, 4))


def test_encode_values():
    ltrb = encode_ltrb(torch.tensor([[12.0, 20.0]]), torch.tensor([[10.0, 15.0, 30.0, 40.0]]))
    assert ltrb.tolist() == [[2.0, 5.0, 18.0, 20.0]]


def test_centerness_target_one_at_centre_zero_on_edge():
    box = torch.tensor([10.0, 20.0, 50.0, 40.0])
    pts = torch.tensor([[30.0, 30.0], [10.0, 30.0], [30.0, 40.0], [20.0, 25.0], [5.0, 30.0]])
    ctr = centerness_target(encode_ltrb(pts, box))
    assert torch.allclose(ctr[0], torch.tensor(1.0))
    assert ctr[1] == 0 and ctr[2] == 0
    # (l, t, r, b) = (10, 5, 30, 15): sqrt(10/30 * 5/15)
    assert torch.allclose(ctr[3], torch.tensor((1 / 3 * 1 / 3) ** 0.5))
    assert ctr[4] == 0  # outside the box -> 0, not NaN
    assert centerness_target(torch.zeros(4)) == 0
