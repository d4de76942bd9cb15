"""e2edet.assign: parameter-free label assigners (``@torch.no_grad()``) and the shared Hungarian solver.

Every dense assigner returns a :class:`DenseAssignment`; see ``docs/architecture.md`` "Assignment".
"""

from e2edet.assign.auxiliary import AuxAssigner
from e2edet.assign.base import DenseAssignment, assignment_from_gt_index, empty_assignment
from e2edet.assign.fcos import FCOSAssigner
from e2edet.assign.hungarian import linear_assignment
from e2edet.assign.o2f import O2FAssigner, soft_target_scale
from e2edet.assign.poto import POTOAssigner
from e2edet.assign.set_matcher import HungarianMatcher
from e2edet.assign.prior import center_prior, inside_box, pairwise_ltrb, poto_quality, quality_matrix

__all__ = [
    "AuxAssigner",
    "HungarianMatcher",
    "O2FAssigner",
    "soft_target_scale",
    "DenseAssignment",
    "FCOSAssigner",
    "POTOAssigner",
    "assignment_from_gt_index",
    "center_prior",
    "empty_assignment",
    "inside_box",
    "linear_assignment",
    "pairwise_ltrb",
    "poto_quality",
    "quality_matrix",
]
