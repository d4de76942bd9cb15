"""The recipe registry: :func:`register_recipe` (used by the recipe modules), :func:`list_recipes`, :func:`get_recipe`.

Kept apart from ``e2edet/recipes/__init__.py`` so that a recipe module (:mod:`e2edet.recipes.dense`, ...) imports
the registry and the package imports the recipe modules, without an import cycle.
"""

from __future__ import annotations

import difflib
from typing import Callable

from e2edet.config import Config, ConfigError, validate

__all__ = ["register_recipe", "list_recipes", "get_recipe"]

_REGISTRY: dict[str, Callable[[], Config]] = {}


def register_recipe(fn: Callable[[], Config]) -> Callable[[], Config]:
    """Decorator: register a zero-argument function returning a :class:`Config` under ``cfg.name``.

    Raises:
        ValueError: two recipes with the same name.
    """
    name = fn().name
    if name in _REGISTRY:
        raise ValueError(f"recipe '{name}' is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_recipes() -> list[tuple[str, str]]:
    """All registered recipes as ``(name, description)``, in registration order."""
    return [(name, fn().description) for name, fn in _REGISTRY.items()]


def get_recipe(name: str) -> Config:
    """A new, validated :class:`Config` of recipe ``name``.

    Raises:
        ConfigError: unknown recipe name (the message suggests up to 3 close names, ``difflib``).
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "a recipe name or a config .yaml file"
        raise ConfigError(f"unknown recipe '{name}': {hint} (`e2edet recipes` lists all {len(_REGISTRY)})")
    cfg = _REGISTRY[name]()
    validate(cfg, f"recipe {name}")
    return cfg
