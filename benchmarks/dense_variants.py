"""Train the dense variants with one CPU budget on BCCD train and evaluate on BCCD val, with and without NMS.

    python benchmarks/dense_variants.py --iters 300 [--out runs/bench_dense]

Rows: FCOS with NMS (its own post-processing), FCOS without NMS (same weights, NMS removed), POTO, POTO+3DMF and
DeFCN (POTO+3DMF+Aux), the last three without NMS (their own post-processing) and, for reference, with NMS.
Every variant uses its ``*_mnv2_cpu`` recipe, the same iterations, seed, data and image sizes. The report is
printed and written as Markdown and JSON into the output folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from e2edet.config import apply_overrides
from e2edet.recipes import get_recipe
from e2edet.tasks import train

VARIANTS = [("fcos", "FCOS"), ("poto", "POTO"), ("poto_3dmf", "POTO+3DMF"), ("defcn", "DeFCN (POTO+3DMF+Aux)")]


def seconds_per_iter(metrics: Path) -> float:
    """Median training seconds/iteration logged in ``metrics.jsonl`` (first logged window dropped as warm-up)."""
    times = [r["time"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("type") == "train"]
    return statistics.median(times[1:] or times) if times else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=300, help="training iterations per variant (the CPU budget)")
    p.add_argument("--data", default="bccd")
    p.add_argument("--out", default="runs/bench_dense")
    p.add_argument("--variants", default=",".join(v for v, _ in VARIANTS))
    p.add_argument("overrides", nargs="*", help="extra key=value overrides applied to every variant")
    args = p.parse_args()

    rows, raw = [], {}
    for variant, title in VARIANTS:
        if variant not in args.variants.split(","):
            continue
        cfg = apply_overrides(get_recipe(f"{variant}_mnv2_cpu"), [
            f"data={args.data}", f"train.max_iters={args.iters}", "train.eval_period=0", f"output_dir={args.out}",
            *args.overrides])
        start = time.time()
        res = train(cfg, num_pictures=0, exist_ok=True)  # the benchmark owns OUT/<recipe>: rerun replaces it
        wall = time.time() - start
        spi = seconds_per_iter(cfg.run_dir / "metrics.jsonl")
        raw[variant] = {"results": res, "seconds_per_iter": spi, "wall_seconds": wall}
        own, other = ("nms", "no_nms") if cfg.test.nms_iou > 0 else ("no_nms", "nms")
        rows.append((f"{title} ({'NMS 0.6' if own == 'nms' else 'no NMS'})", res[own], res[other]["AP"], spi))
        if variant == "fcos":
            rows.append(("FCOS (NMS removed at eval)", res["no_nms"], res["nms"]["AP"], spi))

    header = "| variant | AP | AP50 | AP75 | AR100 | AP with the other post-processing | s/iter |"
    lines = [f"BCCD train -> val, {args.iters} iterations each, {args.data}", "", header,
             "|---|---|---|---|---|---|---|"]
    for name, m, other_ap, spi in rows:
        lines.append(f"| {name} | {m['AP']:.1f} | {m['AP50']:.1f} | {m['AP75']:.1f} | {m['AR100']:.1f} | "
                     f"{other_ap:.1f} | {spi:.2f} |")
    report = "\n".join(lines)
    print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report + "\n")
    (out / "report.json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
