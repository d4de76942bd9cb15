"""Optimizer and per-iteration learning-rate schedule (linear warm-up, then multi-step or cosine decay).

The schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` stepped once per training iteration, so that
epoch-based and ``max_iters``-based runs share one code path. Iteration ``i`` (0-based) trains with
``lr = cfg.lr * lr_factor(i)`` where

* warm-up: for ``i < W`` the factor is multiplied by ``warmup_factor * (1 - i / W) + i / W`` (linear from
  ``warmup_factor`` to 1). ``W = min(cfg.warmup_iters, total_iters // 4)``: in very short runs warm-up is capped
  at a quarter of training so the schedule still reaches its full learning rate before the first decay;
* multistep: the factor is ``gamma ** n`` where ``n`` counts the milestones ``round(f * total_iters)`` (``f`` in
  ``cfg.steps``) that are ``<= i``;
* cosine: the factor is ``0.5 * (1 + cos(pi * i / total_iters))``, reaching 0 at the end of training.

A model may scale the learning rate of some parameters (``model.lr_multipliers``, see :func:`build_optimizer`):
their groups train with ``cfg.lr * multiplier * lr_factor(i)``; :func:`lr_at` and :func:`base_lr` give the lr of
multiplier 1.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
"""Module types whose parameters receive ``cfg.weight_decay_norm`` instead of ``cfg.weight_decay``."""


def _is_norm(module: nn.Module) -> bool:
    """True for normalisation layers: :data:`NORM_TYPES` and classes named ``*Norm``/``*Norm2d`` (e.g. RMSNorm)."""
    return isinstance(module, NORM_TYPES) or re.search(r"Norm(\d+d)?$", type(module).__name__) is not None


#: Parameter names that get ``weight_decay_norm`` like normalisation layers: Swin's relative position bias tables.
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def _lr_multiplier(name: str, patterns: list[tuple[re.Pattern, float]]) -> float:
    """The multiplier of the first pattern that ``re.search``-es ``name`` (1.0 when none does)."""
    for pattern, mult in patterns:
        if pattern.search(name):
            return mult
    return 1.0


def _group_name(kind: str, mult: float) -> str:
    """``"default"``/``"norm"`` for multiplier 1, else e.g. ``"default_x0.1"``, ``"norm_x0"``."""
    return kind if mult == 1.0 else f"{kind}_x{mult:g}"


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """Build SGD (with momentum) or AdamW over the trainable parameters of ``model``.

    Args:
        model: the (unwrapped) model. Only parameters with ``requires_grad=True`` are optimised; a parameter
            shared by several modules is added once. An optional attribute ``model.lr_multipliers``
            (``{regex: multiplier}``, e.g. Deformable DETR's ``{"^backbone\\.": 0.1,
            "reference_points|sampling_offsets": 0.1}``) gives each parameter the learning rate
            ``cfg.lr * multiplier`` of the first regex that ``re.search``-es its qualified name in
            ``model.named_parameters()`` (a shared parameter: its first name there); unmatched parameters keep
            ``cfg.lr``. A multiplier of 0 keeps the parameter in a group whose lr stays 0.
        cfg: object with ``optimizer`` (``"sgd"`` or ``"adamw"``), ``lr``, ``momentum`` (SGD only),
            ``weight_decay`` and ``weight_decay_norm`` (applied to parameters owned by normalisation layers:
            BatchNorm, GroupNorm, LayerNorm, InstanceNorm; frozen BatchNorm has no parameters; and to Swin's
            position tables, :data:`NO_DECAY_NAMES`, as the Swin detection configs do: ``specs/dense.md`` 3.6).
            Optional ``bias_lr_mult`` / ``bias_decay_mult`` (default 1) follow mmcv's ``DefaultOptimizerConstructor``
            ``paramwise_cfg`` (used by the O2F CondInst configs, ``specs/dense.md`` 3.10): every parameter named
            ``bias`` of a module that is not a normalisation layer trains with ``lr * bias_lr_mult`` (times its
            ``lr_multipliers`` entry), and with ``weight_decay * bias_decay_mult`` unless the module is a depthwise
            convolution (``groups == in_channels``), whose bias keeps ``weight_decay`` as in mmcv (mmcv also leaves
            deformable-convolution offsets out; no dense model here has them).
    Returns:
        The optimizer. Without ``lr_multipliers`` and bias multipliers: up to two parameter groups named
        ``"default"`` and ``"norm"`` (key ``"name"``). With them: one group per (weight-decay kind, multiplier) pair
        that has parameters (kinds ``"default"``, ``"norm"`` and, with ``bias_decay_mult != 1``, ``"bias"``), each
        with its own ``lr`` and ``lr_mult``, named ``"default"``/``"norm"`` for multiplier 1 (listed first) and
        ``"default_x0.1"``, ``"norm_x0.1"``, ... otherwise; :class:`LambdaLR` then scales every group's own base
        lr, and :func:`base_lr` reads back the lr of multiplier 1.
    Raises:
        ValueError: unknown optimizer name, a model without trainable parameters, or a non-numeric or negative
            multiplier / invalid regex in ``lr_multipliers``, or a negative ``bias_lr_mult`` / ``bias_decay_mult``.
    """
    raw = getattr(model, "lr_multipliers", None) or {}
    patterns: list[tuple[re.Pattern, float]] = []
    for regex, mult in dict(raw).items():
        try:
            pattern, value = re.compile(regex), float(mult)
        except (re.error, TypeError, ValueError) as err:
            raise ValueError(f"build_optimizer: bad lr_multipliers entry {regex!r}: {mult!r} ({err})") from err
        if not value >= 0.0:
            raise ValueError(f"build_optimizer: lr_multipliers[{regex!r}] = {mult!r} must be >= 0")
        patterns.append((pattern, value))
    bias_lr = float(getattr(cfg, "bias_lr_mult", 1.0))
    bias_decay = float(getattr(cfg, "bias_decay_mult", 1.0))
    if not (bias_lr >= 0.0 and bias_decay >= 0.0):
        raise ValueError(f"build_optimizer: bias_lr_mult {bias_lr} and bias_decay_mult {bias_decay} must be >= 0")
    per_group_lr = bool(patterns) or bias_lr != 1.0
    names: dict[int, str] = {}
    if patterns:
        for qualified, param in model.named_parameters():  # deduplicated: a shared parameter's first name
            names.setdefault(id(param), qualified)
    seen: set[int] = set()
    buckets: dict[tuple[str, float], list[nn.Parameter]] = {("default", 1.0): [], ("norm", 1.0): []}
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_norm = _is_norm(module)
            kind = "norm" if is_norm or pname in NO_DECAY_NAMES else "default"
            mult = _lr_multiplier(names[id(param)], patterns) if patterns else 1.0
            if pname == "bias" and not is_norm:  # mmcv paramwise_cfg: bias_lr_mult, then bias_decay_mult
                mult *= bias_lr
                depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels  # mmcv's test
                if bias_decay != 1.0 and not depthwise:
                    kind = "bias"
            buckets.setdefault((kind, mult), []).append(param)
    if not seen:
        raise ValueError("build_optimizer: the model has no trainable parameters (all requires_grad=False)")
    decay = {"default": float(cfg.weight_decay), "norm": float(cfg.weight_decay_norm),
             "bias": float(cfg.weight_decay) * bias_decay}
    if not per_group_lr:  # the plain groups, exactly as before multipliers existed
        groups = [{"params": params, "weight_decay": decay[kind], "name": kind}
                  for (kind, _), params in buckets.items() if params]
    else:  # multiplier 1 first (see base_lr), then the others in order of first appearance; default, norm, bias
        mults = list(dict.fromkeys(mult for _, mult in buckets))  # 1.0 first (seeded above)
        kinds = ("default", "norm", "bias")
        order = sorted(buckets, key=lambda key: (mults.index(key[1]), kinds.index(key[0])))
        groups = [{"params": buckets[kind, mult], "weight_decay": decay[kind], "name": _group_name(kind, mult),
                   "lr": float(cfg.lr) * mult, "lr_mult": mult}
                  for kind, mult in order if buckets[kind, mult]]
    name = str(cfg.optimizer).lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'sgd' or 'adamw'")


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The current learning rate of multiplier 1 (``cfg.lr`` times the schedule factor), for logging.

    Groups from :func:`build_optimizer` without ``lr_mult`` have multiplier 1. When no group has multiplier 1, the
    first group with a non-zero multiplier is divided by it; when all multipliers are 0, 0.0.
    """
    groups = optimizer.param_groups
    for group in groups:
        if group.get("lr_mult", 1.0) == 1.0:
            return float(group["lr"])
    for group in groups:
        if group["lr_mult"]:
            return float(group["lr"]) / float(group["lr_mult"])
    return 0.0


