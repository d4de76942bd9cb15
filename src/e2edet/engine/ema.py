"""Model EMA: an exponential moving average of the weights, as YOLOX and Ultralytics keep it (``ModelEMA``).

After each optimizer step the averaged copy moves towards the trained weights::

    d = decay * (1 - exp(-updates / tau))        # updates = 1, 2, ... counts the steps so far
    ema = d * ema + (1 - d) * model

over the floating-point parameters *and* buffers (BatchNorm running statistics); integer buffers
(``num_batches_tracked``) are copied. The warm-up ``tau`` keeps ``d`` small at first, so the average is not dragged
towards the random initialisation (``d`` is 0.39 x decay after ``tau / 2`` steps, 0.63 x decay after ``tau``). The
first update copies the weights (``d = 0``).

This is :class:`torch.optim.swa_utils.AveragedModel` (``use_buffers=True``) with the multi-tensor update
:func:`ema_multi_avg_fn`; its ``n_averaged`` buffer counts the updates. The averaged module (``ema.module``) is kept in
eval mode without gradients; the trainer evaluates and saves it (see :class:`e2edet.engine.trainer.Trainer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from e2edet.engine.checkpoint import unwrap_model

__all__ = ["build_ema", "ema_decay", "ema_multi_avg_fn"]


def ema_decay(updates: int, decay: float = 0.9998, tau: float = 2000.0) -> float:
    """The EMA decay of the ``updates``-th update (1-based): ``decay * (1 - exp(-updates / tau))``.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)`` or ``tau`` <= 0.
    """
    _check(decay, tau)
    return decay * (1.0 - math.exp(-updates / tau))


def _check(decay: float, tau: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    if not tau > 0:
        raise ValueError(f"EMA warm-up tau must be > 0 (updates), got {tau}")


def ema_multi_avg_fn(decay: float = 0.9998, tau: float = 2000.0) -> Callable[[list, list, torch.Tensor | int], None]:
    """A ``multi_avg_fn`` for :class:`~torch.optim.swa_utils.AveragedModel`: the warm-up EMA of the module docstring.

    ``AveragedModel`` calls it once per (device, dtype) group with the averaged tensors, the model's tensors and the
    number of updates before this one (``n_averaged``, >= 1: the first update is a copy), so this is update
    ``n_averaged + 1``. Floating-point groups are updated in place with one ``torch._foreach_lerp_`` whose weight
``1 - d`` (:func:`ema_decay`) is computed on the device, without a host sync; others are copied.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)`` or ``tau`` <= 0.
    """
    _check(decay, tau)

    @torch.no_grad()
    def update(ema_tensors: list[torch.Tensor], model_tensors: list[torch.Tensor],
               num_averaged: torch.Tensor | int) -> None:
        if ema_tensors[0].is_floating_point():
            # 1 - d on the device: reading num_averaged (a device tensor) to the host would sync every step
            updates = torch.as_tensor(num_averaged, device=ema_tensors[0].device).to(torch.float32) + 1
            weight = 1.0 - decay * (1.0 - torch.exp(-updates / tau))
            torch._foreach_lerp_(ema_tensors, model_tensors, weight.to(ema_tensors[0].dtype))
        else:
            torch._foreach_copy_(ema_tensors, model_tensors)

    return update


def build_ema(model: nn.Module, decay: float = 0.9998, tau: float = 2000.0) -> AveragedModel:
    """An EMA copy of ``model`` (DDP/DataParallel wrappers removed) on the model's device.

    Call ``ema.update_parameters(model)`` with the unwrapped model after every optimizer step; ``ema.module`` is the
    averaged detector (eval mode, ``requires_grad`` off), ``ema.n_averaged`` (``int64`` scalar tensor) the number of
    updates so far.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)`` or ``tau`` <= 0.
    """
    ema = AveragedModel(unwrap_model(model), multi_avg_fn=ema_multi_avg_fn(decay, tau), use_buffers=True)
    ema.module.eval().requires_grad_(False)
    return ema
