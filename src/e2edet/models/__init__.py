"""e2edet.models: backbones (C2/C3-C5), the P3-P7 FPN, the dense (FCOS-style) detectors in ``e2edet.models.dense``
and the query-based ones (Sparse R-CNN, AdaMixer, D-RMM switch) in ``e2edet.models.query``."""

from e2edet.models.backbone import BACKBONES, Backbone, build_backbone
from e2edet.models.fpn import FPN

__all__ = ["BACKBONES", "Backbone", "build_backbone", "FPN"]
