"""e2edet.engine: training loop, optimizer/schedule, checkpoints, metrics logging and COCO evaluation."""

from e2edet.engine.checkpoint import load_checkpoint, load_model_weights, load_weights, save_checkpoint, unwrap_model
from e2edet.engine.device import init_distributed, select_device
from e2edet.engine.crowd_metrics import crowd_metrics
from e2edet.engine.diagnostics import diagnostics, plot_reliability
from e2edet.engine.evaluator import CocoEvaluator, evaluate, format_results_table, save_results
from e2edet.engine.logger import MetricsLogger, plot_losses, read_metrics
from e2edet.engine.optim import build_optimizer, build_scheduler, lr_at
from e2edet.engine.rng import seed_everything
from e2edet.engine.trainer import Trainer

__all__ = [
    "CocoEvaluator",
    "crowd_metrics",
    "diagnostics",
    "plot_reliability",
    "MetricsLogger",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "format_results_table",
    "init_distributed",
    "load_checkpoint",
    "load_model_weights",
    "load_weights",
    "lr_at",
    "plot_losses",
    "read_metrics",
    "save_checkpoint",
    "save_results",
    "seed_everything",
    "select_device",
    "unwrap_model",
]
