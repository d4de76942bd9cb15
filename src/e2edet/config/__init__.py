"""Typed experiment configuration: pydantic sections, YAML load/save and dotted command-line overrides.

A :class:`Config` has five sections (``data``, ``model``, ``loss``, ``test``, ``train``). ``model.arch`` chooses the
architecture (:data:`e2edet.archs.ARCHITECTURES`) and with it the typed ``model`` and ``loss`` sections: a key of
another architecture is an error naming the architectures it belongs to. Recipes (:mod:`e2edet.recipes`) build
named configs; the command line changes single fields with dotted overrides such as ``train.epochs=6
data.dataset=bccd`` (a few short aliases like ``data=`` and ``epochs=`` exist, see :data:`ALIASES`). Every unknown
key or bad value raises :class:`ConfigError` naming the key.

Modules: :mod:`~e2edet.config.sections` (the sections, :class:`Config`, :func:`validate`), :mod:`~e2edet.config.io`
(dicts and YAML files, including the flat format of old runs) and :mod:`~e2edet.config.overrides` (the command line).
"""

from e2edet.config.io import from_dict, load_config, save_config, to_dict
from e2edet.config.overrides import apply_overrides, overrides_for_arch
from e2edet.config.sections import (ALIASES, Config, DataConfig, TestConfig, TrainConfig, ranges, section_types,
                                    validate)
from e2edet.config_checks import DEVICE_FORMS, ConfigError, parse_device

__all__ = [
    "Config", "ConfigError", "DataConfig", "TestConfig", "TrainConfig", "ALIASES", "DEVICE_FORMS", "apply_overrides",
    "from_dict", "load_config", "overrides_for_arch", "parse_device", "ranges", "save_config", "section_types",
    "to_dict", "validate",
]
