"""Multi-scale deformable attention: the grid_sample core (``e2edet.ops.ms_deform_attn``) and the module
(``e2edet.models.detr.ms_deform_attn``) against spec ``detr.md`` 1.8 properties 1-9 (9 adapted: there is no CUDA
kernel, so the core is checked against an independent loop reference and with ``gradcheck``), autocast, ONNX export."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import e2edet.models.detr.ms_deform_attn as module_mod
from e2edet.models.detr.ms_deform_attn import MSDeformAttn, sampling_locations
from e2edet.ops.ms_deform_attn import as_spatial_shapes, ms_deform_attn_core

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------- references
def _bilinear(value_l: list, h: int, w: int, x: float, y: float, channels: int) -> list[float]:
    """Bilinear sample of one (H, W, D) map (nested lists) at normalised (x, y), zero outside: pixel (i, j) has its
    centre at ((j + 0.5) / W, (i + 0.5) / H)."""
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = [0.0] * channels
    for yy, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
            if 0 <= yy < h and 0 <= xx < w:
                for d in range(channels):
                    out[d] += wy * wx * value_l[yy][xx][d]
    return out


def loop_reference(value, shapes, locations, weights) -> torch.Tensor:
    """Slow float64 loop over (n, q, m, l, p): explicit bilinear interpolation with zero padding, weighted sum."""
    n_, s_, m_, d_ = value.shape
    _, lq_, _, l_, p_, _ = locations.shape
    v, loc, a = value.double().tolist(), locations.double().tolist(), weights.double().tolist()
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n_, lq_, m_, d_, dtype=F64)
    for n in range(n_):
        maps = [[[[v[n][starts[lv] + i * w + j][m] for j in range(w)] for i in range(h)]
                 for lv, (h, w) in enumerate(shapes)] for m in range(m_)]
        for q in range(lq_):
            for m in range(m_):
                acc = [0.0] * d_
                for lv, (h, w) in enumerate(shapes):
                    for p in range(p_):
                        x, y = loc[n][q][m][lv][p]
                        sample = _bilinear(maps[m][lv], h, w, x, y, d_)
                        acc = [c + a[n][q][m][lv][p] * s for c, s in zip(acc, sample)]
                out[n, q, m] = torch.tensor(acc, dtype=F64)
    return out.flatten(2)


def _random_inputs(shapes, n=2, lq=3, m=2, d=3, p=2, dtype=F64, lo=-0.1, hi=1.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    locs = lo + (hi - lo) * torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype)
    weights = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, locs, weights


def _pixel_centres(h, w, dtype=F64):
    ii, jj = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack([(jj.flatten() + 0.5) / w, (ii.flatten() + 0.5) / h], -1)  # (H·W, 2) row-major


def _identity(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.in_features, dtype=linear.weight.dtype))
        linear.bias.zero_()


def _capture_core(monkeypatch) -> dict:
    """Record the arguments the module passes to the sampling core."""
    seen = {}

    def spy(value, shapes, locations, weights):
        seen.update(value=value, shapes=shapes, locations=locations, weights=weights)
        return ms_deform_attn_core(value, shapes, locations, weights)

    monkeypatch.setattr(module_mod, "ms_deform_attn_core", spy)
    return seen


# ---------------------------------------------------------------------------------------------------- property 1
@pytest.mark.parametrize("h,w,exact", [(4, 8, True), (5, 7, False)])
def test_pixel_centre_lookup_returns_the_stored_value(h, w, exact):
    """1: one level, one point, weight 1 at ((j + 0.5) / W, (i + 0.5) / H) reads value[:, i·W + j, m, :] for every head.
    Bit-exact when W and H are powers of 2 (the location arithmetic is exact); otherwise within float64 rounding."""
    n, m, d = 2, 3, 4
    value = torch.randn(n, h * w, m, d, dtype=F64)
    locs = _pixel_centres(h, w)[None, :, None, None, None, :].expand(n, h * w, m, 1, 1, 2)
    out = ms_deform_attn_core(value, [(h, w)], locs, torch.ones(n, h * w, m, 1, 1, dtype=F64))
    if exact:
        assert torch.equal(out, value.flatten(2))
    else:
        torch.testing.assert_close(out, value.flatten(2), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- property 2
@pytest.mark.parametrize("levels", [1, 2])
def test_zero_offsets_sample_bilinearly_at_the_reference(levels):
    """2: offsets weight and bias 0, one point: output = output_proj(mean_l bilinear(value_proj(x)_l, ref_l)), the
    bilinear sample written by hand (loop reference) at non-integer positions."""
    shapes = [(5, 7), (3, 4)][:levels]
    n, lq, c, heads = 2, 4, 8, 2
    attn = MSDeformAttn(d_model=c, n_levels=levels, n_heads=heads, n_points=1).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        for layer in (attn.value_proj, attn.output_proj):
            layer.bias.normal_()
    s = sum(h * w for h, w in shapes)
    x, query = torch.randn(n, s, c, dtype=F64), torch.randn(n, lq, c, dtype=F64)
    ref = 0.05 + 0.9 * torch.rand(n, lq, levels, 2, dtype=F64)
    out = attn(query, ref, x, shapes)

    value = attn.value_proj(x).view(n, s, heads, c // heads)
    locs = ref[:, :, None, :, None, :].expand(n, lq, heads, levels, 1, 2)
    uniform = torch.full((n, lq, heads, levels, 1), 1.0 / levels, dtype=F64)
    expected = attn.output_proj(loop_reference(value.detach(), shapes, locs, uniform))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- property 3
def test_constant_map_gives_a_convex_combination():
    """3: if every in-bounds sample returns the same vector v, the output (before output_proj) is v, for any weights
    that sum to 1 (core) and any attention logits (module)."""
    shapes = [(6, 5), (3, 4)]
    n, lq, m, d, p = 2, 3, 2, 4, 3
    v = torch.randn(n, 1, m, d, dtype=F64)
    value = v.expand(n, sum(h * w for h, w in shapes), m, d)
    unit = torch.rand(n, lq, m, len(shapes), p, 2, dtype=F64)
    lo = torch.tensor([[0.5 / w, 0.5 / h] for h, w in shapes], dtype=F64)[:, None, :]  # (L, 1, 2)
    locs = lo + (1 - 2 * lo) * unit  # inside each level's pixel-centre box: no zero padding involved
    weights = torch.softmax(torch.randn(n, lq, m, len(shapes) * p, dtype=F64) * 3, -1).view(n, lq, m, len(shapes), p)
    torch.testing.assert_close(ms_deform_attn_core(value, shapes, locs, weights), v.expand(n, lq, m, d).flatten(2),
                               rtol=1e-12, atol=1e-12)

    # The module: constant values through value_proj (weight 0, bias v), random attention logits, identity output_proj.
    shapes, c, heads = [(32, 32), (16, 16)], 8, 2
    attn = MSDeformAttn(d_model=c, n_levels=2, n_heads=heads, n_points=4).double()
    vec = torch.randn(c, dtype=F64)
    with torch.no_grad():
        attn.value_proj.weight.zero_()
        attn.value_proj.bias.copy_(vec)
        attn.attention_weights.weight.normal_()
        attn.attention_weights.bias.normal_()
    _identity(attn.output_proj)
    s = sum(h * w for h, w in shapes)
    # Init offsets reach 4 level pixels; a reference near the middle keeps every point in the 16x16 level's
    # pixel-centre box.
    ref = 0.5 + 0.05 * (torch.rand(n, lq, 2, 2, dtype=F64) - 0.5)
    out = attn(torch.randn(n, lq, c, dtype=F64), ref, torch.randn(n, s, c, dtype=F64), shapes)
    torch.testing.assert_close(out, vec.expand(n, lq, c), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- property 4
def test_zero_padding_outside_the_map():
    """4: locations fully outside (x or y beyond half a pixel past the border) give 0; half-outside ones give the
    border value times the inside fraction."""
    h, w, m, d = 3, 5, 2, 3
    value = torch.randn(1, h * w, m, d, dtype=F64)
    grid = value.view(h, w, m, d)
    row = 1
    yc = (row + 0.5) / h
    points = [  # (x, y, expected (m, d))
        (-0.6 / w, yc, torch.zeros(m, d, dtype=F64)),
        (1 + 0.6 / w, yc, torch.zeros(m, d, dtype=F64)),
        (-2.0, yc, torch.zeros(m, d, dtype=F64)),
        (0.5, -0.6 / h, torch.zeros(m, d, dtype=F64)),
        (0.5, 1 + 0.6 / h, torch.zeros(m, d, dtype=F64)),
        (0.0, yc, 0.5 * grid[row, 0]),  # on the left border: half a pixel outside
        (1.0, yc, 0.5 * grid[row, w - 1]),
        (-0.3 / w, yc, 0.2 * grid[row, 0]),  # pixel coordinate -0.8: 0.2 of the first column
        ((2 + 0.5) / w, 0.0, 0.5 * grid[0, 2]),
        ((2 + 0.5) / w, 1.0, 0.5 * grid[h - 1, 2]),
        (0.0, 0.0, 0.25 * grid[0, 0]),  # corner: a quarter inside
    ]
    locs = torch.tensor([[x, y] for x, y, _ in points], dtype=F64)
    locs = locs[None, :, None, None, None, :].expand(1, len(points), m, 1, 1, 2)
    out = ms_deform_attn_core(value, [(h, w)], locs, torch.ones(1, len(points), m, 1, 1, dtype=F64))
    expected = torch.stack([e.flatten() for _, _, e in points])[None]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- property 5
def test_offset_normaliser_is_width_then_height():
    """5: on a non-square level (H 4, W 8) a unit x-offset moves the sample one pixel (1/W) in x and a unit y-offset
    one pixel (1/H) in y: issue #6 (normalising by (H, W)) would move x by two pixels."""
    h, w = 4, 8
    attn = MSDeformAttn(d_model=2, n_levels=1, n_heads=1, n_points=1).double()
    _identity(attn.value_proj)
    _identity(attn.output_proj)
    ii, jj = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    x = torch.stack([jj.flatten(), ii.flatten()], -1)[None]  # value = (column, row): bilinear returns pixel coords
    i0, j0 = 1, 3
    ref = torch.tensor([(j0 + 0.5) / w, (i0 + 0.5) / h], dtype=F64).view(1, 1, 1, 2)
    for bias, expected in (((0.0, 0.0), (j0, i0)), ((1.0, 0.0), (j0 + 1, i0)), ((0.0, 1.0), (j0, i0 + 1)),
                           ((-2.0, 1.0), (j0 - 2, i0 + 1))):
        with torch.no_grad():
            attn.sampling_offsets.bias.copy_(torch.tensor(bias, dtype=F64))
        out = attn(torch.randn(1, 1, 2, dtype=F64), ref, x, [(h, w)])
        torch.testing.assert_close(out.flatten(), torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)

    offsets = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64).view(1, 1, 1, 1, 2, 2)
    locs = sampling_locations(ref, offsets, [(h, w)]) - ref.view(1, 1, 1, 1, 1, 2)
    torch.testing.assert_close(locs.flatten(), torch.tensor([1 / w, 0, 0, 1 / h], dtype=F64), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------- property 6
def test_box_reference_scales_offsets_by_half_the_box_over_points(monkeypatch):
    """6: with a 4-d reference (cx, cy, w, h): loc = (cx, cy) + Δ·(w, h)/(2P), for the offsets the module computes."""
    seen = _capture_core(monkeypatch)
    shapes, n, lq, c, heads, points = [(6, 5), (3, 3)], 2, 3, 8, 2, 3
    attn = MSDeformAttn(d_model=c, n_levels=2, n_heads=heads, n_points=points).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_()
    query = torch.randn(n, lq, c, dtype=F64)
    boxes = torch.cat([torch.rand(n, lq, 2, 2, dtype=F64), 0.1 + 0.5 * torch.rand(n, lq, 2, 2, dtype=F64)], -1)
    attn(query, boxes, torch.randn(n, 30 + 9, c, dtype=F64), shapes)
    delta = attn.sampling_offsets(query).view(n, lq, heads, 2, points, 2)
    for q in range(lq):
        for mm in range(heads):
            for lv in range(2):
                for k in range(points):
                    cx, cy, bw, bh = boxes[0, q, lv]
                    dx, dy = delta[0, q, mm, lv, k]
                    expected = torch.stack([cx + dx * bw / (2 * points), cy + dy * bh / (2 * points)])
                    torch.testing.assert_close(seen["locations"][0, q, mm, lv, k], expected, rtol=1e-12, atol=1e-12)
    assert seen["shapes"] == shapes


# ---------------------------------------------------------------------------------------------------- property 7
def test_official_init_pattern_and_uniform_attention(monkeypatch):
    """7: M 8, L 4, P 4: bias[m, l, k] = (k + 1)·dir_m with the spec's directions for every level; attention weights
    uniform 1/16 after init; offset weight 0; Xavier projections with bias 0; official parameter names."""
    attn = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    assert list(attn.state_dict()) == [f"{name}.{kind}" for name in
                                       ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
                                       for kind in ("weight", "bias")]
    directions = torch.tensor([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)],
                              dtype=torch.float32)
    expected = directions[:, None, None, :] * torch.arange(1, 5, dtype=torch.float32)[None, None, :, None]
    bias = attn.sampling_offsets.bias.detach().view(8, 4, 4, 2)
    # float32 like the official init: cos(7π/4) / |sin(7π/4)| = 0.99999934, not 1.
    torch.testing.assert_close(bias, expected.expand(8, 4, 4, 2), rtol=1e-6, atol=1e-6)
    assert bias.shape == (8, 4, 4, 2) and attn.sampling_offsets.weight.abs().max() == 0
    assert attn.attention_weights.weight.abs().max() == 0 and attn.attention_weights.bias.abs().max() == 0
    for layer in (attn.value_proj, attn.output_proj):
        assert layer.bias.abs().max() == 0
        bound = math.sqrt(6 / (256 + 256))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound

    seen = _capture_core(monkeypatch)
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    attn(torch.randn(2, 5, 256), torch.rand(2, 5, 4, 2), torch.randn(2, 85, 256), shapes)
    assert seen["weights"].shape == (2, 5, 8, 4, 4)
    torch.testing.assert_close(seen["weights"], torch.full_like(seen["weights"], 1 / 16), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- property 8
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_padding_mask_hides_padded_values(ref_dim):
    """8: values at masked positions (True = padding) are zeroed: setting the input there to 1e6 changes nothing."""
    shapes, n, lq, c = [(6, 5), (3, 3)], 2, 4, 16
    s = sum(h * w for h, w in shapes)
    attn = MSDeformAttn(d_model=c, n_levels=2, n_heads=4, n_points=2)
    query, x = torch.randn(n, lq, c), torch.randn(n, s, c)
    ref = torch.rand(n, lq, 2, ref_dim)
    mask = torch.rand(n, s) < 0.4
    poisoned = x.masked_fill(mask[..., None], 1e6)
    out = attn(query, ref, x, shapes, mask)
    assert torch.equal(attn(query, ref, poisoned, shapes, mask), out)
    assert not torch.allclose(attn(query, ref, poisoned, shapes), out)  # without the mask the values are used


# ------------------------------------------------------------------------------------------- property 9 (adapted)
def test_core_matches_the_loop_reference():
    """9 (no CUDA kernel here): the core against the independent loop reference, including out-of-map points; float64
    with allclose's default tolerances, float32 within rtol 1e-5."""
    shapes = [(6, 4), (3, 2), (2, 5)]
    value, locs, weights = _random_inputs(shapes, n=2, lq=3, m=2, d=3, p=2)
    expected = loop_reference(value, shapes, locs, weights)
    assert torch.allclose(ms_deform_attn_core(value, shapes, locs, weights), expected)
    out32 = ms_deform_attn_core(value.float(), shapes, locs.float(), weights.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, rtol=1e-5, atol=1e-6)
    # The official (L, 2) int64 tensor form of the shapes gives the same numbers.
    assert torch.equal(ms_deform_attn_core(value, torch.tensor(shapes), locs, weights),
                       ms_deform_attn_core(value, shapes, locs, weights))


@pytest.mark.parametrize("channels", [2, 30, 32, 64, 71])
def test_core_gradcheck(channels):
    """9 (``models/ops/test.py``): gradcheck in float64 for value, locations and weights; level shapes (6, 4) and
    (3, 2), N 1, M 2, Lq 2, L 2, P 2, D = channels. The full Jacobian for D = 2 and 30, gradcheck's fast mode (random
    projections of the Jacobian) for the larger channel counts, to keep the test fast."""
    shapes = [(6, 4), (3, 2)]
    g = torch.Generator().manual_seed(channels)
    value = (torch.rand(1, 30, 2, channels, generator=g, dtype=F64) * 0.01).requires_grad_()
    locs = torch.rand(1, 2, 2, 2, 2, 2, generator=g, dtype=F64).requires_grad_()
    weights = torch.rand(1, 2, 2, 2, 2, generator=g, dtype=F64) + 1e-5
    weights = (weights / weights.sum((-1, -2), keepdim=True)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, lo, a: ms_deform_attn_core(v, shapes, lo, a), (value, locs, weights),
                                    eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=channels > 30)


# ---------------------------------------------------------------------------------------------------- autocast
def test_core_runs_in_float32_under_autocast(monkeypatch):
    """bf16 inputs under CPU autocast: grid_sample runs with autocast off on float32 inputs, and the bf16 result is
    the float32 computation on the bf16-rounded inputs, rounded to bf16 (spec 1.9: no half-precision kernel)."""
    shapes = [(6, 4), (3, 2)]
    value, locs, weights = (t.float() for t in _random_inputs(shapes, n=2, lq=5, m=2, d=8, p=3))
    v16, l16, w16 = value.bfloat16(), locs.bfloat16(), weights.bfloat16()
    dtypes = []
    grid_sample = torch.nn.functional.grid_sample

    def spy(inp, grid, *args, **kwargs):
        dtypes.append((inp.dtype, grid.dtype, torch.is_autocast_enabled("cpu")))
        return grid_sample(inp, grid, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn_core(v16, shapes, l16, w16)
    assert dtypes == [(torch.float32, torch.float32, False)] * 2
    assert out.dtype == torch.bfloat16
    reference = ms_deform_attn_core(v16.float(), shapes, l16.float(), w16.float())
    assert torch.equal(out, reference.bfloat16())

    # The module under autocast: bf16 projections around a float32 core, close to the float32 module.
    dtypes.clear()
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    query, x, ref = torch.randn(2, 5, 16), torch.randn(2, 30, 16), torch.rand(2, 5, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, ref, x, shapes)
    assert dtypes == [(torch.float32, torch.float32, False)] * 2 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attn(query, ref, x, shapes), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------------- ONNX
class _Core(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.shapes = shapes

    def forward(self, value, locs, weights):
        return ms_deform_attn_core(value, self.shapes, locs, weights)


class _Attn(nn.Module):
    def __init__(self, attn, shapes):
        super().__init__()
        self.attn, self.shapes = attn, shapes

    def forward(self, query, ref, x, mask):
        return self.attn(query, ref, x, self.shapes, mask)


def _export_and_run(model, inputs, names, tmp_path, batch_inputs):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, inputs, str(path), input_names=names, output_names=["out"], opset_version=17,
                          dynamo=False, dynamic_axes={name: {0: "batch"} for name in [*names, "out"]})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for feed in (inputs, batch_inputs):  # the export batch and another batch size
        got = session.run(None, {name: t.numpy() for name, t in zip(names, feed)})[0]
        with torch.no_grad():
            expected = model(*feed)
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


def test_onnx_export_matches_onnxruntime(tmp_path):
    """The core (grid_sample, opset 17) and the module with a padding mask export with static level sizes and a
    dynamic batch, and onnxruntime agrees with PyTorch."""
    shapes = [(6, 4), (3, 2)]
    value, locs, weights = (t.float() for t in _random_inputs(shapes, n=2, lq=5, m=2, d=4, p=3))
    other = tuple(t.float() for t in _random_inputs(shapes, n=3, lq=5, m=2, d=4, p=3, seed=1))
    _export_and_run(_Core(shapes).eval(), (value, locs, weights), ["value", "locs", "weights"], tmp_path / "c", other)

    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3).eval()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(std=0.1)
        attn.attention_weights.weight.normal_(std=0.1)

    def inputs(n):
        return torch.randn(n, 5, 16), torch.rand(n, 5, 2, 4), torch.randn(n, 30, 16), torch.rand(n, 30) < 0.3

    _export_and_run(_Attn(attn, shapes).eval(), inputs(2), ["query", "ref", "x", "mask"], tmp_path / "m", inputs(3))


# ---------------------------------------------------------------------------------------------------- errors
def test_errors_are_clear():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MSDeformAttn(d_model=30, n_heads=8)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    query, x = torch.randn(1, 3, 16), torch.randn(1, 20, 16)
    with pytest.raises(ValueError, match=r"must end in 2 \(x, y\) or 4|must be \(N, Lq, L, 2\) or \(N, Lq, L, 4\)"):
        attn(query, torch.rand(1, 3, 2, 3), x, shapes)
    with pytest.raises(ValueError, match=r"S = 21 positions but spatial_shapes .* sum\(H\*W\) = 20"):
        attn(query, torch.rand(1, 3, 2, 2), torch.randn(1, 21, 16), shapes)
    with pytest.raises(ValueError, match="n_levels=2 but got 1"):
        attn(query, torch.rand(1, 3, 2, 2), torch.randn(1, 16, 16), [(4, 4)])
    with pytest.raises(ValueError, match=r"input_padding_mask must be \(N, S\)"):
        attn(query, torch.rand(1, 3, 2, 2), x, shapes, torch.zeros(1, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be 4 or 2|must end in 2"):
        sampling_locations(torch.rand(1, 3, 2, 3), torch.zeros(1, 3, 2, 2, 2, 2), shapes)
    value, locs, weights = _random_inputs(shapes)
    with pytest.raises(ValueError, match=r"S = 20 positions but spatial_shapes \[\(4, 4\), \(2, 3\)\]"):
        ms_deform_attn_core(value, [(4, 4), (2, 3)], locs, weights)
    with pytest.raises(ValueError, match="attention_weights must be"):
        ms_deform_attn_core(value, shapes, locs, weights[..., :1])
    with pytest.raises(ValueError, match="does not fit"):
        ms_deform_attn_core(value, shapes[:1] + [(1, 4)], locs[:, :, :, :1], weights[:, :, :, :1])
    with pytest.raises(ValueError, match="integer"):
        as_spatial_shapes(torch.tensor([[4.0, 4.0]]))
    with pytest.raises(ValueError, match="positive"):
        as_spatial_shapes([(0, 4)])
    assert as_spatial_shapes(torch.tensor([[4, 5], [2, 3]])) == [(4, 5), (2, 3)]
