"""The PyTorch predictor (:class:`Predictor`), built from trained weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from e2edet.build import build_model, build_postprocessor
from e2edet.config import Config, from_dict
from e2edet.engine.checkpoint import (
    load_model_weights,
    load_weights,
    resolve_weights_file,
)
from e2edet.engine.device import select_device
from e2edet.inference.base import BasePredictor
from e2edet.inference.inputs import Preprocessing
from e2edet.inference.outputs import DEFAULT_SCORE
from e2edet.models.backbone import frozen_bn_like


class Predictor(BasePredictor):
    """Run a PyTorch detector on images of any size.

    Args:
        model: a detector obeying the model contract (``docs/architecture.md``).
        cfg: its experiment config (test sizes, score mode, class names).
        device: ``auto``, ``cpu``, ``cuda``...
    Use :meth:`from_weights` to load a trained model from a run folder, checkpoint folder or ``.safetensors`` file.
    Detections come from the recipe's own post-processor (the one evaluation uses).
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: str | torch.device = "auto"):
        self.cfg = cfg
        self.device = select_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.postprocess = build_postprocessor(cfg)
        self.preprocess = Preprocessing(cfg.data.test_min_size, cfg.data.test_max_size)
        self.class_names = list(cfg.model.class_names)
        self.default_score = cfg.test.predict_score or DEFAULT_SCORE
        self.skipped = []

    @classmethod
    def from_weights(cls, weights: str | Path, device: str = "auto") -> "Predictor":
        """Load weights and the config stored in their metadata.

        Raises:
            FileNotFoundError / ValueError: from :func:`e2edet.engine.checkpoint.load_weights` (names the path).
            WeightsMismatchError: the tensors do not fit the model their stored config builds (one line: the file,
                the counts and the first keys).
        """
        state, cfg_dict = load_weights(weights)
        if cfg_dict is None:
            raise ValueError(f"{weights}: the weights carry no e2edet config; was it written by `e2edet train`?")
        cfg = from_dict(cfg_dict, str(weights))
        cfg.model.pretrained = False  # the trained weights replace any ImageNet initialisation
        model = frozen_bn_like(build_model(cfg), state)  # ... but the run's frozen batch norms stay frozen
        load_model_weights(model, state, strict=True, source=resolve_weights_file(weights))
        return cls(model, cfg, device)

    def detect(self, batch: torch.Tensor, sizes: torch.Tensor, orig_sizes: torch.Tensor) -> list[dict]:
        """The model and the recipe's post-processor on one preprocessed batch (see :meth:`BasePredictor.detect`)."""
        sizes = sizes.to(self.device)
        outputs = self.model(batch.to(self.device), sizes)
        nms = self.cfg.test.nms_iou if self.cfg.test.nms_iou > 0 else None
        dets = self.postprocess(outputs, sizes, orig_sizes.to(self.device), nms_iou=nms)
        return [{k: v.cpu() for k, v in d.items()} for d in dets]
