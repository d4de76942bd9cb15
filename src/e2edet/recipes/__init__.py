"""Named, registered experiment presets.

``list_recipes()`` gives ``(name, description)`` pairs; ``get_recipe(name)`` returns a fresh
:class:`e2edet.config.Config`; ``load_recipe_or_file(spec)`` accepts a recipe name or a config YAML.
``e2edet recipes`` prints them and ``e2edet recipes show NAME`` prints one as YAML.

The registry lives in :mod:`e2edet.recipes.registry`; a recipe module imports ``register_recipe`` from there and is
imported below, which registers its recipes.
"""

from __future__ import annotations

from pathlib import Path

from e2edet.config import Config, load_config
from e2edet.recipes import dense, detr, query  # noqa: F401  (registers the dense, query and DETR recipes)
from e2edet.recipes.registry import get_recipe, list_recipes, register_recipe

__all__ = ["register_recipe", "list_recipes", "get_recipe", "load_recipe_or_file"]


def load_recipe_or_file(spec: str) -> Config:
    """The config named by ``spec``: a config YAML file (``.yaml``/``.yml`` or an existing file) or a recipe name.

    Raises:
        ConfigError: an unknown recipe name, or an unreadable/invalid config file
            (see :func:`e2edet.config.load_config` and :func:`get_recipe`).
    """
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        return load_config(spec)
    return get_recipe(spec)
