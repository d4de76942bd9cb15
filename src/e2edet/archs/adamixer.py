"""AdaMixer (and D-RMM on it): :class:`e2edet.models.query.adamixer.AdaMixer` (``specs/query.md`` §2, §3.10)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from e2edet.archs import query
from e2edet.archs.base import Architecture
from e2edet.config_checks import ConfigError, Int

__all__ = ["ARCH", "AdaMixerModelSection"]


class AdaMixerModelSection(query.QueryModelSection):
    """``model`` of ``arch: adamixer``: the query keys plus ``num_groups`` (sampling/mixing groups), ``in_points``
    (sampling points per group) and ``out_points`` (mixed spatial outputs)."""

    arch: Literal["adamixer"] = "adamixer"
    num_groups: Int = Field(4, ge=1)
    in_points: Int = Field(32, ge=1)
    out_points: Int = Field(128, ge=1)


def check(cfg, source: str) -> None:
    """The query checks; the query width must split into ``num_groups`` and be a multiple of 8 (the sine position
    embedding of the boxes)."""
    query.check(cfg, source)
    m = cfg.model
    if m.fpn_channels % m.num_groups or m.fpn_channels % 8:
        raise ConfigError(f"{source}: model.fpn_channels={m.fpn_channels} must be divisible by model.num_groups "
                          f"({m.num_groups}) and by 8 (AdaMixer's position embedding)")


def build_model(cfg):
    """:class:`AdaMixer` with the ``model`` section's settings."""
    from e2edet.models.query.adamixer import AdaMixer

    m = cfg.model
    return AdaMixer(num_groups=m.num_groups, in_points=m.in_points, out_points=m.out_points,
                    **query.query_kwargs(cfg))


ARCH = Architecture("adamixer", AdaMixerModelSection, query.QueryLossSection, check, build_model,
                    query.build_criterion, query.build_postprocessor)