class LrFactor:
    """Picklable learning-rate multiplier ``f(iteration)`` used by :class:`LambdaLR` (see module docstring).

    Args:
        total_iters: number of training iterations (> 0).
        schedule: ``"multistep"`` or ``"cosine"``.
        steps: fractions of ``total_iters`` in ``(0, 1]`` at which multistep multiplies by ``gamma``.
        gamma: multistep decay factor.
        warmup_iters: requested warm-up length in iterations (capped at ``total_iters // 4``).
        warmup_factor: factor at iteration 0 of the warm-up, in ``(0, 1]``.
    Raises:
        ValueError: non-positive ``total_iters``, unknown schedule, or step fractions outside ``(0, 1]``.
    """

    def __init__(
        self,
        total_iters: int,
        schedule: str = "multistep",
        steps: tuple[float, ...] | list[float] = (0.667, 0.889),
        gamma: float = 0.1,
        warmup_iters: int = 1000,
        warmup_factor: float = 0.001,
    ) -> None:
        if int(total_iters) <= 0:
            raise ValueError(f"total_iters must be > 0, got {total_iters}")
        if schedule not in ("multistep", "cosine"):
            raise ValueError(f"unknown lr schedule {schedule!r}; expected 'multistep' or 'cosine'")
        bad = [f for f in steps if not 0.0 < float(f) <= 1.0]
        if bad:
            raise ValueError(f"lr steps must be fractions of training in (0, 1], got {list(steps)}")
        self.total_iters = int(total_iters)
        self.schedule = schedule
        self.milestones = sorted(round(float(f) * self.total_iters) for f in steps)
        self.gamma = float(gamma)
        self.warmup_iters = max(0, min(int(warmup_iters), self.total_iters // 4))
        self.warmup_factor = float(warmup_factor)

    def __call__(self, iteration: int) -> float:
        """Multiplier of the base learning rate for 0-based ``iteration``."""
        if self.schedule == "cosine":
            progress = min(iteration, self.total_iters) / self.total_iters
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = self.gamma ** sum(1 for m in self.milestones if m <= iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1.0 - alpha) + alpha
        return factor


def lr_factor_from_config(cfg: Any, total_iters: int) -> LrFactor:
    """Build the :class:`LrFactor` described by a TrainConfig-like ``cfg`` for a run of ``total_iters``."""
    return LrFactor(
        total_iters=total_iters,
        schedule=str(cfg.schedule).lower(),
        steps=tuple(cfg.steps),
        gamma=cfg.gamma,
        warmup_iters=cfg.warmup_iters,
        warmup_factor=cfg.warmup_factor,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_iters: int) -> LambdaLR:
    """Per-iteration :class:`LambdaLR` for ``optimizer`` (call ``scheduler.step()`` after every iteration).

    Args:
        optimizer: from :func:`build_optimizer`; every group follows the same multiplier.
        cfg: object with ``schedule``, ``steps``, ``gamma``, ``warmup_iters``, ``warmup_factor``.
        total_iters: number of training iterations of the whole run (> 0).
    Raises:
        ValueError: see :class:`LrFactor`.
    """
    return LambdaLR(optimizer, lr_lambda=lr_factor_from_config(cfg, total_iters))


def lr_at(cfg: Any, total_iters: int, iteration: int) -> float:
    """Learning rate (same unit as ``cfg.lr``) used at 0-based ``iteration`` of a ``total_iters`` run (groups with
    an lr multiplier use it times their multiplier)."""
    return float(cfg.lr) * lr_factor_from_config(cfg, total_iters)(iteration)
