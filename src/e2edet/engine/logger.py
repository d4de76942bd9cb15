"""Training metrics as JSON lines (``metrics.jsonl``) and the loss-curve picture (``loss.png``).

Record types written by the trainer (one JSON object per line):

* ``{"type": "train", "iteration", "epoch", "lr", "total_loss", "loss_*", <statistics>, "time", "data_time",
  "eta_seconds"}``: averages over the last ``log_period`` iterations; ``iteration`` counts finished
  iterations (1-based), ``epoch`` is 0-based, ``time``/``data_time`` are seconds per iteration.
* ``{"type": "eval", "iteration", "epoch", ...}``: the dict returned by the evaluation function (``epoch`` is
  the number of finished epochs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from e2edet.utils.io import atomic_open, atomic_write_text


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


class MetricsLogger:
    """Appends records to ``<run_dir>/metrics.jsonl`` (one JSON object per line, flushed each time).

    Args:
        run_dir: run directory (created if needed).
        enabled: when False (non-main ranks) :meth:`log` does nothing.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (tensors and NumPy values are converted to numbers/lists)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_plain(record)) + "\n")
            f.flush()


    def truncate_after(self, iteration: int) -> None:
        """Drop records with ``iteration`` greater than ``iteration`` (rewritten atomically).

        Used when resuming: what a crashed run logged after its last checkpoint is about to be redone.
        """
        if not self.enabled or not self.path.exists():
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
