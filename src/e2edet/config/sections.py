"""The typed sections of an experiment config (pydantic), the :class:`Config` that holds them, the command-line
aliases, and the checks that span sections (:func:`validate`, :func:`ranges`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from e2edet.archs import ARCHITECTURES
from e2edet.config_checks import ConfigError, Float, Int, Section, field_range, parse_device

__all__ = ["ALIASES", "COMMON_SECTIONS", "Config", "DataConfig", "TestConfig", "TOP_KEYS", "TrainConfig", "ranges",
           "section_types", "validate"]


class DataConfig(Section):
    """Dataset and augmentation settings.

    ``dataset`` is a sample name (``trees``, ``bccd``, ``dsb2018``), a Pascal VOC root folder, a dataset YAML file with
    ``train_json``/``train_images``/``val_json``/``val_images``, or an Ultralytics ``data.yaml`` (or its folder); see
    :func:`e2edet.data.datasets.resolve_dataset`. ``val_fraction`` is the share of the training images held out
    (seeded, the same split for every ``train.seed``) when the dataset has no validation split.
    Sizes are in pixels: training picks the shorter side from ``train_min_sizes`` (longer side capped at
    ``train_max_size``); evaluation resizes the shorter side to ``test_min_size``. ``flip_prob``, ``vflip_prob`` and
    ``transpose_prob`` are the probabilities of the horizontal flip, the vertical flip and the axis swap
    (:class:`e2edet.data.transforms.RandomTranspose`; 0.5 each = the 8 orientations of the square, for images with no
    "up" such as aerial views). ``masks``: the training split also loads the COCO instance masks (``segmentation``,
    polygons or RLE) as the targets' ``masks``, for models that predict masks (``model.masks``); evaluation reads the
    masks from the annotation file itself.
    """

    dataset: str = "trees"
    train_min_sizes: tuple[Annotated[Int, Field(ge=1)], ...] = Field((640, 672, 704, 736, 768, 800), min_length=1)
    train_max_size: Int = Field(1333, ge=1)
    test_min_size: Int = Field(800, ge=1)
    test_max_size: Int = Field(1333, ge=1)
    flip_prob: Float = Field(0.5, ge=0, le=1)
    vflip_prob: Float = Field(0.0, ge=0, le=1)
    transpose_prob: Float = Field(0.0, ge=0, le=1)
    crop: bool = False
    filter_empty: bool = True
    val_fraction: Float = Field(0.1, gt=0, lt=1)
    masks: bool = False


class TestConfig(Section):
    """Post-processing and evaluation settings.

    ``score``: ranking score, ``cls``, ``cls_filter``, ``cls_ctr_sqrt`` (FCOS), ``cls_ctr`` (O2F),
    ``cls_ctr_cls_thresh`` (O2F CondInst: threshold on cls, score cls x ctr) or ``drmm`` (D-RMM: softmax class
    probability x sigmoid foreground). ``nms_iou`` is the method's own post-processing: 0 means
    end-to-end (no NMS); FCOS uses 0.6. Evaluation always reports AP without NMS and with class-aware NMS at
    ``eval_nms_iou`` side by side. ``predict_score`` is the default ``--score`` of ``e2edet predict`` and of the
    pictures (0 = unset, 0.3): training sets it in the checkpoints to the threshold that maximises F1 on the
    validation split (:func:`e2edet.engine.diagnostics.best_f1`, the post-processing of the primary metric).
    """

    __test__ = False  # not a pytest test class

    score: Literal["cls", "cls_filter", "cls_ctr_sqrt", "cls_ctr", "cls_ctr_cls_thresh", "drmm"] = "cls"
    score_thresh: Float = Field(0.05, ge=0, lt=1)
    topk_candidates: Int = Field(1000, ge=1)
    max_detections: Int = Field(100, ge=1)
    nms_iou: Float = Field(0.0, ge=0, lt=1)
    eval_nms_iou: Float = Field(0.6, gt=0, le=1)
    predict_score: Float = Field(0.0, ge=0, le=1)


class TrainConfig(Section):
    """Optimisation and trainer settings; see :class:`e2edet.engine.trainer.Trainer`.

    ``batch_size`` is per process (the published COCO recipes use 2 per GPU on 8 GPUs). ``bias_lr_mult`` and
    ``bias_decay_mult`` scale the lr and weight decay of the biases of non-norm layers (mmcv's ``paramwise_cfg``;
    :func:`e2edet.engine.optim.build_optimizer`). ``max_iters`` > 0 overrides
    ``epochs``; ``steps`` are fractions of the total iterations where the lr is multiplied by ``gamma``. ``amp``
    enables bf16 autocast on CUDA; ``cpu_amp`` enables it when training on the CPU (a speed-up only on CPUs with
    AVX512-BF16 or AMX: a ``poto_3dmf_mnv2_cpu`` step took 0.70 s instead of 1.0 s on this project's 2-core AMD EPYC;
    off by default, the CPU recipes' published figures are float32; evaluation always runs in float32).
    ``checkpoint_period`` writes ``checkpoints/last`` every that many epochs, ``checkpoint_every`` also every that many
    iterations (0 = only at epoch ends).

    ``weights`` (alias ``weights=``): fine-tune from a run folder, checkpoint folder or ``.safetensors`` file: every
    tensor whose name and shape fit is loaded, the rest (e.g. the class logits of another class count) keeps its
    fresh initialisation; optimizer, schedule and iterations start anew (``--resume`` continues a run instead).
    ``ema`` keeps an exponential moving average of the weights (``d = ema_decay * (1 - exp(-updates / ema_tau))``,
    as YOLOX/Ultralytics), evaluated during training and saved as the checkpoints' ``model.safetensors``.
    ``tensorboard`` also logs the train losses/lr and the evaluation metrics to ``<run>/tensorboard/`` (needs
    ``pip install tensorboard``; see :class:`e2edet.engine.logger.MetricsLogger`). ``compile`` trains through
    ``torch.compile(model)`` (default inductor backend; checkpoints, EMA and evaluation use the plain module). Measured
    on 2 CPU cores for ``defcn_mnv2_cpu``: 136 s to compile and 1.25x the eager step afterwards, so it is off by
    default; it is meant for GPUs, where it is unmeasured here.
    """

    epochs: Int = Field(12, ge=0)
    max_iters: Int = Field(0, ge=0)
    batch_size: Int = Field(4, ge=1)
    workers: Int = Field(2, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Float = Field(0.01, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(1e-4, ge=0)
    weight_decay_norm: Float = Field(0.0, ge=0)
    bias_lr_mult: Float = Field(1.0, ge=0)
    bias_decay_mult: Float = Field(1.0, ge=0)
    schedule: Literal["multistep", "cosine"] = "multistep"
    steps: tuple[Annotated[Float, Field(gt=0, lt=1)], ...] = (0.667, 0.889)
    gamma: Float = Field(0.1, gt=0)
    warmup_iters: Int = Field(1000, ge=0)
    warmup_factor: Float = Field(0.001, gt=0, le=1)
    clip_grad_norm: Float = Field(0.0, ge=0)
    amp: bool = True
    cpu_amp: bool = False
    seed: Int = Field(42, ge=0)
    log_period: Int = Field(20, ge=1)
    eval_period: Int = Field(1, ge=0)
    checkpoint_period: Int = Field(1, ge=0)
    checkpoint_every: Int = Field(0, ge=0)
    device: str = "auto"
    weights: str = ""
    ema: bool = False
    ema_decay: Float = Field(0.9998, ge=0, lt=1)
    ema_tau: Float = Field(2000.0, gt=0)
    tensorboard: bool = False
    compile: bool = False


_MODELS = tuple(a.model_section for a in ARCHITECTURES.values())
_LOSSES = tuple(dict.fromkeys(a.loss_section for a in ARCHITECTURES.values()))
ModelUnion = Annotated[Union[_MODELS], Field(discriminator="arch")]  # noqa: UP007 (a runtime tuple of types)
LossUnion = Union[_LOSSES]  # noqa: UP007


class Config(Section):
    """A whole experiment: the recipe name, where runs go, and the five sections.

    ``model`` is the section of its architecture (``model.arch``), ``loss`` that architecture's loss section; left
    out, ``loss`` is the architecture's default. Build one in Python with :meth:`for_arch`.
    """

    name: str = "experiment"
    description: str = ""
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelUnion = Field(default_factory=lambda: ARCHITECTURES["dense"].model_section())
    loss: LossUnion = None  # type: ignore[assignment]  (filled from model.arch below)
    test: TestConfig = Field(default_factory=TestConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_loss(cls, data: Any) -> Any:
        """A missing ``loss`` is the default loss section of ``model.arch``."""
        if isinstance(data, dict) and data.get("loss") is None:
            model = data.get("model")
            arch = model.get("arch", "dense") if isinstance(model, dict) else getattr(model, "arch", "dense")
            if arch in ARCHITECTURES:
                data = {**data, "loss": ARCHITECTURES[arch].loss_section()}
        return data

    @model_validator(mode="after")
    def _loss_of_arch(self) -> "Config":
        expected = ARCHITECTURES[self.model.arch].loss_section
        if type(self.loss) is not expected:
            raise ValueError(f"model.arch={self.model.arch} takes a {expected.__name__} loss section, "
                             f"got {type(self.loss).__name__}")
        return self

    @classmethod
    def for_arch(cls, arch: str, **fields: Any) -> "Config":
        """A config of architecture ``arch`` with its default ``model`` and ``loss`` sections and ``fields`` (name,
        description, output_dir, or section objects).

        Raises:
            ConfigError: unknown ``arch``.
        """
        if arch not in ARCHITECTURES:
            raise ConfigError(f"model.arch={arch!r} is not one of {', '.join(ARCHITECTURES)}")
        a = ARCHITECTURES[arch]
        return cls(**{"model": a.model_section(), "loss": a.loss_section(), **fields})

    @property
    def run_dir(self) -> Path:
        """Output folder of this experiment: ``output_dir/name``."""
        return Path(self.output_dir) / self.name


#: Short command-line aliases for the most used fields (``e2edet train defcn_mnv2_cpu data=bccd epochs=6``).
ALIASES = {
    "data": "data.dataset",
    "epochs": "train.epochs",
    "iters": "train.max_iters",
    "batch": "train.batch_size",
    "lr": "train.lr",
    "device": "train.device",
    "seed": "train.seed",
    "workers": "train.workers",
    "backbone": "model.backbone",
    "output": "output_dir",
    "weights": "train.weights",
}

#: Top-level keys that are not sections.
TOP_KEYS = ("name", "description", "output_dir")
#: The sections every architecture shares.
COMMON_SECTIONS = {"data": DataConfig, "test": TestConfig, "train": TrainConfig}


def section_types(arch: str) -> dict[str, type[Section]]:
    """The section classes of a config of architecture ``arch``: ``{data, model, loss, test, train}``."""
    a = ARCHITECTURES[arch]
    return {"data": DataConfig, "model": a.model_section, "loss": a.loss_section, "test": TestConfig,
            "train": TrainConfig}


def ranges(arch: str | None = None) -> dict[str, tuple[float | None, float | None, bool, bool]]:
    """Dotted key -> ``(low, high, low inclusive, high inclusive)`` of every constrained number of architecture
    ``arch`` (all architectures when ``None``), read from the field constraints."""
    out = {}
    for a in [arch] if arch else list(ARCHITECTURES):
        for section, cls in section_types(a).items():
            for name in cls.model_fields:
                bounds = field_range(cls, name)
                if bounds is not None:
                    out[f"{section}.{name}"] = bounds
    return out


def validate(cfg: Config, source: str = "<config>") -> None:
    """Check what types and field ranges alone cannot express: the syntax of ``train.device``
    (:func:`parse_device`), schedule and class-name consistency, and the combinations of keys the architecture
    needs (its :attr:`~e2edet.archs.base.Architecture.check`). Section values were checked when they were parsed.

    Raises:
        ConfigError: naming the key, the bad value and the accepted values.
    """
    t, m = cfg.train, cfg.model
    try:
        parse_device(t.device, "train.device")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if t.epochs <= 0 and t.max_iters <= 0:
        raise ConfigError(f"{source}: set train.epochs > 0 or train.max_iters > 0")
    if m.class_names and m.num_classes and len(m.class_names) != m.num_classes:
        raise ConfigError(f"{source}: model.num_classes={m.num_classes} but model.class_names lists "
                          f"{len(m.class_names)} names")
    ARCHITECTURES[m.arch].check(cfg, source)
