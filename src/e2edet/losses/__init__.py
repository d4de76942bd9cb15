"""e2edet.losses: focal losses and the dense-detector criterion (named, weighted losses)."""

from e2edet.losses.dense_criterion import DenseCriterion
from e2edet.losses.focal import prob_focal_loss, sigmoid_focal_loss

__all__ = ["DenseCriterion", "prob_focal_loss", "sigmoid_focal_loss"]
