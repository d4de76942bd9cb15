"""The registry of architectures: ``model.arch`` -> :class:`~e2edet.archs.base.Architecture` (typed ``model`` and
``loss`` sections, checks, and the builders of model, criterion and post-processor).

Adding an architecture: write ``e2edet/archs/<name>.py`` (its sections and builders, ending in
``ARCH = Architecture(...)``) and add one line below. ``docs/architecture.md`` lists the files a new method touches.
"""

from __future__ import annotations

from e2edet.archs import adamixer, deformable_detr, dense, sparse_rcnn
from e2edet.archs.base import Architecture, ModelSection

__all__ = ["ARCHITECTURES", "Architecture", "ModelSection", "get_architecture"]

#: Every architecture by its ``model.arch`` name, in the order ``e2edet recipes`` lists them.
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        dense.ARCH,
        sparse_rcnn.ARCH,
        adamixer.ARCH,
        deformable_detr.ARCH,
    )
}


def get_architecture(name: str) -> Architecture:
    """The registered architecture ``name``.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
