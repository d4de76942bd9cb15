"""Tiling of large images: full coverage, shifted last tile, 50 % visibility rule."""

import torch

from e2edet.data.tiles import boxes_in_tile, tile_origins, tile_windows


def test_tile_origins_cover_and_stay_inside():
    assert tile_origins(2299, 400) == [0, 400, 800, 1200, 1600, 1899]
    assert tile_origins(800, 400) == [0, 400]
    assert tile_origins(300, 400) == [0]
    windows = tile_windows(1249, 1035, 400)
    assert len(windows) == 4 * 3 and windows[-1] == (849, 635, 1249, 1035)
    assert all(x1 - x0 == 400 and y1 - y0 == 400 for x0, y0, x1, y1 in windows)
    assert tile_windows(300, 500, 400) == [(0, 0, 300, 400), (0, 100, 300, 500)]


def test_boxes_in_tile_keeps_half_visible_and_clips():
    boxes = torch.tensor([
        [10.0, 10.0, 30.0, 30.0],    # fully inside
        [90.0, 10.0, 110.0, 30.0],   # exactly 50 % inside -> kept, clipped
        [95.0, 10.0, 115.0, 30.0],   # 25 % inside -> dropped
        [200.0, 200.0, 220.0, 220.0],  # outside
    ])
    tile_boxes, index = boxes_in_tile(boxes, (0, 0, 100, 100))
    assert index.tolist() == [0, 1]
    torch.testing.assert_close(tile_boxes, torch.tensor([[10.0, 10.0, 30.0, 30.0], [90.0, 10.0, 100.0, 30.0]]))
    shifted, index = boxes_in_tile(boxes, (100, 0, 200, 100))
    assert index.tolist() == [1, 2]  # box 1 is 50 % in both tiles; box 2 75 % here
    torch.testing.assert_close(shifted, torch.tensor([[0.0, 10.0, 10.0, 30.0], [0.0, 10.0, 15.0, 30.0]]))
