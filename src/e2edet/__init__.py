"""e2edet: end-to-end (NMS-free) object detection.

DeFCN (POTO, 3D max filtering, auxiliary loss) and its FCOS baseline on one pip-installable PyTorch codebase.
See README.md for the command line and ``e2edet.recipes`` for the named experiment presets.
"""

__version__ = "0.1.0"
