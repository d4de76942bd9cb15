"""Sparse R-CNN (and D-RMM on it): :class:`e2edet.models.query.sparse_rcnn.SparseRCNN` (``specs/query.md`` §1, §3)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from e2edet.archs import query
from e2edet.archs.base import Architecture
from e2edet.config_checks import Int

__all__ = ["ARCH", "SparseRCNNModelSection"]


class SparseRCNNModelSection(query.QueryModelSection):
    """``model`` of ``arch: sparse_rcnn``: the query keys plus ``dynamic_dim`` (DynamicConv width) and
    ``stage_init`` (``official``, or ``adamixer``: zero generator weight and ``fc_reg``, for short schedules)."""

    arch: Literal["sparse_rcnn"] = "sparse_rcnn"
    dynamic_dim: Int = Field(64, ge=1)
    stage_init: Literal["official", "adamixer"] = "official"


def build_model(cfg):
    """:class:`SparseRCNN` with the ``model`` section's settings."""
    from e2edet.models.query.sparse_rcnn import SparseRCNN

    return SparseRCNN(dynamic_dim=cfg.model.dynamic_dim, stage_init=cfg.model.stage_init, **query.query_kwargs(cfg))


ARCH = Architecture("sparse_rcnn", SparseRCNNModelSection, query.QueryLossSection, query.check, build_model,
                    query.build_criterion, query.build_postprocessor)
