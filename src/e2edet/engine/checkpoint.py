"""Checkpoints: ``checkpoints/<tag>/model.safetensors`` + ``state.pt``, written atomically.

Layout of one checkpoint directory (``tag`` is ``"last"`` or ``"best"``)::

    <run_dir>/checkpoints/<tag>/model.safetensors   weights of the unwrapped model; metadata
                                                   {"format": "e2edet-v1", "e2edet_config": <JSON run config>}
    <run_dir>/checkpoints/<tag>/state.pt            {"format", "optimizer", "scheduler", "trainer_state"}
                                                   (+ "model": the trained weights, when model.safetensors
                                                   holds their EMA, ``train.ema``)

Both files are first written to a hidden temporary sibling (``checkpoints/.<tag>.tmp``), which then replaces
``<tag>``: the previous checkpoint is renamed to ``.<tag>.old`` and deleted only after the new directory is in
place, and a crash between the two renames is repaired on the next save or load. A failure while writing
leaves the previous checkpoint untouched and removes the partial directory.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from e2edet.config_checks import ConfigError
from e2edet.utils import error_text

FORMAT = "e2edet-v1"
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "state.pt"


class WeightsError(ValueError):
    """A weights file cannot be used: unreadable or not safetensors, another format version, bad metadata, or
    tensors holding NaN/inf. The one-line message starts with the file."""


class WeightsMismatchError(WeightsError, RuntimeError):
    """Weights do not fit the model they are loaded into (missing, unexpected or mis-shaped tensors), e.g. a
    checkpoint of another recipe or class count. One line: the file, the counts and the first keys of each kind.
    Also a ``RuntimeError``, which :func:`load_model_weights` raised before."""


def _first(keys: list[str], n: int = 3) -> str:
    """``a, b, c, ...`` (the first ``n`` keys)."""
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else ("es" if word.endswith("h") else "s"))


def weights_mismatch(target: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """Compare the tensor shapes a model expects with those of a weights file.

    Args:
        target: ``key -> shape`` of the model's state dict; found: ``key -> shape`` of the file.
    Returns:
        None when they agree, else one line such as ``"2 missing keys (head.cls.weight, head.cls.bias),
        1 shape mismatch (head.cls.weight: file (2, 32, 3, 3) vs model (5, 32, 3, 3))"``.
    """
    missing = sorted(set(target) - set(found))
    unexpected = sorted(set(found) - set(target))
    mismatched = sorted(f"{k}: file {tuple(v)} vs model {tuple(target[k])}"
                        for k, v in found.items() if k in target and tuple(v) != tuple(target[k]))
    parts = [f"{_plural(len(keys), word)} ({_first(keys)})"
             for word, keys in (("missing key", missing), ("unexpected key", unexpected),
                                ("shape mismatch", mismatched)) if keys]
    return ", ".join(parts) or None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers (``model`` itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _weights_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous copy-on-share state dict that ``safetensors.save_file`` accepts (tied weights cloned)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in unwrap_model(model).state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _repair(root: Path, tag: str) -> None:
    """Undo a crash that happened between renaming ``<tag>`` away and renaming the new one into place."""
    final, old = root / tag, root / f".{tag}.old"
    if old.is_dir():
        if final.is_dir():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


def save_checkpoint(
    run_dir: str | Path,
    tag: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    trainer_state: dict[str, Any],
    config: dict[str, Any] | None,
    ema: nn.Module | None = None,
) -> Path:
    """Atomically write ``<run_dir>/checkpoints/<tag>/`` (call on the main process only).

    Args:
        run_dir: run directory (created if needed).
        tag: checkpoint name, e.g. ``"last"`` or ``"best"``.
        model: the model (DDP/DataParallel wrappers are removed, so keys carry no ``module.`` prefix).
        optimizer, scheduler: objects with ``state_dict()``, or ``None``.
        trainer_state: loop state (epoch, iteration, best metric, RNG states, ...); tensors, lists, dicts,
            strings and numbers only, so it loads with ``torch.load(weights_only=True)``.
        config: JSON-serialisable run configuration stored in the weights' metadata (``None`` stores ``{}``).
        ema: the EMA copy of ``model`` (:func:`e2edet.engine.ema.build_ema`; its ``module`` is saved), or None.
            When given, ``model.safetensors`` holds the EMA weights (what evaluation, prediction and export use)
            and ``state.pt`` the trained weights under ``"model"`` (for an exact resume).
    Returns:
        Path of the written checkpoint directory.
    Raises:
        ValueError: ``tag`` is empty or contains a path separator. Errors while writing are re-raised after the
        partial directory is removed.
    """
    if not tag or "/" in tag or os.sep in tag or tag.startswith("."):
        raise ValueError(f"invalid checkpoint tag {tag!r}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _repair(root, tag)
    final, tmp, old = root / tag, root / f".{tag}.tmp", root / f".{tag}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        metadata = {"format": FORMAT, "e2edet_config": json.dumps(config or {})}
        deployed = model if ema is None else getattr(ema, "module", ema)
        save_file(_weights_dict(deployed), str(tmp / WEIGHTS_NAME), metadata=metadata)
        state = {
            "format": FORMAT,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "trainer_state": trainer_state,
        }
        if ema is not None:
            state["model"] = _weights_dict(model)
        torch.save(state, tmp / STATE_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_weights_file(path: str | Path, prefer: tuple[str, ...] = ("best", "last")) -> Path:
    """Find ``model.safetensors`` from a run dir, a checkpoint dir, or the file itself.

    Args:
        path: ``<run_dir>`` (uses the first existing tag in ``prefer``), ``<run_dir>/checkpoints``,
            ``<run_dir>/checkpoints/<tag>`` or a ``.safetensors`` file.
        prefer: checkpoint tags tried in order when ``path`` is a run directory.
    Raises:
        FileNotFoundError: naming ``path`` and the locations that were tried.
    """
    p = Path(path)
    if p.is_file():
        return p
    candidates = [p / WEIGHTS_NAME]
    for root in (p / "checkpoints", p):
        if root.is_dir():
            for tag in prefer:
                _repair(root, tag)
        candidates += [root / tag / WEIGHTS_NAME for tag in prefer]
    for c in candidates:
        if c.is_file():
            return c
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} found for checkpoint path {p} (tried: {tried})")


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read weights and the stored run configuration.

    Args:
        path: run dir (``best`` preferred over ``last``), checkpoint dir or ``.safetensors`` file.
    Returns:
        ``(state_dict, config)``; ``config`` is ``None`` when the file has no ``e2edet_config`` metadata
        (a plain safetensors file).
    Raises:
        FileNotFoundError: nothing found at ``path``.
        WeightsError (a ``ValueError``): the file is not a readable safetensors file, was written by another format
            version, has invalid metadata, or holds NaN/inf values (the message names the first such tensor).
    """
    file, _, config = read_weights_header(path)
    try:
        state_dict = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{file} is not a readable safetensors weights file: {error_text(err)}") from err
    bad = [k for k in sorted(state_dict) if state_dict[k].is_floating_point()
           and not bool(torch.isfinite(state_dict[k]).all())]
    if bad:
        first = state_dict[bad[0]]
        n = int((~torch.isfinite(first)).sum())
        more = f" (and {_plural(len(bad) - 1, 'more tensor')})" if len(bad) > 1 else ""
        raise WeightsError(f"{file}: tensor {bad[0]} holds {n} non-finite value{'s' if n != 1 else ''} (NaN/inf)"
                           f"{more}; these weights are unusable (did the training diverge?)")
    return state_dict, config


