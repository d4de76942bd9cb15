"""DETR-family detectors (Deformable DETR and the methods built on it); spec ``../shared/specs/detr.md``."""
