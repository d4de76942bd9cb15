"""Mixed precision of the training step: whether the forward runs under bf16 autocast (``train.amp`` on CUDA,
``train.cpu_amp`` on the CPU), the cast of its outputs back to float32 for the loss, and the search for a
non-finite output or gradient that names the culprit when a step fails."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["autocast_enabled", "clip_finite_gradients", "cpu_has_bf16", "first_non_finite", "to_float32"]


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX tiles), so that CPU bf16 autocast
    (``train.cpu_amp``) can be faster than float32. Asks torch's CPU capability probes; ``False`` when this torch
    build has none."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


def autocast_enabled(cfg: Any, device: torch.device) -> bool:
    """Whether the training forward on ``device`` runs under bf16 autocast: ``cfg.amp`` on CUDA, ``cfg.cpu_amp``
    (default False) on the CPU, never elsewhere. Warns when CPU autocast is asked for on a CPU without native bf16
    (:func:`cpu_has_bf16`), where it is likely slower than float32."""
    if device.type == "cuda":
        return bool(getattr(cfg, "amp", False))
    if device.type != "cpu" or not getattr(cfg, "cpu_amp", False):
        return False
    if not cpu_has_bf16():
        warnings.warn("train.cpu_amp: this CPU has neither AVX512-BF16 nor AMX; bf16 autocast will likely be "
                      "slower than float32", stacklevel=3)
    return True


def to_float32(value: Any) -> Any:
    """Cast half/bfloat16 tensors (nested in dicts/lists/tuples) to float32 so losses run in full precision."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, Mapping):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_float32(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_float32(v) for v in value)
    return value


def first_non_finite(value: Any, prefix: str = "") -> str | None:
    """Dotted key of the first floating tensor in a (nested) model-output structure holding NaN/inf, or None."""
    if isinstance(value, torch.Tensor):
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        return None if finite else (prefix or "output")
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return None
    for key, item in items:
        found = first_non_finite(item, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def clip_finite_gradients(model: torch.nn.Module, clip: float) -> tuple[float, str | None]:
    """Total L2 norm of ``model``'s gradients, scaled to norm ``clip`` when above it (``clip`` > 0) and finite.

    The norm is taken first (``torch.nn.utils.get_total_norm``) so that a NaN/inf gradient is found, and named,
    before ``clip_grads_with_norm_`` scales anything.

    Returns:
        ``(norm, None)``, or ``(norm, name)`` with the name of the first parameter whose gradient holds NaN/inf
        when the norm is not finite (nothing is scaled then). ``(0.0, None)`` when no parameter has a gradient.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0, None
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = float(total)
    if not math.isfinite(norm):
        name = next((n for n, p in model.named_parameters()
                     if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "?")
        return norm, name
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, total)
    return norm, None
