"""Device selection and process-group start-up under ``torchrun`` (one process per GPU, or CPU workers)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from e2edet.config_checks import ConfigError, parse_device
from e2edet.utils.dist import is_dist


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK`` set by torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


class DeviceError(ConfigError, RuntimeError):
    """A device setting names a device this machine does not have (no CUDA, index out of range, no MPS), or is
    not a device at all. A :class:`~e2edet.config.ConfigError` (the command line exits with status 2 and one
    line) and, as before, a ``RuntimeError``."""


def select_device(spec: str = "auto", rank: int | None = None, key: str = "device") -> torch.device:
    """Resolve a device setting and check that the device exists.

    Accepted forms (see :func:`e2edet.config.parse_device`): ``"auto"`` (CUDA if available, else CPU), ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``, ``"N"`` (= ``"cuda:N"``, as in Ultralytics) and ``"mps"``.

    Args:
        spec: the device setting.
        rank: GPU index used for ``"auto"``/``"cuda"`` (default: :func:`local_rank`, the process's GPU).
        key: name of the setting in messages (``train.device``, ``--device``).
    Raises:
        DeviceError: a malformed setting, or CUDA/MPS requested but unavailable, or a GPU index this machine
            does not have; the one-line message names ``key``.
    """
    try:
        kind, index = parse_device(spec, key)
    except ConfigError as err:
        raise DeviceError(str(err)) from None
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"{key}={spec!r}: Apple MPS is not available on this machine; use cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"{key}={spec!r}: CUDA is not available on this machine; use cpu or auto")
    count = torch.cuda.device_count()
    if index is None:
        index = local_rank() if rank is None else rank
    if index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
        raise DeviceError(f"{key}={spec!r}: there is no CUDA device {index} on this machine ({count} found: {have})")
    return torch.device("cuda", index)


def init_distributed(spec: str = "auto") -> tuple[torch.device, bool]:
    """Select the device and, when launched by torchrun with ``WORLD_SIZE > 1``, start the process group.

    Uses NCCL on CUDA and Gloo on CPU, and pins the process to ``cuda:<LOCAL_RANK>``. Call it before building
    data loaders with a distributed sampler; calling it again is harmless.

    Args:
        spec: device setting, see :func:`select_device`.
    Returns:
        ``(device, created)``: ``created`` is True when this call initialised the process group.
    Raises:
        DeviceError: a malformed setting or an absent device (names ``train.device``).
    """
    device = select_device(spec, key="train.device")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_dist():
        return device, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True

