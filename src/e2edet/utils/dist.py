"""Distributed helpers that work the same with and without ``torch.distributed`` (torchrun / DDP)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a default process group is initialised (e.g. under ``torchrun``)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    """Rank of this process in the default group, 0 when not distributed."""
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    """True on rank 0 (the process that writes files and prints)."""
    return get_rank() == 0


def reduce_mean(value: torch.Tensor | float, device: torch.device | None = None) -> torch.Tensor:
    """All-reduce ``value`` across processes and divide by the world size.

    This is the per-GPU average that the DeFCN/cvpods and MMDetection criteria use as loss normaliser
    (e.g. the number of positives), see ``specs/dense.md`` §1.4 and §1.9.

    Args:
        value: a scalar tensor or Python number.
        device: device for a Python-number input (default CPU).
    Returns:
        A float32 scalar tensor (detached), the mean over processes; ``value`` itself when not distributed.
    """
    t = torch.as_tensor(value, dtype=torch.float32, device=device).detach().clone()
    if is_dist():
        dist.all_reduce(t)
        t /= get_world_size()
    return t


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process (``obj`` itself when not distributed); it must be picklable."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
