"""What every architecture declares (:class:`Architecture`) and the model keys they all share
(:class:`ModelSection`).

An architecture is one module of :mod:`e2edet.archs` with its typed ``model`` and ``loss`` sections (pydantic,
``extra="forbid"``: a key of another architecture is an error), the checks across keys that types cannot express,
and the functions that build its model, criterion and post-processor from a whole :class:`e2edet.config.Config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import Field
from torch import nn

from e2edet.config_checks import Int, Section

__all__ = ["Architecture", "ModelSection", "RecollectionKeys", "build_recollection"]


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


class RecollectionKeys(Section):
    """SQR keys (selective query recollection, training only, ``models/query/recollection.py``) of the
    architectures driven by the shared stage loop: ``sqr`` = ``off``, ``selective`` (stage s also re-runs the sets
    of stage s-2: 1, 2, 3, 5, 8, 13 sets) or ``dense`` (every earlier set: 2^s); ``sqr_start_stage``: first stage
    that recollects (the official ablation; 1 = the published lists); ``sqr_batched``: all sets of a stage in one
    batch (faster, more memory) or one at a time."""

    sqr: Literal["off", "selective", "dense"] = "off"
    sqr_start_stage: Int = Field(1, ge=1)
    sqr_batched: bool = True


def build_recollection(model_section, num_stages: int):
    """The :class:`~e2edet.models.query.recollection.Recollection` of a section with :class:`RecollectionKeys`
    (None when ``sqr=off``)."""
    from e2edet.models.query.recollection import Recollection

    m = model_section
    if m.sqr == "off":
        return None
    return Recollection.build(num_stages, m.sqr, m.sqr_start_stage, m.sqr_batched)


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
