"""What every architecture declares (:class:`Architecture`) and the model keys they all share
(:class:`ModelSection`).

An architecture is one module of :mod:`e2edet.archs` with its typed ``model`` and ``loss`` sections (pydantic,
``extra="forbid"``: a key of another architecture is an error), the checks across keys that types cannot express,
and the functions that build its model, criterion and post-processor from a whole :class:`e2edet.config.Config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import Field
from torch import nn

from e2edet.config_checks import Int, Section

__all__ = ["Architecture", "ModelSection"]


class ModelSection(Section):
    """Model keys of every architecture.

    ``arch`` chooses the architecture (and with it the typed ``model`` and ``loss`` sections). ``backbone``: a name of
    :data:`e2edet.models.backbone.BACKBONES`; ``pretrained``: ImageNet weights; ``freeze_at``: frozen backbone stages
    (detectron2 convention, 0-5). ``fpn_channels``: FPN width (and, for query detectors, the query width).
    ``num_classes`` and ``class_names`` are filled from the training dataset when left empty.
    """

    arch: str = "dense"
    backbone: str = "resnet50"
    pretrained: bool = True
    freeze_at: Int = Field(2, ge=0, le=5)
    fpn_channels: Int = Field(256, ge=1)
    num_classes: Int = Field(0, ge=0)
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Architecture:
    """One registered architecture (see :data:`e2edet.archs.ARCHITECTURES`).

    Attributes:
        name: the ``model.arch`` value.
        model_section / loss_section: its typed ``model`` and ``loss`` sections (subclasses of
            :class:`ModelSection` and :class:`e2edet.config_checks.Section`).
        check: ``check(cfg, source)`` raises :class:`e2edet.config_checks.ConfigError` for combinations of keys the
            method cannot use (``source`` starts the message).
        build_model: ``cfg -> nn.Module`` following the model contract of ``docs/architecture.md``.
        build_criterion: ``cfg -> nn.Module`` called as ``criterion(outputs, targets, epoch, max_epoch)``.
        build_postprocessor: ``cfg -> callable(outputs, sizes, orig_sizes, nms_iou=None)`` giving per-image
            ``{boxes, scores, labels}``.
    """

    name: str
    model_section: type[ModelSection]
    loss_section: type[Section]
    check: Callable[[Any, str], None]
    build_model: Callable[[Any], nn.Module]
    build_criterion: Callable[[Any], nn.Module]
    build_postprocessor: Callable[[Any], Callable]
