"""``e2edet compare``: train several recipes under one budget and put their results in one table.

Each recipe is trained by ``e2edet train`` in its own subprocess (so its peak memory is its own and a failing recipe
does not stop the others), with the same overrides (dataset, iterations, seed, ...). The table is printed and written
as ``compare.md`` and ``compare.json`` in the output folder, with ``reliability.png``: the reliability diagrams of all
recipes (their own post-processing) on one plot; the runs are in ``OUT/runs/<recipe>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from e2edet.config import ConfigError, overrides_for_arch
from e2edet.engine.evaluator import save_results
from e2edet.recipes import load_recipe_or_file
from e2edet.utils.io import atomic_write_text

#: (column title, key in a row, number format) of the comparison table, in order.
COLUMNS = (
    ("recipe", "recipe", "{}"),
    ("post-proc.", "post", "{}"),
    ("AP no NMS", "ap_no_nms", "{:.1f}"),
    ("AP NMS", "ap_nms", "{:.1f}"),
    ("AP50", "ap50", "{:.1f}"),
    ("mMR", "mmr", "{:.1f}"),
    ("recall", "recall", "{:.1f}"),
    ("dup% (no NMS)", "dup_rate", "{:.1f}"),
    ("ECE", "ece", "{:.1f}"),
    ("s/iter", "sec_per_iter", "{:.3f}"),
    ("peak MB", "peak_mem_mb", "{:.0f}"),
)

#: Columns added after "AP NMS" when a row has mask AP (instance-segmentation recipes, ``summary.json`` ``segm``).
MASK_COLUMNS = (
    ("mask AP no NMS", "mask_ap_no_nms", "{:.1f}"),
    ("mask AP NMS", "mask_ap_nms", "{:.1f}"),
)

TABLE_NOTE = (
    "AP no NMS / AP NMS: COCO AP (%) of the same model outputs without NMS and with class-aware NMS. AP50, mMR "
    "(log-average miss rate over FPPI 1e-2..1e0, lower is better), recall and ECE (expected calibration error, 20 "
    "bins, TP at IoU 0.5) use the recipe's own post-processing (no NMS for end-to-end recipes, NMS for FCOS). dup% is "
    "the share of confident (score >= 0.3) raw detections that duplicate an already matched object (IoU >= 0.5). "
    "s/iter: median training seconds per iteration; peak MB: CUDA peak allocation, or peak RSS of the training "
    "process on CPU (data-loader workers excluded). mask AP (instance segmentation): COCO segm AP of the same "
    "detections without / with NMS on their boxes."
)


def row_from_run(recipe: str, run_dir: Path) -> dict[str, Any]:
    """One table row from a finished run folder (``summary.json`` written by ``e2edet train``).

    Raises:
        FileNotFoundError: the run has no ``summary.json`` (it failed or never ran).
    """
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run did not finish")
    s = json.loads(path.read_text())
    ev = s.get("eval") or {}
    own = "nms" if s.get("nms_iou", 0) > 0 else "no_nms"
    diag, crowd, segm = ev.get("diagnostics") or {}, ev.get("crowd") or {}, ev.get("segm") or {}
    return {
        "recipe": recipe,
        "reliability": (diag.get(own) or {}).get("reliability"),
        "post": "NMS" if own == "nms" else "no NMS",
        "ap_no_nms": (ev.get("no_nms") or {}).get("AP"),
        "ap_nms": (ev.get("nms") or {}).get("AP"),
        "mask_ap_no_nms": (segm.get("no_nms") or {}).get("AP"),
        "mask_ap_nms": (segm.get("nms") or {}).get("AP"),
        "ap50": (ev.get(own) or {}).get("AP50"),
        "mmr": (crowd.get(own) or {}).get("mMR"),
        "recall": (crowd.get(own) or {}).get("recall"),
        "dup_rate": (diag.get("no_nms") or {}).get("duplicate_rate"),
        "ece": (diag.get(own) or {}).get("ece"),
        "sec_per_iter": s.get("sec_per_iter"),
        "peak_mem_mb": s.get("peak_mem_mb"),
        "iterations": s.get("iterations"),
        "run_dir": str(run_dir),
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of ``rows`` (missing values shown as ``-``), followed by :data:`TABLE_NOTE`; with
    :data:`MASK_COLUMNS` after the box AP columns when any row has mask AP."""
    columns = COLUMNS
    if any(row.get(key) is not None for row in rows for _, key, _ in MASK_COLUMNS):
        columns = (*COLUMNS[:4], *MASK_COLUMNS, *COLUMNS[4:])
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None or (isinstance(value, float) and value < 0) else fmt.format(value))
        if row.get("error"):
            cells[2] = f"failed: {row['error']}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + TABLE_NOTE + "\n"


def compare(recipes: Sequence[str], overrides: Sequence[str], out_dir: str | Path, reuse: bool = False) -> list[dict]:
    """Train every recipe with the same ``overrides`` and return the table rows; writes ``compare.md``/``.json``.

    Args:
        recipes: recipe names or config YAML files.
        overrides: ``key=value`` items applied to every recipe (``data=bccd iters=300 seed=1``); a ``model.``/``loss.``
            key of one architecture (``model.num_queries=50``) goes only to the recipes of the architectures that
            have it (:func:`e2edet.config.overrides_for_arch`).
        out_dir: output folder; runs go to ``out_dir/runs/<name>``.
        reuse: keep a run whose ``summary.json`` already exists instead of training it again.
    Raises:
        ConfigError: no recipe, or an override sets ``output_dir``/``name`` (the runs must not collide).
    """
    if not recipes:
        raise ConfigError("compare needs at least one recipe")
    if any(o.split("=", 1)[0].strip() in ("output", "output_dir", "name") for o in overrides):
        raise ConfigError("compare chooses each run's folder itself: drop output=/name= (use --out)")
    out_dir = Path(out_dir)
    rows = []
    for recipe in recipes:
        cfg = load_recipe_or_file(recipe)  # validates the name before any training starts
        name, own = cfg.name, overrides_for_arch(overrides, cfg.model.arch)
        run_dir = out_dir / "runs" / name
        if not (reuse and (run_dir / "summary.json").is_file()):
            cmd = [sys.executable, "-m", "e2edet", "train", recipe, *own, f"output={out_dir / 'runs'}",
                   "--pictures", "0", "--exist-ok"]
            print(f"\n=== {name}: {' '.join(cmd[2:])}", flush=True)
            (run_dir / "summary.json").unlink(missing_ok=True)
            code = subprocess.run(cmd, env=os.environ.copy()).returncode
            if code != 0:
                rows.append({"recipe": name, "error": f"exit {code}", "run_dir": str(run_dir)})
                continue
        rows.append(row_from_run(name, run_dir))
    table = format_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = f"# e2edet compare\n\nrecipes: {' '.join(recipes)}\noverrides: {' '.join(overrides) or '(none)'}\n\n"
    atomic_write_text(out_dir / "compare.md", header + table)
    save_results({"overrides": list(overrides), "rows": rows}, out_dir / "compare.json")
    curves = {f"{r['recipe']} ({r['post']})": {"ece": r["ece"], "reliability": r["reliability"]}
              for r in rows if r.get("reliability") and r.get("ece") is not None}
    if curves:
        from e2edet.engine.diagnostics import plot_reliability

        plot_reliability(curves, out_dir / "reliability.png",
                         title="Reliability (TP at IoU >= 0.5), own post-processing")
    print("\n" + table)
    print(f"written: {out_dir / 'compare.md'}, {out_dir / 'compare.json'}")
    return rows

