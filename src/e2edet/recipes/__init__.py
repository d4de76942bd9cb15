"""Named, registered experiment presets.

``list_recipes()`` gives ``(name, description)`` pairs; ``get_recipe(name)`` returns a fresh
:class:`e2edet.config.Config`. ``e2edet recipes`` prints them and ``e2edet recipes show NAME`` prints one as YAML.
"""

from __future__ import annotations

from typing import Callable

from e2edet.config import Config, ConfigError, validate

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
        ConfigError: unknown recipe name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown recipe '{name}'; known recipes: {', '.join(_REGISTRY)} (see `e2edet recipes`)")
    cfg = _REGISTRY[name]()
    validate(cfg, f"recipe {name}")
    return cfg


from e2edet.recipes import dense, query  # noqa: E402,F401  (registers the dense and query recipes)
