"""Typed experiment configuration: pydantic sections, YAML load/save and dotted command-line overrides.

A :class:`Config` has five sections (``data``, ``model``, ``loss``, ``test``, ``train``). ``model.arch`` chooses the
architecture (:data:`e2edet.archs.ARCHITECTURES`) and with it the typed ``model`` and ``loss`` sections: a key of
another architecture is an error naming the architectures it belongs to. Recipes (:mod:`e2edet.recipes`) build
named configs; the command line changes single fields with dotted overrides such as ``train.epochs=6
data.dataset=bccd`` (a few short aliases like ``data=`` and ``epochs=`` exist, see :data:`ALIASES`). Every unknown
key or bad value raises :class:`ConfigError` naming the key.

Config files written before the per-architecture sections (every architecture's keys in one flat ``model`` and
``loss`` section, up to commit ``c2b5238``) still load: :func:`from_dict` recognises them by their complete flat key
set and drops the keys of the other architectures, which that code ignored.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from e2edet.archs import ARCHITECTURES
from e2edet.config_checks import (DEVICE_FORMS, ConfigError, Float, Int, Section, choices, field_range, parse_device,
                                  validation_message)
from e2edet.utils.io import atomic_write_text

__all__ = [
    "Config", "ConfigError", "DataConfig", "TestConfig", "TrainConfig", "ALIASES", "DEVICE_FORMS", "apply_overrides",
    "from_dict", "load_config", "overrides_for_arch", "parse_device", "ranges", "save_config", "section_types", "to_dict", "validate",
]


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
_TOP = ("name", "description", "output_dir")
_COMMON = {"data": DataConfig, "test": TestConfig, "train": TrainConfig}
#: The flat sections written up to commit c2b5238: a file whose model/loss section holds all these keys is of that
#: format (see the module docstring).
_FLAT_MODEL_KEYS = frozenset(
    "arch backbone pretrained freeze_at fpn_channels num_convs centerness ctr_convs ctr_channels max_filter "
    "max_filter_gn num_queries num_stages num_heads dim_feedforward dynamic_dim stage_init num_groups in_points "
    "out_points dropout proposal_init drmm num_classes class_names".split())
_FLAT_LOSS_KEYS = frozenset(
    "assigner score aux focal_alpha focal_gamma reg_weight poto_alpha center_radius aux_topk aux_weight "
    "keep_infeasible o2f_topk soft_weight max_soft_weight max_t min_t o2f_neg_weight cls_weight l1_weight "
    "giou_weight min_scale_ratio mm_weight mcm_weight prob_weight coord_dist".split())


def section_types(arch: str) -> dict[str, type[Section]]:
    """The section classes of a config of architecture ``arch``: ``{data, model, loss, test, train}``."""
    a = ARCHITECTURES[arch]
    return {"data": DataConfig, "model": a.model_section, "loss": a.loss_section, "test": TestConfig,
            "train": TrainConfig}


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (tuples become lists), suitable for YAML/JSON: only the keys of its
    architecture."""

    def conv(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg.model_dump())


def _all_keys() -> list[str]:
    """Every dotted key of every architecture, and the aliases (for suggestions)."""
    keys = list(_TOP) + ["data", "model", "loss", "test", "train"]
    keys += [f"{s}.{k}" for s, cls in _COMMON.items() for k in cls.model_fields]
    for a in ARCHITECTURES.values():
        keys += [f"{s}.{k}" for s, cls in (("model", a.model_section), ("loss", a.loss_section))
                 for k in cls.model_fields]
    return list(dict.fromkeys(keys)) + list(ALIASES)


