"""e2edet.models: backbones (C3-C5), the P3-P7 FPN, and the dense (FCOS-style) detectors in ``e2edet.models.dense``."""

from e2edet.models.backbone import BACKBONES, Backbone, build_backbone
from e2edet.models.fpn import FPN

__all__ = ["BACKBONES", "Backbone", "build_backbone", "FPN"]
