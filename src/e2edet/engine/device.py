"""Device selection and process-group start-up under ``torchrun`` (one process per GPU, or CPU workers)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from e2edet.utils.dist import is_dist


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK`` set by torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def select_device(spec: str = "auto", rank: int | None = None) -> torch.device:
    """Resolve a device string: ``"auto"`` (CUDA if available, else CPU), ``"cuda"``, ``"cuda:N"``, ``"cpu"``.

    Args:
        spec: the device setting.
        rank: GPU index used for ``"auto"``/``"cuda"`` (default: :func:`local_rank`, the process's GPU).
    Raises:
        RuntimeError: CUDA was requested but is not available.
    """
    spec = str(spec).lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available; use device=cpu or auto")
    return torch.device(f"cuda:{local_rank() if rank is None else rank}" if spec == "cuda" else spec)


def init_distributed(spec: str = "auto") -> tuple[torch.device, bool]:
    """Select the device and, when launched by torchrun with ``WORLD_SIZE > 1``, start the process group.

    Uses NCCL on CUDA and Gloo on CPU, and pins the process to ``cuda:<LOCAL_RANK>``. Call it before building
    data loaders with a distributed sampler; calling it again is harmless.

    Args:
        spec: device setting, see :func:`select_device`.
    Returns:
        ``(device, created)``: ``created`` is True when this call initialised the process group.
    Raises:
        RuntimeError: CUDA requested but unavailable.
    """
    device = select_device(spec)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_dist():
        return device, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True