def read_weights_header(path: str | Path) -> tuple[Path, dict[str, tuple[int, ...]], dict[str, Any] | None]:
    """Tensor names and shapes, and the stored run config, of a weights file, without reading the tensors.

    Args:
        path: as for :func:`load_weights`.
    Returns:
        ``(file, {key: shape}, config or None)``.
    Raises:
        FileNotFoundError: nothing found at ``path``.
        WeightsError: not a readable safetensors file, another format version, or invalid config metadata.
    """
    file = resolve_weights_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{file} is not a readable safetensors weights file: {error_text(err)}") from err
    fmt = metadata.get("format")
    if fmt is not None and fmt != FORMAT:
        raise WeightsError(f"{file} has checkpoint format {fmt!r}; this version of e2edet reads {FORMAT!r}")
    config = None
    if "e2edet_config" in metadata:
        try:
            config = json.loads(metadata["e2edet_config"])
        except json.JSONDecodeError as err:
            raise WeightsError(f"{file}: the e2edet_config metadata is not valid JSON: {err}") from err
        if not isinstance(config, dict):
            raise WeightsError(f"{file}: the e2edet_config metadata is a {type(config).__name__}, not a mapping")
    return file, shapes, config


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True,
                       source: str | Path = "state_dict") -> None:
    """Copy ``state_dict`` into ``model`` (wrappers removed) with key and shape checks.

    Args:
        model: destination model.
        state_dict: weights, e.g. from :func:`load_weights`.
        strict: if True, missing/unexpected keys and shape mismatches raise; if False they are skipped with a
            warning that lists them (e.g. fine-tuning with another number of classes).
        source: name of the origin (a path) used in messages.
    Raises:
        WeightsMismatchError (a ``RuntimeError``): (strict) one line ``"<source>: does not match the model: 2 missing
        keys (a, b), 1 shape mismatch (k: file (2, 4) vs model (5, 4))"`` (the first 3 keys of each kind).
    """
    target = unwrap_model(model).state_dict()
    problems = weights_mismatch({k: tuple(v.shape) for k, v in target.items()},
                                {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        msg = f"{source}: does not match the model: {problems}"
        if strict:
            raise WeightsMismatchError(msg + " (weights of another recipe or class count?)")
        warnings.warn(msg + " (non-strict load: these entries are skipped)", stacklevel=2)
    keep = {k: v for k, v in state_dict.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    unwrap_model(model).load_state_dict(keep, strict=False)


def load_checkpoint(
    path_or_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    strict: bool = True,
    ema: nn.Module | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` (for resuming training).

    Args:
        path_or_dir: run dir (uses ``checkpoints/last``), checkpoint dir, or its ``model.safetensors``.
        model: receives the trained weights: ``state.pt``'s ``"model"`` when the checkpoint was written with an
            EMA, else ``model.safetensors`` (see :func:`load_model_weights` for ``strict``).
        optimizer, scheduler: if given, their states are loaded from ``state.pt`` (required then).
        ema: the EMA copy (:func:`e2edet.engine.ema.build_ema`); its ``module`` receives ``model.safetensors``.
    Returns:
        The saved ``trainer_state`` dict (empty if only weights were requested and ``state.pt`` is absent).
    Raises:
        FileNotFoundError: missing weights, or missing ``state.pt`` when optimizer/scheduler are given.
        ValueError: unreadable/corrupt files or wrong format (the message names the file; :class:`WeightsError`
            for the weights file); resuming (optimizer given) a checkpoint written with an EMA without ``ema``, or
            the other way round (the message names ``train.ema`` and the checkpoint folder).
        WeightsMismatchError (a ``RuntimeError``): weights do not match the model (strict).
    """
    file = resolve_weights_file(path_or_dir, prefer=("last", "best"))
    state_file = file.parent / STATE_NAME
    state = _read_state(state_file) if state_file.is_file() else None
    state_dict, _ = load_weights(file)
    if state is None:
        if optimizer is not None or scheduler is not None:
            raise FileNotFoundError(f"cannot resume: {state_file} is missing (weights alone cannot resume)")
        state = {}
    trained = state.get("model")
    if (optimizer is not None or scheduler is not None) and (ema is None) != (trained is None):
        raise ValueError(f"cannot resume from {file.parent}: it was trained with train.ema="
                         f"{str(trained is not None).lower()}; resume with the setting it was trained with")
    load_model_weights(model, state_dict if trained is None else trained, strict=strict,
                       source=file if trained is None else state_file)
    if ema is not None:
        load_model_weights(getattr(ema, "module", ema), state_dict, strict=strict, source=file)
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is not None:
            if state.get(key) is None:
                raise ValueError(f"{state_file} holds no {key} state")
            obj.load_state_dict(state[key])
    return dict(state.get("trainer_state") or {})


def _read_state(state_file: Path) -> dict[str, Any]:
    """``state.pt`` as a dict, checked for the format. Raises ValueError naming the file."""
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{state_file} is corrupt or not an e2edet training state: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{state_file} has format {found!r}; expected {FORMAT!r}")
    return state


@dataclass(frozen=True)
class PartialLoad:
    """What :func:`load_matching_weights` did: tensor names of the model loaded from the file, re-initialised
    (``mismatched``: ``key -> (file shape, model shape)``; ``missing``: not in the file), and file tensors the model
    does not have (``ignored``). ``str()`` is the one-line report."""

    file: Path
    total: int
    loaded: tuple[str, ...]
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    missing: tuple[str, ...]
    ignored: tuple[str, ...]

    def __str__(self) -> str:
        line = f"loaded {len(self.loaded)}/{self.total} tensors from {self.file}"
        reinit = len(self.mismatched) + len(self.missing)
        if reinit:
            shapes = [f"{k} {list(a)} vs {list(b)}" for k, (a, b) in self.mismatched.items()]
            parts = [f"{what}: {_first(keys)}" for what, keys in (("shape mismatch", shapes),
                                                                   ("not in the file", list(self.missing))) if keys]
            line += f"; re-initialised {reinit} ({'; '.join(parts)})"
        if self.ignored:
            line += f"; ignored {len(self.ignored)} not in the model ({_first(list(self.ignored))})"
        return line


def load_matching_weights(model: nn.Module, path: str | Path, key: str = "train.weights") -> PartialLoad:
    """Fine-tuning start: copy every tensor of a weights file whose name and shape fit ``model`` (wrappers removed);
    the others (e.g. class logits of another class count) keep their fresh initialisation, as detectron2's and
    Ultralytics' pre-trained weight loading does.

    Args:
        model: the freshly built model.
        path: run dir (``best`` preferred over ``last``), checkpoint dir or ``.safetensors`` file.
        key: the setting that named ``path``, for messages.
    Returns:
        A :class:`PartialLoad`; ``str()`` of it is the report, e.g. ``"loaded 110/114 tensors from
        runs/a/checkpoints/best/model.safetensors; re-initialised 4 (shape mismatch: head.cls_logits.weight
        [3, 32, 3, 3] vs [2, 32, 3, 3], ...)"`` (file shape vs model shape).
    Raises:
        ConfigError (a ``ValueError``): one line starting with ``key``: ``path`` does not exist or holds no weights,
            the file is not readable safetensors, holds NaN/inf, or no tensor of it (other than scalars) fits.
    """
    try:
        file = resolve_weights_file(path)
        state_dict, _ = load_weights(file)
    except (OSError, WeightsError) as err:
        raise ConfigError(f"{key}: {error_text(err)}") from err
    net = unwrap_model(model)
    target = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    fits = [k for k in target if found.get(k) == target[k]]
    if not any(len(target[k]) > 0 for k in fits):
        raise ConfigError(f"{key}: no tensor of {file} fits the model ({weights_mismatch(target, found)}); "
                          "weights of another architecture or backbone?")
    net.load_state_dict({k: state_dict[k] for k in fits}, strict=False)
    return PartialLoad(file=file, total=len(target), loaded=tuple(fits),
                       mismatched={k: (found[k], target[k]) for k in target if k in found and found[k] != target[k]},
                       missing=tuple(k for k in target if k not in found),
                       ignored=tuple(k for k in found if k not in target))
