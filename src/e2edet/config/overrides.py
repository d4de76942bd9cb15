"""Dotted command-line overrides (``train.epochs=6``, aliases such as ``data=bccd``) applied to a config."""

from __future__ import annotations

import copy
import typing
from typing import Any

import yaml

from e2edet.archs import ARCHITECTURES
from e2edet.config.io import from_dict, to_dict, unknown_key_error
from e2edet.config.sections import ALIASES, TOP_KEYS, Config, section_types
from e2edet.config_checks import ConfigError, Section, choices

__all__ = ["apply_overrides", "overrides_for_arch"]


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
        if not name and section in TOP_KEYS:
            data[section] = value
            continue
        cls = section_types(arch).get(section)
        if cls is None or name not in cls.model_fields:
            raise unknown_key_error(key, arch, source)
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
        foreign = section in ("model", "loss") and key != "model.arch"
        if foreign and name not in section_types(arch)[section].model_fields:
            if any(name in section_types(a)[section].model_fields for a in ARCHITECTURES):
                continue
        kept.append(item)
    return kept
