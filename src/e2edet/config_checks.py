"""Building blocks of the typed configuration: the :class:`ConfigError` type, the pydantic base class of every config
section (:class:`Section`), the number types, one-line error messages from pydantic errors
(:func:`validation_message`) and the syntax of device settings (:func:`parse_device`).

Imports nothing from e2edet, so the config module, the architecture sections (:mod:`e2edet.archs`) and the engine can
all build on it. Value ranges are pydantic field constraints (``Field(ge=1)``); :func:`field_range` reads them back
for messages and documentation.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

__all__ = ["ConfigError", "DEVICE_FORMS", "Float", "Int", "Section", "field_range", "parse_device",
           "validation_message"]


class ConfigError(ValueError):
    """A configuration key or value is invalid (unknown key, wrong type, bad choice)."""


def _no_bool(value: Any) -> Any:
    """YAML ``true`` is a bool, and pydantic's lax mode would read it as 1: refuse it for numbers."""
    if isinstance(value, bool):
        raise ValueError("bool_for_number")
    return value


#: An integer field: accepts ``6``, ``6.0`` and ``"6"``; refuses ``6.5`` and ``true``.
Int = Annotated[int, BeforeValidator(_no_bool)]
#: A float field: accepts ``1``, ``1e-3`` and ``"1e-3"`` (YAML 1.1 reads that as a string); refuses ``true``,
#: ``nan`` and ``inf`` (every section has ``allow_inf_nan=False``).
Float = Annotated[float, BeforeValidator(_no_bool)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, floats must be finite, a number given for a text field
    becomes text (``device: 0``). Assignment is not validated (recipes set fields one by one);
    :func:`e2edet.config.validate` checks a whole config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True,
                              validate_default=False)


def field_range(section: type[BaseModel], name: str) -> tuple[float | None, float | None, bool, bool] | None:
    """``(low, high, low inclusive, high inclusive)`` of field ``name`` of ``section`` (the constraints of the field,
    or of the items of a tuple field), ``None`` when it has none."""
    info = section.model_fields[name]
    metadata = list(info.metadata)
    args = typing.get_args(info.annotation)
    if typing.get_origin(info.annotation) is tuple and args:
        inner = args[0]
        for m in getattr(inner, "__metadata__", ()):
            metadata += list(m.metadata) if isinstance(m, FieldInfo) else [m]
    low = high = None
    low_inc = high_inc = True
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            low, low_inc = m.ge, True
        elif isinstance(m, annotated_types.Gt):
            low, low_inc = m.gt, False
        elif isinstance(m, annotated_types.Le):
            high, high_inc = m.le, True
        elif isinstance(m, annotated_types.Lt):
            high, high_inc = m.lt, False
    if low is None and high is None:
        return None
    return low, high, low_inc, high_inc


def range_text(low: float | None, high: float | None, low_inc: bool, high_inc: bool) -> str:
    """``> 0``, ``>= 1``, ``in [0, 1)``... for an error message."""
    if high is None:
        return f"{'>=' if low_inc else '>'} {low:g}"
    if low is None:
        return f"{'<=' if high_inc else '<'} {high:g}"
    return f"in {'[' if low_inc else '('}{low:g}, {high:g}{']' if high_inc else ')'}"


def choices(section: type[BaseModel], name: str) -> tuple[Any, ...] | None:
    """The accepted values of a ``Literal`` field, else ``None``."""
    annotation = section.model_fields[name].annotation
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


_TYPE_WORDS = {"int": "expects an integer", "float": "expects a number", "bool": "expects true/false",
               "string": "expects text", "tuple": "expects a list", "list": "expects a list"}


def validation_message(err: ValidationError, section: type[BaseModel], prefix: str, data: dict) -> str:
    """One line for the first error of ``err``, raised while validating ``data`` as ``section`` (whose dotted name
    is ``prefix``, e.g. ``model``): ``model.num_queries must be >= 1, got 0``, ``train.epochs expects an integer,
    got 'abc'``, ``loss.assigner='x' is not one of fcos, poto``..."""
    first = err.errors()[0]
    loc = [p for p in first["loc"] if isinstance(p, str)]
    name = loc[0] if loc else ""
    key = f"{prefix}.{name}" if prefix and name else (prefix or name)
    kind, value = first["type"], data.get(name, first.get("input"))
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'"
    if kind == "literal_error" and name in section.model_fields:
        return f"{key}={value!r} is not one of {', '.join(map(str, choices(section, name) or ()))}"
    if kind == "too_short":
        return f"{key} must list at least {first.get('ctx', {}).get('min_length', 1)} value(s), got {_show(value)}"
    if kind == "finite_number":
        return f"{key} must be a finite number, got {_show(value)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and name in section.model_fields:
        bounds = field_range(section, name)
        if bounds is not None:
            return f"{key} must be {range_text(*bounds)}, got {_show(value)}"
    if kind == "value_error" and "bool_for_number" in first["msg"]:
        annotation = section.model_fields[name].annotation if name in section.model_fields else int
        word = "an integer" if int in (annotation, *typing.get_args(annotation)) else "a number"
        return f"{key} expects {word}, got {value!r}"
    for stem, words in _TYPE_WORDS.items():
        if kind.startswith(stem):
            return f"{key} {words}, got {first.get('input')!r}"
    return f"{key}: {first['msg']}"


def _show(value: Any) -> str:
    """A value as the range messages print it (tuples as ``(0.5, 1.5)``)."""
    return str(tuple(value)) if isinstance(value, list) else str(value)


#: Device settings :func:`parse_device` accepts (the message of a bad one lists them).
DEVICE_FORMS = "auto, cpu, cuda, cuda:N, N (= cuda:N) or mps"


def parse_device(spec: Any, key: str = "train.device") -> tuple[str, int | None]:
    """Check the syntax of a device setting, as torch and Ultralytics users write it (no hardware check).

    Accepted (case-insensitive): ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``N`` (a bare GPU index, = ``cuda:N``),
    ``mps`` and ``mps:0``. Whether the device exists is checked by :func:`e2edet.engine.device.select_device`.

    Args:
        spec: the setting; key: its name in messages (``train.device``, ``--device``).
    Returns:
        ``(kind, index)``: kind ``auto``, ``cpu``, ``cuda`` or ``mps``; index the explicit device index or None.
    Raises:
        ConfigError: naming ``key`` and the accepted forms (``gpu``, ``tpu``, ``cuda:x``, ``0,1``...).
    """
    text = str(spec).strip().lower()
    if text in ("auto", "cpu", "cuda", "mps"):
        return text, None
    if text.isdigit():
        return "cuda", int(text)
    kind, sep, index = text.partition(":")
    if sep and kind in ("cuda", "mps"):
        if index.isdigit() and kind == "mps" and int(index) != 0:
            raise ConfigError(f"{key}={spec!r}: Apple MPS has a single device, write mps")
        if index.isdigit():
            return kind, int(index)
        raise ConfigError(f"{key}={spec!r}: the device index must be a number, e.g. {kind}:0 "
                          f"(accepted: {DEVICE_FORMS})")
    if "," in text:
        raise ConfigError(f"{key}={spec!r}: one device per process (for several GPUs launch "
                          f"`torchrun --nproc_per_node N -m e2edet train ...`); accepted: {DEVICE_FORMS}")
    hint = "; for a GPU write cuda or 0" if text in ("gpu", "nvidia", "cuda0") else ""
    raise ConfigError(f"{key}={spec!r} is not a device (accepted: {DEVICE_FORMS}){hint}")
