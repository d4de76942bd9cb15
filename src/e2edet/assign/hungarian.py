"""The one Hungarian (linear sum assignment) solver of the project.

Serves POTO (maximising a quality matrix) and, later, the DETR / Sparse R-CNN matchers (minimising a cost).
The per-image matrices are built on the device in fp32 by the caller; this module copies the whole batch to the
host **once**, solves each matrix with ``scipy.optimize.linear_sum_assignment`` and copies all indices back to the
device once (``specs/dense.md`` §2.3 Hungarian and §2.9 "synchronises GPU and CPU"; DESIGN.md "one Hungarian
implementation").
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def _sanitize(matrix: np.ndarray, maximize: bool) -> np.ndarray:
    """Replace NaN/±inf entries by the worst finite entry of the matrix (its min when maximising, max when
    minimising), or by 0 when no entry is finite. scipy rejects NaN and can fail on infinities."""
    finite = np.isfinite(matrix)
    if finite.all():
        return matrix
    if finite.any():
        worst = matrix[finite].min() if maximize else matrix[finite].max()
    else:
        worst = 0.0
    return np.where(finite, matrix, worst)


@torch.no_grad()
def linear_assignment(matrices: list[Tensor], maximize: bool) -> list[tuple[Tensor, Tensor]]:
    """Solve one rectangular assignment problem per image with a single host round trip.

    Args:
        matrices: per image a ``[G_i, N_i]`` score (``maximize=True``, e.g. POTO quality) or cost
            (``maximize=False``, e.g. DETR matching cost) matrix, rows = GTs, columns = predictions (anchor points
            or queries). Any float dtype; solved in float32 (detached). All on one device.
        maximize: maximise the sum of matched entries instead of minimising it.
    Returns:
        One ``(row_idx, col_idx)`` pair per matrix, ``int64 [M_i]`` each with ``M_i = min(G_i, N_i)``, on the
        matrices' device; rows sorted ascending (scipy's order). A matrix with ``G_i = 0`` or ``N_i = 0`` gives two
        empty tensors.
    Notes:
        Non-finite entries (NaN, +inf, -inf) are replaced by the worst **finite** value of the same matrix (its
        minimum when maximising, maximum when minimising; 0 if the matrix has no finite entry). A replaced entry
        therefore ties with the worst real entry; callers that need a stronger penalty must write a finite
        infeasibility value themselves (-1 for POTO quality, 1e8 for costs).
        Every matched pair is returned, including pairs on infeasible entries; filtering them is the caller's
        choice (see ``e2edet.assign.poto.POTOAssigner``).
    Raises:
        ValueError: if a matrix is not 2-D.
    Source: ``specs/dense.md`` §2.3 ("linear_sum_assignment ... maximize") and "Design notes for one codebase"
    (one Hungarian matcher API); DeFCN ``poto.../fcos.py`` ``FCOS.get_ground_truth``.
    """
    if not matrices:
        return []
    for m in matrices:
        if m.dim() != 2:
            raise ValueError(f"expected 2-D matrices, got shape {tuple(m.shape)}")
    device = matrices[0].device
    shapes = [tuple(m.shape) for m in matrices]
    flat = torch.cat([m.detach().to(device=device, dtype=torch.float32).reshape(-1) for m in matrices])
    host = flat.cpu().numpy()  # the one device -> host copy for the batch

    rows_all, cols_all, counts = [], [], []
    offset = 0
    for g, n in shapes:
        block = host[offset : offset + g * n]
        offset += g * n
        if g == 0 or n == 0:
            counts.append(0)
            continue
        rows, cols = linear_sum_assignment(_sanitize(block.reshape(g, n), maximize), maximize=maximize)
        rows_all.append(rows)
        cols_all.append(cols)
        counts.append(len(rows))

    if rows_all:
        both = np.stack((np.concatenate(rows_all), np.concatenate(cols_all))).astype(np.int64)
    else:
        both = np.zeros((2, 0), dtype=np.int64)
    both_t = torch.from_numpy(both).to(device)  # the one host -> device copy
    rows_t = both_t[0].split(counts)
    cols_t = both_t[1].split(counts)
    return list(zip(rows_t, cols_t))
