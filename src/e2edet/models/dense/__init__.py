"""e2edet.models.dense: FCOS-style dense detector (FCOS, POTO, DeFCN 3DMF) and its post-processor.

- ``points.anchor_points``: one anchor point per FPN-level cell, P3..P7, row-major.
- ``max_filter.MaxFiltering3D``: DeFCN 3D max filtering.
- ``head.DenseHead``: cls/reg towers, per-level ``Scale``, optional centerness or 3DMF + filter branch.
- ``detector.DenseDetector``: backbone + FPN + head -> predictions dict (``docs/architecture.md``).
- ``postprocess.DensePostProcessor``: per-level top-k + threshold, sort, top-N, optional NMS.
"""

from e2edet.models.dense.detector import DenseDetector
from e2edet.models.dense.head import DenseHead
from e2edet.models.dense.max_filter import MaxFiltering3D
from e2edet.models.dense.points import anchor_points
from e2edet.models.dense.postprocess import SCORE_MODES, DensePostProcessor

__all__ = [
    "DenseDetector",
    "DenseHead",
    "DensePostProcessor",
    "MaxFiltering3D",
    "SCORE_MODES",
    "anchor_points",
]
