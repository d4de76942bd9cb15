"""3D max filtering (spec dense.md 2.2, properties 2.8.9-13)."""

import pytest
import torch
import torch.nn.functional as F

from e2edet.models.dense.max_filter import MaxFiltering3D

SIZES = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]


def _pyramid(channels=4, batch=2, seed=0, sizes=SIZES, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g, dtype=dtype) for h, w in sizes]


def _identity_conv(module):
    """Make the shared 3x3 conv the identity so that f_l = x_l."""
    with torch.no_grad():
        module.conv.weight.zero_()
        module.conv.bias.zero_()
        for c in range(module.conv.weight.shape[0]):
            module.conv.weight[c, c, 1, 1] = 1.0
    return module


def _naive_bilinear(src, h, w):
    """Loop bilinear resize with align_corners=False: source coordinate (dst + 0.5)·in/out - 0.5, clamped at 0."""
    b, c, h_in, w_in = src.shape
    out = torch.empty(b, c, h, w, dtype=src.dtype)
    for y in range(h):
        sy = max((y + 0.5) * h_in / h - 0.5, 0.0)
        y0 = int(sy)
        y1, ly = min(y0 + 1, h_in - 1), sy - y0
        for x in range(w):
            sx = max((x + 0.5) * w_in / w - 0.5, 0.0)
            x0 = int(sx)
            x1, lx = min(x0 + 1, w_in - 1), sx - x0
            out[:, :, y, x] = (1 - ly) * ((1 - lx) * src[:, :, y0, x0] + lx * src[:, :, y0, x1]) + ly * (
                (1 - lx) * src[:, :, y1, x0] + lx * src[:, :, y1, x1]
            )
    return out


def _naive_max_maps(f, tau=2, k=3):
    """Explicit loops over levels, channels and positions; neighbour levels resized bilinearly to the level's grid."""
    margin, r = tau // 2, k // 2
    out = []
    for level in range(len(f)):
        b, c, h, w = f[level].shape
        neighbours = [
            _naive_bilinear(f[n], h, w) if n != level else f[n] for n in range(len(f)) if abs(n - level) <= margin
        ]
        m = torch.empty_like(f[level])
        for bi in range(b):
            for ci in range(c):
                for y in range(h):
                    for x in range(w):
                        best = -float("inf")
                        for g in neighbours:
                            for yy in range(max(0, y - r), min(h, y + r + 1)):
                                for xx in range(max(0, x - r), min(w, x + r + 1)):
                                    best = max(best, float(g[bi, ci, yy, xx]))
                        m[bi, ci, y, x] = best
        out.append(m)
    return out


def test_output_shapes_and_differentiable():
    torch.manual_seed(0)
    module = MaxFiltering3D(4, use_gn=True)
    xs = [x.requires_grad_() for x in _pyramid()]
    ys = module(xs)
    assert [y.shape for y in ys] == [x.shape for x in xs]
    sum(y.sum() for y in ys).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_gradcheck_double():
    torch.manual_seed(0)
    module = MaxFiltering3D(2, use_gn=False).double()
    pyramid = _pyramid(channels=2, batch=1, sizes=[(4, 4), (2, 2), (1, 1)], dtype=torch.float64)
    xs = tuple(x.requires_grad_() for x in pyramid)
    assert torch.autograd.gradcheck(lambda *a: tuple(module(list(a))), xs)


def test_max_map_dominates_and_equals_at_local_maximum():
    torch.manual_seed(0)
    module = MaxFiltering3D(4)
    xs = _pyramid()
    f = [module.conv(x) for x in xs]
    for m, fl in zip(module.max_maps(xs), f):
        assert torch.all(m >= fl)
    # single spike on P5 (level 2): it is a local maximum there, so M equals f at that position
    module = _identity_conv(MaxFiltering3D(4))
    xs = [torch.zeros(1, 4, h, w) for h, w in SIZES]
    xs[2][0, :, 1, 0] = 5.0
    maps = module.max_maps(xs)
    assert torch.all(maps[2][0, :, 1, 0] == 5.0)
    assert torch.all(maps[2] >= xs[2])


def test_constant_input_gives_identity_max():
    module = _identity_conv(MaxFiltering3D(3))
    xs = [torch.full((2, 3, h, w), 0.7) for h, w in SIZES]
    for m, x in zip(module.max_maps(xs), xs):
        torch.testing.assert_close(m, x)


def test_tau_zero_is_per_level_2d_maxpool():
    torch.manual_seed(0)
    module = MaxFiltering3D(4, tau=0)
    xs = _pyramid()
    for m, x in zip(module.max_maps(xs), xs):
        torch.testing.assert_close(m, F.max_pool2d(module.conv(x), 3, stride=1, padding=1))


def test_level_neighbourhood_p3_and_p7():
    torch.manual_seed(0)
    module = MaxFiltering3D(4)
    xs = _pyramid()
    base = module.max_maps(xs)
    changed = list(xs)
    changed[2] = xs[2] + 100.0  # P5
    after = module.max_maps(changed)
    torch.testing.assert_close(after[0], base[0])  # P3 sees only P3, P4
    torch.testing.assert_close(after[4], base[4])  # P7 sees only P6, P7
    for lvl in (1, 2, 3):
        assert not torch.allclose(after[lvl], base[lvl])


@pytest.mark.parametrize("tau", [0, 2])
def test_matches_naive_loops(tau):
    torch.manual_seed(0)
    module = MaxFiltering3D(2, tau=tau)
    xs = _pyramid(channels=2, batch=1, sizes=[(6, 6), (3, 3), (2, 2), (1, 1), (1, 1)])
    with torch.no_grad():
        f = [module.conv(x) for x in xs]
        for m, ref in zip(module.max_maps(xs), _naive_max_maps(f, tau=tau)):
            torch.testing.assert_close(m, ref)


def test_residual_gn_and_without_gn():
    torch.manual_seed(0)
    xs = _pyramid(channels=64)
    with_gn = MaxFiltering3D(64, use_gn=True)
    with torch.no_grad():
        with_gn.norm.weight.uniform_(0.5, 1.5)
        with_gn.norm.bias.uniform_(-0.5, 0.5)
        for y, m, x in zip(with_gn(xs), with_gn.max_maps(xs), xs):
            ref = F.relu(F.group_norm(m + x, 32, with_gn.norm.weight, with_gn.norm.bias, with_gn.norm.eps))
            torch.testing.assert_close(y, ref)
    assert with_gn.norm.num_groups == 32
    without = MaxFiltering3D(64, use_gn=False)
    with torch.no_grad():
        for y, m, x in zip(without(xs), without.max_maps(xs), xs):
            torch.testing.assert_close(y, F.relu(m + x))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        MaxFiltering3D(4, kernel_size=2)
    with pytest.raises(ValueError):
        MaxFiltering3D(4, tau=-1)