def _unknown_key(key: str, arch: str, source: str) -> ConfigError:
    """The error for ``key``: where it belongs when another architecture has it, else close matches."""
    section, _, name = key.partition(".")
    if section in ("model", "loss"):
        owners = [a.name for a in ARCHITECTURES.values()
                  if name in getattr(a, f"{section}_section").model_fields and a.name != arch]
        if owners:
            return ConfigError(f"{source}: {key} belongs to model.arch={' or '.join(owners)}, not to "
                               f"model.arch={arch} (see `e2edet recipes show NAME` for the keys of a recipe)")
    close = difflib.get_close_matches(key, _all_keys(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint} (see `e2edet recipes show NAME`)")


def _drop_flat_keys(data: dict[str, Any], arch: str) -> dict[str, Any]:
    """A config of the flat format (module docstring) without the keys of other architectures."""
    out = dict(data)
    for section, flat in (("model", _FLAT_MODEL_KEYS), ("loss", _FLAT_LOSS_KEYS)):
        values = out.get(section)
        if isinstance(values, dict) and flat <= set(values):
            own = section_types(arch)[section].model_fields
            out[section] = {k: v for k, v in values.items() if k in own}
    return out


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a :class:`Config` from a nested dict, validating every key and value.

    Raises:
        ConfigError: unknown section or key (with close matches, or the architecture it belongs to), wrong type,
            bad choice or out-of-range value; the message names ``source`` and the dotted key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: model must be a mapping of keys, got {type(model).__name__}")
    arch = model.get("arch", "dense")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: model.arch={arch!r} is not one of {', '.join(ARCHITECTURES)}")
    data = _drop_flat_keys(data, arch)
    fields: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TOP:
            fields[key] = "" if value is None else str(value)
            continue
        sections = section_types(arch)
        if key not in sections:
            raise _unknown_key(key, arch, source)
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping of keys, got {value!r}")
        cls = sections[key]
        for name in value:
            if name not in cls.model_fields:
                raise _unknown_key(f"{key}.{name}", arch, source)
        try:
            fields[key] = cls.model_validate(value)
        except ValidationError as err:
            raise ConfigError(f"{source}: {validation_message(err, cls, key, value)}") from None
    cfg = Config(**fields)
    validate(cfg, source)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a YAML config file written by :func:`save_config` (or by hand, or by an earlier version: see the module
    docstring).

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


def _parse_value(cls: type[Section], name: str, value: str, key: str, source: str) -> Any:
    """A command-line string as the field's type: text stays text, a tuple field splits ``640,672`` or reads
    ``[640, 672]``, anything else is a YAML scalar (``6`` -> int, ``1e-3`` -> float, ``true`` -> bool)."""
    annotation = cls.model_fields[name].annotation
    if annotation is str or choices(cls, name) is not None:
        return value
    try:
        if typing.get_origin(annotation) is tuple:
            items = [v for v in value.strip("[]() ").split(",") if v.strip()]
            return [v.strip() if typing.get_args(annotation)[0] is str else yaml.safe_load(v) for v in items]
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: cannot parse value of {key}: {value!r}") from e


def _switch_arch(data: dict[str, Any], arch: str, source: str) -> None:
    """Make ``data`` (a :func:`to_dict` dict) of architecture ``arch``: its ``model`` and ``loss`` sections keep the
    keys both architectures have; the others start from ``arch``'s defaults."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: model.arch={arch!r} is not one of {', '.join(ARCHITECTURES)}")
    for section, cls in (("model", ARCHITECTURES[arch].model_section), ("loss", ARCHITECTURES[arch].loss_section)):
        data[section] = {k: v for k, v in data.get(section, {}).items() if k in cls.model_fields}
    data["model"]["arch"] = arch


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a copy of ``cfg`` with ``key=value`` strings (dotted keys or aliases) applied, validated.

    ``model.arch=NAME`` is applied first: the ``model`` and ``loss`` keys both architectures have are kept, the others
    take ``NAME``'s defaults. The other overrides are applied in order.

    Raises:
        ConfigError: an item without ``=``, an unknown or misplaced key, or an invalid value.
    """
    source = "command line"
    data = copy.deepcopy(to_dict(cfg))
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=6)")
        key, value = item.split("=", 1)
        pairs.append((ALIASES.get(key.strip(), key.strip()), value.strip()))
    for key, value in pairs:
        if key == "model.arch":
            _switch_arch(data, value, source)
    arch = data["model"]["arch"]
    for key, value in pairs:
        section, _, name = key.partition(".")
        if key == "model.arch":
            continue
        if not name and section in _TOP:
            data[section] = value
            continue
        cls = section_types(arch).get(section)
        if cls is None or name not in cls.model_fields:
            raise _unknown_key(key, arch, source)
        data[section][name] = _parse_value(cls, name, value, key, source)
    return from_dict(data, source)


def overrides_for_arch(overrides: list[str] | tuple[str, ...], arch: str) -> list[str]:
    """The items of ``overrides`` for a config of architecture ``arch``: a ``model.``/``loss.`` key that ``arch``
    lacks but another architecture has is left out (``e2edet compare`` gives one list to recipes of several
    architectures). Everything else is kept, so that :func:`apply_overrides` still reports unknown keys."""
    kept = []
    for item in overrides:
        key = ALIASES.get(item.split("=", 1)[0].strip(), item.split("=", 1)[0].strip())
        section, _, name = key.partition(".")
        if section in ("model", "loss") and key != "model.arch" and name not in section_types(arch)[section].model_fields:
            if any(name in section_types(a)[section].model_fields for a in ARCHITECTURES):
                continue
        kept.append(item)
    return kept


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
