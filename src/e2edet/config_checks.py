"""Value checks of the configuration that types alone cannot express: the :class:`ConfigError` type, the numeric
ranges of every key (:data:`RANGES`, :func:`check_ranges`) and the syntax of device settings (:func:`parse_device`).

Used by :func:`e2edet.config.validate`; imports nothing from e2edet, so the config module and the engine can both
build on it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["ConfigError", "DEVICE_FORMS", "RANGES", "check_ranges", "parse_device"]


class ConfigError(ValueError):
    """A configuration key or value is invalid (unknown key, wrong type, bad choice)."""


#: Numeric ranges checked by :func:`check_ranges` (called by :func:`e2edet.config.validate`): dotted key ->
#: (low, high, low inclusive, high inclusive); ``None`` is unbounded. Tuple fields (``data.train_min_sizes``, ``train.steps``) are checked item by item. Every float
#: must also be finite (no ``nan``/``inf``).
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "data.train_min_sizes": (1, None, True, True),
    "data.train_max_size": (1, None, True, True),
    "data.test_min_size": (1, None, True, True),
    "data.test_max_size": (1, None, True, True),
    "data.flip_prob": (0, 1, True, True),
    "model.freeze_at": (0, 5, True, True),
    "model.fpn_channels": (1, None, True, True),
    "model.num_convs": (0, None, True, True),
    "model.ctr_convs": (0, None, True, True),
    "model.ctr_channels": (1, None, True, True),
    "model.num_queries": (1, None, True, True),
    "model.num_stages": (1, None, True, True),
    "model.num_heads": (1, None, True, True),
    "model.dim_feedforward": (1, None, True, True),
    "model.dynamic_dim": (1, None, True, True),
    "model.num_groups": (1, None, True, True),
    "model.in_points": (1, None, True, True),
    "model.out_points": (1, None, True, True),
    "model.dropout": (0, 1, True, False),
    "model.num_classes": (0, None, True, True),
    "loss.focal_alpha": (None, 1, True, True),  # alpha < 0 disables the alpha term
    "loss.focal_gamma": (0, None, True, True),
    "loss.reg_weight": (0, None, True, True),
    "loss.poto_alpha": (0, 1, True, True),
    "loss.center_radius": (0, None, False, True),
    "loss.aux_topk": (1, None, True, True),
    "loss.aux_weight": (0, None, True, True),
    "loss.o2f_topk": (1, None, True, True),
    "loss.soft_weight": (0, None, True, True),
    "loss.max_soft_weight": (0, None, True, True),
    "loss.max_t": (0, 1, True, True),
    "loss.min_t": (0, 1, True, True),
    "loss.o2f_neg_weight": (0, None, True, True),
    "loss.cls_weight": (0, None, True, True),
    "loss.l1_weight": (0, None, True, True),
    "loss.giou_weight": (0, None, True, True),
    "loss.min_scale_ratio": (0, None, True, True),
    "loss.mm_weight": (0, None, True, True),
    "loss.mcm_weight": (0, None, True, True),
    "loss.prob_weight": (0, None, True, True),
    "test.score_thresh": (0, 1, True, False),
    "test.topk_candidates": (1, None, True, True),
    "test.max_detections": (1, None, True, True),
    "test.nms_iou": (0, 1, True, False),
    "test.eval_nms_iou": (0, 1, False, True),
    "train.epochs": (0, None, True, True),
    "train.max_iters": (0, None, True, True),
    "train.batch_size": (1, None, True, True),
    "train.workers": (0, None, True, True),
    "train.lr": (0, None, False, True),
    "train.momentum": (0, 1, True, False),
    "train.weight_decay": (0, None, True, True),
    "train.weight_decay_norm": (0, None, True, True),
    "train.steps": (0, 1, False, False),
    "train.gamma": (0, None, False, True),
    "train.warmup_iters": (0, None, True, True),
    "train.warmup_factor": (0, 1, False, True),
    "train.clip_grad_norm": (0, None, True, True),
    "train.seed": (0, None, True, True),
    "train.log_period": (1, None, True, True),
    "train.eval_period": (0, None, True, True),
    "train.checkpoint_period": (0, None, True, True),
    "train.checkpoint_every": (0, None, True, True),
}


def _range_text(low: float | None, high: float | None, low_inc: bool, high_inc: bool) -> str:
    """``> 0``, ``>= 1``, ``in [0, 1)``... for an error message."""
    if high is None:
        return f"{'>=' if low_inc else '>'} {low:g}"
    if low is None:
        return f"{'<=' if high_inc else '<'} {high:g}"
    return f"in {'[' if low_inc else '('}{low:g}, {high:g}{']' if high_inc else ')'}"


def check_ranges(cfg: Any, source: str) -> None:
    """Raise :class:`ConfigError` for the first non-finite float, or value outside :data:`RANGES`, of the sections
    ``data``, ``model``, ``loss``, ``test``, ``train`` of ``cfg`` (an :class:`e2edet.config.Config`).
    ``source`` (a file or "command line") starts the message."""
    for section in ("data", "model", "loss", "test", "train"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            key, value = f"{section}.{f.name}", getattr(obj, f.name)
            items = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ConfigError(f"{source}: {key} must be a finite number, got {value}")
            if key not in RANGES or not all(isinstance(v, (int, float)) for v in items):
                continue
            low, high, low_inc, high_inc = RANGES[key]
            for v in items:
                if ((low is not None and (v < low if low_inc else v <= low))
                        or (high is not None and (v > high if high_inc else v >= high))):
                    raise ConfigError(f"{source}: {key} must be {_range_text(low, high, low_inc, high_inc)}, "
                                      f"got {value}")


#: Device settings :func:`parse_device` accepts (the message of a bad one lists them).
DEVICE_FORMS = "auto, cpu, cuda, cuda:N, N (= cuda:N) or mps"


def parse_device(spec: Any, key: str = "train.device") -> tuple[str, int | None]:
    """Check the syntax of a device setting, as torch and Ultralytics users write it (no hardware check).

    Accepted (case-insensitive): ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``N`` (a bare GPU index, = ``cuda:N``),
    ``mps`` and ``mps:0``. Whether the device exists is checked by :func:`e2edet.engine.device.select_device`.

    Args:
        spec: the setting; key: its name in messages (``train.device``, ``--device``).
    Returns:
        ``(kind, index)``: kind ``auto``, ``cpu``, ``cuda`` or ``mps``; index the explicit device index or None.
    Raises:
        ConfigError: naming ``key`` and the accepted forms (``gpu``, ``tpu``, ``cuda:x``, ``0,1``...).
    """
    text = str(spec).strip().lower()
    if text in ("auto", "cpu", "cuda", "mps"):
        return text, None
    if text.isdigit():
        return "cuda", int(text)
    kind, sep, index = text.partition(":")
    if sep and kind in ("cuda", "mps"):
        if index.isdigit() and kind == "mps" and int(index) != 0:
            raise ConfigError(f"{key}={spec!r}: Apple MPS has a single device, write mps")
        if index.isdigit():
            return kind, int(index)
        raise ConfigError(f"{key}={spec!r}: the device index must be a number, e.g. {kind}:0 "
                          f"(accepted: {DEVICE_FORMS})")
    if "," in text:
        raise ConfigError(f"{key}={spec!r}: one device per process (for several GPUs launch "
                          f"`torchrun --nproc_per_node N -m e2edet train ...`); accepted: {DEVICE_FORMS}")
    hint = "; for a GPU write cuda or 0" if text in ("gpu", "nvidia", "cuda0") else ""
    raise ConfigError(f"{key}={spec!r} is not a device (accepted: {DEVICE_FORMS}){hint}")
