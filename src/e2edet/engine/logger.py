"""Training metrics as JSON lines (``metrics.jsonl``) and the loss-curve picture (``loss.png``).

Record types written by the trainer (one JSON object per line):

* ``{"type": "train", "iteration", "epoch", "lr", "total_loss", "loss_*", <statistics>, "time", "data_time",
  "eta_seconds"}``: averages over the last ``log_period`` iterations; ``iteration`` counts finished
  iterations (1-based), ``epoch`` is 0-based, ``time``/``data_time`` are seconds per iteration.
* ``{"type": "eval", "iteration", "epoch", ...}``: the dict returned by the evaluation function (``epoch`` is
  the number of finished epochs).

With ``train.tensorboard: true`` the same records also go to TensorBoard event files in ``<run_dir>/tensorboard/``
(:class:`MetricsLogger`, ``tensorboard --logdir <run_dir>``), at step = ``iteration``.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from e2edet.config_checks import ConfigError
from e2edet.utils.io import atomic_open, atomic_write_text

TENSORBOARD_INSTALL = "pip install tensorboard"
"""The command that makes ``train.tensorboard`` work (named in the error when the package is missing)."""


def _plain(value: Any) -> Any:
    """Convert tensors/NumPy scalars (also nested in dicts and lists) into JSON-friendly Python values."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # NumPy scalar
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (bools, strings, lists, NaN, and COCO's -1 "undefined")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == -1:
        return None
    return float(value)


def tensorboard_scalars(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """The ``(tag, value)`` pairs of a metrics record that :class:`MetricsLogger` sends to TensorBoard.

    Train records: every number but ``iteration``/``epoch`` as ``train/<key>`` (losses, ``total_loss``, ``lr``,
    statistics, times). Eval records: every number of the nested dicts as ``eval/<dotted path with />``
    (``eval/no_nms/AP``, ``eval/nms/AP50``, ``eval/diagnostics/no_nms/ece``, ...), lists left out, and the
    per-class rows (``record["per_class"][column]``, see :func:`e2edet.engine.evaluator.per_class_ap`) as
    ``eval_per_class/<column>/<AP|AP50>/<class name>``. Values that are not finite numbers, and -1 (a COCO
    metric left undefined), are skipped. ``record`` holds plain values (see :func:`_plain`).
    """
    kind = record.get("type")
    if kind == "train":
        for key, value in record.items():
            if key not in ("iteration", "epoch") and (number := _number(value)) is not None:
                yield f"train/{key}", number
    elif kind == "eval":
        def walk(node: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
            for key, value in node.items():
                if isinstance(value, Mapping):
                    yield from walk(value, f"{prefix}/{key}")
                elif (number := _number(value)) is not None:
                    yield f"{prefix}/{key}", number

        yield from walk({k: v for k, v in record.items() if k not in ("type", "iteration", "epoch", "per_class")},
                        "eval")
        for column, rows in (record.get("per_class") or {}).items():
            for row in rows if isinstance(rows, list) else []:
                for key in ("AP", "AP50"):
                    if isinstance(row, Mapping) and (number := _number(row.get(key))) is not None:
                        yield f"eval_per_class/{column}/{key}/{row.get('name', row.get('category_id'))}", number


class MetricsLogger:
    """Appends records to ``<run_dir>/metrics.jsonl`` (one JSON object per line, flushed each time).

    Args:
        run_dir: run directory (created if needed).
        enabled: when False (non-main ranks) :meth:`log` does nothing.
        tensorboard: also write the records' numbers (:func:`tensorboard_scalars`) to TensorBoard event files in
            ``<run_dir>/tensorboard/`` with :class:`torch.utils.tensorboard.SummaryWriter`, step = the record's
            ``iteration`` (config key ``train.tensorboard``). The writer opens at the first record and is flushed
            after each one.
    Raises:
        ConfigError: ``tensorboard`` is set (on an enabled logger) but the ``tensorboard`` package is not
            installed; the message names ``train.tensorboard`` and :data:`TENSORBOARD_INSTALL`.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard_dir = Path(run_dir) / "tensorboard"
        self.enabled = enabled
        self.tensorboard = bool(tensorboard) and enabled
        self._writer: Any = None
        self._purge_step: int | None = None
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (fail before training starts)
            except ImportError:
                raise ConfigError(f"train.tensorboard: true needs the tensorboard package ({TENSORBOARD_INSTALL}), "
                                  "or set train.tensorboard=false") from None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (tensors and NumPy values are converted to numbers/lists); with TensorBoard, also
        write its scalars at step ``record["iteration"]`` (records without an integer iteration are not sent)."""
        if not self.enabled:
            return
        plain = _plain(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(plain) + "\n")
            f.flush()
        step = plain.get("iteration")
        if self.tensorboard and isinstance(step, int) and not isinstance(step, bool):
            writer = self._tensorboard_writer()
            for tag, value in tensorboard_scalars(plain):
                writer.add_scalar(tag, value, global_step=step)
            writer.flush()

    def _tensorboard_writer(self) -> Any:
        """The open :class:`~torch.utils.tensorboard.SummaryWriter` (created on first use; closed at exit)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
            weakref.finalize(self, self._writer.close)
        return self._writer

    def close(self) -> None:
        """Close the TensorBoard writer, if one is open (a later record opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


    def truncate_after(self, iteration: int) -> None:
        """Drop records with ``iteration`` greater than ``iteration`` (rewritten atomically).

        Used when resuming: what a crashed run logged after its last checkpoint is about to be redone. TensorBoard
        events from later steps are dropped too (the writer reopens with ``purge_step = iteration + 1``).
        """
        if not self.enabled:
            return
        if self.tensorboard:
            self.close()
            self._purge_step = int(iteration) + 1
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if not r.get("iteration", 0) > iteration]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(metrics_jsonl: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (a truncated last line, e.g. after a crash, is skipped).

    Raises:
        FileNotFoundError: the file does not exist.
    """
    records = []
    with open(metrics_jsonl, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def lookup(record: Mapping[str, Any], dotted: str) -> Any:
    """Value at a dotted path, e.g. ``lookup(r, "no_nms.AP")`` -> ``r["no_nms"]["AP"]``; ``None`` if absent."""
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def is_loss_key(key: str) -> bool:
    """True for criterion outputs that are summed into the training loss: names whose underscore-separated tokens
    include ``loss`` (``loss_cls``, ``stage0_loss_iou``, ``stage5_mm_loss``); others (``num_pos``,
    ``stage0_pos_acc``) are logged statistics."""
    return "loss" in key.split("_")


def plot_losses(metrics_jsonl: str | Path, out_png: str | Path, metric: str = "no_nms.AP") -> Path | None:
    """Draw every loss key (:func:`is_loss_key`) and ``total_loss`` (bold) of the train records against iteration.

    Multi-stage query detectors log one set of losses per decoder stage; only the last stage's are drawn (with
    ``total_loss``, which sums all stages), so the picture stays readable.

    The y axis is logarithmic when all plotted losses are positive and span more than a factor of 20. Eval
    records that contain ``metric`` (dotted path) are drawn as points on a second y axis. The PNG is written to a
    temporary sibling and renamed, so a reader never sees a half-written picture.

    Args:
        metrics_jsonl: path of the metrics file.
        out_png: output picture path.
        metric: dotted key of the evaluation metric to overlay.
    Returns:
        ``out_png`` as a Path, or ``None`` when there is no train record to draw yet.
    Raises:
        FileNotFoundError: ``metrics_jsonl`` does not exist.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl)
    train = [r for r in records if r.get("type") == "train" and "iteration" in r]
    if not train:
        return None
    keys = sorted({k for r in train for k in r if is_loss_key(k) or k == "total_loss"})
    stages = sorted({int(k[5:].split("_")[0]) for k in keys if k.startswith("stage") and k[5:].split("_")[0].isdigit()})
    if stages:
        keys = [k for k in keys if not k.startswith("stage") or k.startswith(f"stage{stages[-1]}_")]
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    values = []
    for key in keys:
        pts = [(r["iteration"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        values += ys
        bold = key == "total_loss"
        ax.plot(xs, ys, label=key, linewidth=3.0 if bold else 1.2, color="black" if bold else None,
                alpha=0.7 if bold else 1.0, zorder=1 if bold else 2)
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    evals = [(r.get("iteration"), lookup(r, metric)) for r in records if r.get("type") == "eval"]
    evals = [(x, y) for x, y in evals if isinstance(x, (int, float)) and isinstance(y, (int, float))]
    if evals:
        ax2 = ax.twinx()
        xs, ys = zip(*evals)
        ax2.plot(xs, ys, "o--", color="tab:red", label=metric)
        ax2.set_ylabel(metric)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize="small")
    fig.tight_layout()
    out = Path(out_png)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    return out
