"""e2edet.losses: focal losses and the criteria (named, weighted losses): dense (FCOS/POTO/DeFCN/O2F), Hungarian
set loss (Sparse R-CNN/AdaMixer) and the D-RMM mixture loss."""

from e2edet.losses.dense_criterion import DenseCriterion
from e2edet.losses.drmm import DRMMCriterion
from e2edet.losses.focal import prob_focal_loss, sigmoid_focal_loss, soft_focal_loss_with_prob
from e2edet.losses.set_criterion import SetCriterion

__all__ = ["DRMMCriterion", "DenseCriterion", "SetCriterion", "prob_focal_loss", "sigmoid_focal_loss",
           "soft_focal_loss_with_prob"]
