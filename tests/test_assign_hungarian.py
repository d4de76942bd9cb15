"""The shared Hungarian solver: batching, empty matrices, non-finite entries, single host copy."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from e2edet.assign.hungarian import linear_assignment


@pytest.mark.parametrize("maximize", [True, False])
def test_batch_equals_per_matrix_scipy(maximize):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 7), (5, 5), (1, 9), (4, 2), (6, 11)]
    mats = [torch.rand(g, n, generator=gen) for g, n in shapes]
    results = linear_assignment(mats, maximize=maximize)
    assert len(results) == len(mats)
    for m, (rows, cols) in zip(mats, results):
        ref_r, ref_c = linear_sum_assignment(m.numpy(), maximize=maximize)
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert rows.tolist() == ref_r.tolist() and cols.tolist() == ref_c.tolist()
        assert rows.numel() == min(m.shape)
        assert torch.all(rows[1:] > rows[:-1])  # sorted, distinct
        assert len(set(cols.tolist())) == cols.numel()


def test_empty_matrices_give_empty_results():
    mats = [torch.zeros(0, 5), torch.rand(2, 3), torch.zeros(3, 0), torch.zeros(0, 0)]
    results = linear_assignment(mats, maximize=True)
    for i in (0, 2, 3):
        rows, cols = results[i]
        assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64
    assert results[1][0].numel() == 2
    assert linear_assignment([], maximize=False) == []
    only_empty = linear_assignment([torch.zeros(0, 4)], maximize=False)
    assert only_empty[0][0].shape == (0,)


@pytest.mark.parametrize("maximize", [True, False])
def test_non_finite_entries_become_the_worst_finite_value(maximize):
    m = torch.tensor([[0.9, float("nan"), 0.1], [float("inf"), 0.5, float("-inf")]])
    rows, cols = linear_assignment([m], maximize=maximize)[0]
    finite = m[torch.isfinite(m)]
    worst = finite.min() if maximize else finite.max()
    clean = torch.where(torch.isfinite(m), m, worst).numpy()
    ref_r, ref_c = linear_sum_assignment(clean, maximize=maximize)
    assert rows.tolist() == ref_r.tolist() and cols.tolist() == ref_c.tolist()
    # A NaN or infinite entry is never preferred over a real one.
    picked = m[rows, cols]
    assert torch.isfinite(picked).all()


def test_all_nan_matrix_does_not_raise():
    rows, cols = linear_assignment([torch.full((2, 3), float("nan"))], maximize=True)[0]
    assert rows.numel() == 2 and len(set(cols.tolist())) == 2


def test_accepts_half_precision_and_non_contiguous():
    m = torch.rand(7, 4).t()  # [4, 7], non-contiguous
    rows, cols = linear_assignment([m.half()], maximize=True)[0]
    ref_r, ref_c = linear_sum_assignment(m.half().float().numpy(), maximize=True)
    assert rows.tolist() == ref_r.tolist() and cols.tolist() == ref_c.tolist()


def test_one_host_copy_for_the_batch(monkeypatch):
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    linear_assignment([torch.rand(3, 8), torch.rand(2, 8), torch.rand(0, 8)], maximize=True)
    assert calls == [(3 * 8 + 2 * 8,)]


def test_rejects_non_2d():
    with pytest.raises(ValueError):
        linear_assignment([torch.rand(3)], maximize=True)


def test_optimum_matches_brute_force_on_small_cases():
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(30):
        g, n = int(rng.integers(1, 4)), int(rng.integers(3, 8))
        m = rng.random((g, n)).astype(np.float32)
        m[rng.random((g, n)) < 0.3] = -1.0
        rows, cols = linear_assignment([torch.from_numpy(m)], maximize=True)[0]
        best = max(sum(m[i, p[i]] for i in range(g)) for p in itertools.permutations(range(n), g))
        assert m[rows.numpy(), cols.numpy()].sum() == pytest.approx(best, abs=1e-5)
