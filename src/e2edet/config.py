"""Typed experiment configuration: dataclasses, YAML load/save and dotted command-line overrides.

A :class:`Config` has five sections (``data``, ``model``, ``loss``, ``test``, ``train``). Recipes
(:mod:`e2edet.recipes`) build named configs; the command line changes single fields with dotted overrides such as
``train.epochs=6 data.dataset=bccd`` (a few short aliases like ``data=`` and ``epochs=`` exist, see
:data:`ALIASES`). Every unknown key or badly typed value raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2edet.config_checks import DEVICE_FORMS, RANGES, ConfigError, check_ranges, parse_device
from e2edet.utils.io import atomic_write_text

__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "LossConfig", "TestConfig", "TrainConfig", "ALIASES", "CHOICES",
    "DEVICE_FORMS", "RANGES", "apply_overrides", "from_dict", "load_config", "parse_device", "save_config", "set_value",
    "to_dict", "validate",
]


@dataclass
class DataConfig:
    """Dataset and augmentation settings.

    ``dataset`` is a sample name (``trees``, ``bccd``), a Pascal VOC root folder, or a dataset YAML file with
    ``train_json``/``train_images``/``val_json``/``val_images`` (see :func:`e2edet.data.datasets.resolve_dataset`).
    Sizes are in pixels: training picks the shorter side from ``train_min_sizes`` (longer side capped at
    ``train_max_size``); evaluation resizes the shorter side to ``test_min_size``.
    """

    dataset: str = "trees"
    train_min_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    train_max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    flip_prob: float = 0.5
    crop: bool = False
    filter_empty: bool = True


@dataclass
class ModelConfig:
    """Detector settings.

    ``arch``: ``dense`` (FCOS-style: FCOS, POTO, DeFCN, O2F; :class:`e2edet.models.dense.detector.DenseDetector`),
    ``sparse_rcnn`` (:class:`e2edet.models.query.sparse_rcnn.SparseRCNN`) or ``adamixer``
    (:class:`e2edet.models.query.adamixer.AdaMixer`). ``fpn_channels`` is the FPN width, and for the query
    detectors also the query width. Dense only: ``num_convs`` (tower depth), ``centerness`` (+ ``ctr_convs`` x
    ``ctr_channels`` convs before it: O2F's 3 x 64), ``max_filter`` (3DMF). Query only: ``num_queries``,
    ``num_stages``, ``num_heads``, ``dim_feedforward``, ``dynamic_dim`` and ``stage_init`` (Sparse R-CNN DynamicConv
    width; stage init ``official`` or ``adamixer``: zero generator weight and ``fc_reg``, for short schedules),
    ``num_groups``/``in_points``/``out_points`` (AdaMixer), ``dropout``, ``proposal_init`` (``whole``/``grid``;
    empty = the method's default) and ``drmm`` (D-RMM mixture outputs and loss). ``num_classes`` and ``class_names``
    are filled from the training dataset when left empty.
    """

    arch: str = "dense"
    backbone: str = "resnet50"
    pretrained: bool = True
    freeze_at: int = 2
    fpn_channels: int = 256
    num_convs: int = 4
    centerness: bool = False
    ctr_convs: int = 0
    ctr_channels: int = 64
    max_filter: bool = False
    max_filter_gn: bool = True
    num_queries: int = 100
    num_stages: int = 6
    num_heads: int = 8
    dim_feedforward: int = 2048
    dynamic_dim: int = 64
    stage_init: str = "official"
    num_groups: int = 4
    in_points: int = 32
    out_points: int = 128
    dropout: float = 0.0
    proposal_init: str = ""
    drmm: bool = False
    num_classes: int = 0
    class_names: tuple[str, ...] = ()


@dataclass
class LossConfig:
    """Assignment and loss settings.

    Dense detectors (:class:`e2edet.losses.dense_criterion.DenseCriterion`): ``assigner`` ``fcos`` (one-to-many),
    ``poto`` (Hungarian one-to-one), ``poto_argmax`` or ``o2f`` (one-to-few: ``o2f_topk``, ``soft_weight``,
    ``max_soft_weight``, ``max_t``, ``min_t``, ``o2f_neg_weight``).
    ``score``: the score the one-to-one loss and quality use, ``cls``, ``cls_filter`` (3DMF) or ``cls_ctr`` (O2F).
    ``aux``: add DeFCN's auxiliary one-to-many focal loss on the cls logits.
    ``keep_infeasible``: keep Hungarian matches outside a GT's prior (official DeFCN) instead of dropping them
    (see :class:`e2edet.assign.poto.POTOAssigner`).

    Query detectors: Hungarian set loss (:class:`e2edet.losses.set_criterion.SetCriterion`, weights ``cls_weight``
    (focal, with ``focal_alpha``/``focal_gamma``), ``l1_weight``, ``giou_weight``) unless ``model.drmm``, which uses
    :class:`e2edet.losses.drmm.DRMMCriterion` (``min_scale_ratio``, ``mm_weight``, ``mcm_weight``, ``prob_weight``,
    ``coord_dist``). The dense-only keys are ignored by query detectors and vice versa.
    """

    assigner: str = "poto"
    score: str = "cls"
    aux: bool = False
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_weight: float = 2.0
    poto_alpha: float = 0.8
    center_radius: float = 1.5
    aux_topk: int = 9
    aux_weight: float = 1.0
    keep_infeasible: bool = False
    o2f_topk: int = 7
    soft_weight: float = 0.4
    max_soft_weight: float = 1.0
    max_t: float = 0.6
    min_t: float = 0.2
    o2f_neg_weight: float = 0.75
    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    min_scale_ratio: float = 0.04
    mm_weight: float = 1.0
    mcm_weight: float = 0.5
    prob_weight: float = 1.0
    coord_dist: str = "cauchy"


#: LossConfig fields that are :class:`e2edet.losses.dense_criterion.DenseCriterion` arguments.
DENSE_LOSS_KEYS = ("assigner", "score", "aux", "focal_alpha", "focal_gamma", "reg_weight", "poto_alpha",
                   "center_radius", "aux_topk", "aux_weight", "keep_infeasible", "o2f_topk", "soft_weight",
                   "max_soft_weight", "max_t", "min_t", "o2f_neg_weight")


@dataclass
class TestConfig:
    """Post-processing and evaluation settings.

    ``score``: ranking score, ``cls``, ``cls_filter``, ``cls_ctr_sqrt`` (FCOS), ``cls_ctr`` (O2F) or ``drmm``
    (D-RMM: softmax class probability x sigmoid foreground). ``nms_iou`` is the method's
    own post-processing: 0 means end-to-end (no NMS); FCOS uses 0.6. Evaluation always reports AP without NMS and
    with class-aware NMS at ``eval_nms_iou`` side by side.
    """

    score: str = "cls"
    score_thresh: float = 0.05
    topk_candidates: int = 1000
    max_detections: int = 100
    nms_iou: float = 0.0
    eval_nms_iou: float = 0.6


@dataclass
class TrainConfig:
    """Optimisation and trainer settings; see :class:`e2edet.engine.trainer.Trainer`.

    ``batch_size`` is per process (the published COCO recipes use 2 per GPU on 8 GPUs). ``max_iters`` > 0
    overrides ``epochs``; ``steps`` are fractions of the total iterations where the lr is multiplied by
    ``gamma``. ``amp`` enables bf16 autocast on CUDA only. ``checkpoint_period`` writes ``checkpoints/last``
    every that many epochs, ``checkpoint_every`` also every that many iterations (0 = only at epoch ends).
    """

    epochs: int = 12
    max_iters: int = 0
    batch_size: int = 4
    workers: int = 2
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    schedule: str = "multistep"
    steps: tuple[float, ...] = (0.667, 0.889)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0
    amp: bool = True
    seed: int = 42
    log_period: int = 20
    eval_period: int = 1
    checkpoint_period: int = 1
    checkpoint_every: int = 0
    device: str = "auto"


@dataclass
class Config:
    """A whole experiment: the recipe name, where runs go, and the five sections."""

    name: str = "experiment"
    description: str = ""
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    test: TestConfig = field(default_factory=TestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

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
}

CHOICES = {
    "model.arch": ("dense", "sparse_rcnn", "adamixer"),
    "model.proposal_init": ("", "whole", "grid"),
    "model.stage_init": ("official", "adamixer"),
    "loss.assigner": ("fcos", "poto", "poto_argmax", "o2f"),
    "loss.score": ("cls", "cls_filter", "cls_ctr"),
    "loss.coord_dist": ("cauchy", "gaussian", "student_t"),
    "test.score": ("cls", "cls_filter", "cls_ctr_sqrt", "cls_ctr", "drmm"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("multistep", "cosine"),
}


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (tuples become lists), suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a :class:`Config` from a nested dict, validating every key and value.

    Raises:
        ConfigError: unknown section or key (with a close-match suggestion), wrong type, or bad choice;
            the message names ``source`` and the dotted key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    cfg = Config()
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                set_value(cfg, f"{key}.{sub}", v, source)
        else:
            set_value(cfg, key, value, source)
    validate(cfg, source)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a YAML config file written by :func:`save_config` (or by hand).

    Raises:
        ConfigError: missing file, invalid YAML, or invalid keys/values (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from e
    if data is None:
        raise ConfigError(f"{path}: config file is empty")
    return from_dict(data, str(path))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML (atomically, :func:`e2edet.utils.io.atomic_write_text`)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _all_keys() -> list[str]:
    cfg = Config()
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            keys.append(f.name)
    return keys + list(ALIASES)


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is tuple:
        (inner, _) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, inner, key, source) for v in value)
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} expects true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{source}: {key} expects an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} expects a number, got {value!r}")
        return float(value)
    if typ is str:
        return "" if value is None else str(value)
    raise ConfigError(f"{source}: {key} has an unsupported type {typ}")


def set_value(cfg: Config, key: str, value: Any, source: str = "<override>") -> None:
    """Set the dotted ``key`` (or an alias from :data:`ALIASES`) of ``cfg`` to ``value``, type-checked.

    String values are parsed as YAML scalars (``6`` → int, ``1e-3`` → float, ``true`` → bool); tuple fields accept
    ``640,672,704`` or ``[640, 672]``.

    Raises:
        ConfigError: unknown key (with suggestions) or a value of the wrong type.
    """
    key = ALIASES.get(key, key)
    parts = key.split(".")
    obj: Any = cfg
    for p in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            obj = None
            break
        obj = getattr(obj, p)
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    if parts[-1] not in fields or dataclasses.is_dataclass(getattr(obj, parts[-1])):
        close = difflib.get_close_matches(key, _all_keys(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{key}'{hint} (see `e2edet recipes show NAME`)")
    hints = typing.get_type_hints(type(obj))
    if isinstance(value, str) and hints[parts[-1]] is not str and typing.get_origin(hints[parts[-1]]) is not tuple:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: cannot parse value of {key}: {value!r}") from e
    setattr(obj, parts[-1], _coerce(value, hints[parts[-1]], key, source))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a copy of ``cfg`` with ``key=value`` strings (dotted keys or aliases) applied in order, validated.

    Raises:
        ConfigError: an item without ``=``, an unknown key, or an invalid value.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=6)")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip(), "command line")
    validate(cfg, "command line")
    return cfg


def validate(cfg: Config, source: str = "<config>") -> None:
    """Check choices and ranges that types alone cannot express.

    Checks the :data:`CHOICES`, the numeric :data:`RANGES` (and that floats are finite), the syntax of
    ``train.device`` (:func:`parse_device`) and the combinations of keys the models and losses need.

    Raises:
        ConfigError: naming the key, the bad value and the accepted values.
    """
    for key, choices in CHOICES.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value not in choices:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {', '.join(choices)}")
    t = cfg.train
    check_ranges(cfg, source)
    try:
        parse_device(t.device, "train.device")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if t.epochs <= 0 and t.max_iters <= 0:
        raise ConfigError(f"{source}: set train.epochs > 0 or train.max_iters > 0")
    if not cfg.data.train_min_sizes:
        raise ConfigError(f"{source}: data.train_min_sizes must list at least one size")
    if any(not 0 < s < 1 for s in t.steps):
        raise ConfigError(f"{source}: train.steps are fractions of the schedule in (0, 1), got {t.steps}")
    m = cfg.model
    if m.class_names and m.num_classes and len(m.class_names) != m.num_classes:
        raise ConfigError(f"{source}: model.num_classes={m.num_classes} but model.class_names lists "
                          f"{len(m.class_names)} names")
    if m.arch != "dense":
        if (cfg.test.score == "drmm") != m.drmm or cfg.test.score not in ("cls", "drmm"):
            raise ConfigError(f"{source}: query detectors score with test.score=cls (sigmoid), or test.score=drmm "
                              f"together with model.drmm=true; got test.score={cfg.test.score}, model.drmm={m.drmm}")
        if m.fpn_channels % m.num_heads or (m.arch == "adamixer" and m.fpn_channels % m.num_groups):
            raise ConfigError(f"{source}: model.fpn_channels={m.fpn_channels} must be divisible by model.num_heads "
                              f"({m.num_heads}) and, for AdaMixer, model.num_groups ({m.num_groups})")
        return
    if m.drmm or cfg.test.score == "drmm":
        raise ConfigError(f"{source}: D-RMM (model.drmm, test.score=drmm) needs a query detector "
                          "(model.arch=sparse_rcnn or adamixer)")
    if cfg.loss.score == "cls_filter" and not m.max_filter:
        raise ConfigError(f"{source}: loss.score=cls_filter needs model.max_filter=true (the 3DMF filter branch)")
    for key, score in (("test.score", cfg.test.score), ("loss.score", cfg.loss.score)):
        if score in ("cls_ctr_sqrt", "cls_ctr") and not m.centerness:
            raise ConfigError(f"{source}: {key}={score} needs model.centerness=true")
    if cfg.loss.assigner == "fcos" and not m.centerness:
        raise ConfigError(f"{source}: loss.assigner=fcos needs model.centerness=true (FCOS centerness loss)")
    if cfg.loss.assigner == "o2f" and cfg.loss.score != "cls_ctr":
        raise ConfigError(f"{source}: loss.assigner=o2f goes with loss.score=cls_ctr (the joint cls x ctr score)")
    if cfg.loss.assigner == "fcos" and cfg.loss.score != "cls":
        raise ConfigError(f"{source}: loss.assigner=fcos trains on loss.score=cls (the product scores need POTO/O2F)")
