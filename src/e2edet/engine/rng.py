"""Random-number-generator state: seeding, capture/restore for checkpoints, and isolation of side work.

Resumable training is bitwise repeatable on CPU because the checkpoint stores the Python, NumPy and torch
(CPU and CUDA) generator states of the iteration it is written at, because data augmentation draws from per-sample
seeds instead (:class:`e2edet.data.loader.SeededSamples`), and because work that is not training (evaluation,
plotting) runs inside :func:`preserve_rng_state` so it never advances the training stream.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and all CUDA devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of every global generator, made only of tensors, lists and numbers.

    The NumPy key array is stored as a list of ints so ``torch.load(..., weights_only=True)`` can read it back.
    Returns:
        ``{"python": tuple, "numpy": [name, keys(list[int]), pos, has_gauss, cached_gaussian],
        "torch": ByteTensor, "cuda": list[ByteTensor]}`` (``cuda`` is empty without CUDA).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from :func:`capture_rng_state` output.

    CUDA states are restored only when the number of visible devices matches (otherwise they are left as is).
    Raises:
        ValueError: ``state`` lacks one of the ``python``/``numpy``/``torch`` entries.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"RNG state is missing entries {missing}")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])


@contextlib.contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Context manager: whatever runs inside leaves all global generators exactly as they were before."""
    saved = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(saved)
