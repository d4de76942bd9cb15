"""Shared fixtures: the real BCCD dataset beside the project, and a deterministic CPU setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bccd_root() -> Path | None:
    for candidate in (os.environ.get("E2EDET_BCCD"), ROOT.parent / "shared" / "data" / "bccd"):
        if candidate and (Path(candidate) / "Annotations").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    """The BCCD VOC dataset at ../shared/data/bccd (or $E2EDET_BCCD); skips when absent."""
    root = _bccd_root()
    if root is None:
        pytest.skip("BCCD not found at ../shared/data/bccd (set E2EDET_BCCD to its folder)")
    return root


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch, tmp_path_factory):
    """Seed torch, and keep every cache (sample data, converted datasets) inside a per-session temp folder."""
    torch.manual_seed(0)
    if "E2EDET_CACHE" not in os.environ:
        monkeypatch.setenv("E2EDET_CACHE", str(tmp_path_factory.getbasetemp() / "e2edet-cache"))
