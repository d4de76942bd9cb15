"""A :class:`~e2edet.config.sections.Config` to and from plain dicts and YAML files, with one-line errors naming the
file and the dotted key (close matches, or the architecture a key belongs to).

Config files written before the per-architecture sections (every architecture's keys in one flat ``model`` and
``loss`` section, up to commit ``c2b5238``) still load: :func:`from_dict` recognises them by their complete flat key
set and drops the keys of the other architectures, which that code ignored.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from e2edet.archs import ARCHITECTURES
from e2edet.config.sections import ALIASES, COMMON_SECTIONS, TOP_KEYS, Config, section_types, validate
from e2edet.config_checks import ConfigError, validation_message
from e2edet.utils.io import atomic_write_text

__all__ = ["from_dict", "load_config", "save_config", "to_dict", "unknown_key_error"]

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
    keys = list(TOP_KEYS) + ["data", "model", "loss", "test", "train"]
    keys += [f"{s}.{k}" for s, cls in COMMON_SECTIONS.items() for k in cls.model_fields]
    for a in ARCHITECTURES.values():
        keys += [f"{s}.{k}" for s, cls in (("model", a.model_section), ("loss", a.loss_section))
                 for k in cls.model_fields]
    return list(dict.fromkeys(keys)) + list(ALIASES)


def unknown_key_error(key: str, arch: str, source: str) -> ConfigError:
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
        if key in TOP_KEYS:
            fields[key] = "" if value is None else str(value)
            continue
        sections = section_types(arch)
        if key not in sections:
            raise unknown_key_error(key, arch, source)
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping of keys, got {value!r}")
        cls = sections[key]
        for name in value:
            if name not in cls.model_fields:
                raise unknown_key_error(f"{key}.{name}", arch, source)
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
