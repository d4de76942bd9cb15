"""Command line: ``e2edet train | eval | predict | export | compare | data | recipes``.

Examples::

    e2edet recipes                                   # list the named recipes
    e2edet recipes show defcn_mnv2_cpu               # one recipe as YAML
    e2edet train defcn_mnv2_cpu                      # train on the bundled tree sample, eval with/without NMS
    e2edet train defcn_mnv2_cpu data=bccd train.epochs=6
    e2edet train runs/defcn_mnv2_cpu/config.yaml --resume runs/defcn_mnv2_cpu
    torchrun --nproc_per_node 2 -m e2edet train defcn_r50_3x_ms data=coco.yaml
    e2edet eval runs/defcn_mnv2_cpu                  # AP / AP50 / ... with and without NMS
    e2edet predict runs/defcn_mnv2_cpu images/ --out preds --score 0.3
    e2edet export runs/defcn_mnv2_cpu --out defcn.onnx --size 416x416
    e2edet compare fcos_mnv2_cpu defcn_mnv2_cpu o2f_mnv2_cpu data=bccd iters=300 --out compare_bccd
    e2edet data sample trees
    e2edet data convert voc path/to/VOC --split train --out train.json
    e2edet data convert yolo images/ labels/ --classes names.txt --out train.json
    e2edet data convert crowdhuman annotation_val.odgt CrowdHuman_val/ --out val.json
    e2edet data check train.json --images images/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from e2edet.config import ConfigError, apply_overrides, load_config, to_dict


def _load_recipe_or_file(spec: str):
    from e2edet.recipes import get_recipe

    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        return load_config(spec)
    return get_recipe(spec)


def _cmd_train(args: argparse.Namespace) -> int:
    from e2edet.tasks import train

    cfg = apply_overrides(_load_recipe_or_file(args.recipe), args.overrides)
    train(cfg, resume=args.resume, num_pictures=args.pictures)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from e2edet.tasks import evaluate_weights

    evaluate_weights(args.weights, args.overrides, out=args.out, device=args.device)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from e2edet.inference import list_images
    from e2edet.tasks import predict

    predict(args.weights, list_images(args.sources), args.out, args.score, draw=not args.no_draw, device=args.device)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from e2edet.export import export_onnx
    from e2edet.inference import Predictor

    predictor = Predictor.from_weights(args.weights, device="cpu")
    height, width = (int(v) for v in args.size.lower().split("x"))
    path = export_onnx(predictor.model, predictor.cfg, args.out, height, width)
    print(f"{path}: images [B, 3, {height}, {width}] -> boxes, scores, labels (top "
          f"{predictor.cfg.test.max_detections}, no NMS); onnxruntime matches PyTorch")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from e2edet.compare import compare

    rows = compare(args.recipes, args.overrides, args.out, reuse=args.reuse)
    return 1 if any(r.get("error") for r in rows) else 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from e2edet.recipes import get_recipe, list_recipes

    if args.action == "show":
        if not args.name:
            raise ConfigError("usage: e2edet recipes show NAME")
        print(yaml.safe_dump(to_dict(get_recipe(args.name)), sort_keys=False), end="")
        return 0
    rows = list_recipes()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from e2edet.data import convert, samples, validate

    if args.data_cmd == "sample":
        paths = samples.prepare_trees(Path(args.root) if args.root else None, force=args.force)
        for key, value in paths.items():
            print(f"{key}: {value}")
    elif args.data_cmd == "convert":
        names = convert.read_class_names(args.classes) if args.classes else None
        if args.format == "voc":
            coco = convert.voc_to_coco(args.inputs[0], split=args.split, class_names=names)
        elif args.format == "crowdhuman":
            if len(args.inputs) != 2:
                raise ConfigError("usage: e2edet data convert crowdhuman ANNOTATION.odgt IMAGES_DIR --out FILE "
                                  "[--box fbox|vbox|hbox]")
            coco = convert.odgt_to_coco(args.inputs[0], args.inputs[1], box_type=args.box)
        else:
            if len(args.inputs) != 2 or names is None:
                raise ConfigError("usage: e2edet data convert yolo IMAGES_DIR LABELS_DIR --classes FILE --out FILE")
            coco = convert.yolo_to_coco(args.inputs[0], args.inputs[1], names)
        convert.save_coco_json(coco, args.out)
        print(f"{args.out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
              f"{len(coco['categories'])} categories")
    elif args.data_cmd == "check":
        coco = validate.load_coco_json(args.ann)
        validate.validate_coco(coco, str(args.ann), args.images, check_files=args.images is not None)
        print(f"{args.ann}: OK ({len(coco['images'])} images, {len(coco.get('annotations', []))} boxes)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``e2edet`` argument parser (sub-commands train, eval, predict, data, recipes)."""
    p = argparse.ArgumentParser(prog="e2edet", description="End-to-end (NMS-free) object detection.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("::")[1])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe (name or YAML), then evaluate with and without NMS")
    t.add_argument("recipe", help="recipe name (see `e2edet recipes`) or a config YAML")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=6 data=bccd")
    t.add_argument("--resume", help="run folder or checkpoint folder to resume from")
    t.add_argument("--pictures", type=int, default=8, help="validation images to draw predictions on (default 8)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="COCO AP of trained weights, with and without NMS side by side")
    e.add_argument("weights", help="run folder, checkpoint folder or model.safetensors")
    e.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data=bccd test.max_detections=300")
    e.add_argument("--out", help="results JSON (default: eval.json beside the weights)")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("predict", help="detect objects in images; writes detections.json and pictures")
    pr.add_argument("weights", help="run folder, checkpoint folder or model.safetensors")
    pr.add_argument("sources", nargs="+", help="image files or folders")
    pr.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    pr.add_argument("--score", type=float, default=0.3, help="minimum score to keep a detection (default 0.3)")
    pr.add_argument("--no-draw", action="store_true", help="write detections.json only")
    pr.add_argument("--device", default="auto")
    pr.set_defaults(func=_cmd_predict)

    x = sub.add_parser("export", help="ONNX export of an end-to-end model (post-processing included, no NMS)")
    x.add_argument("weights", help="run folder, checkpoint folder or model.safetensors")
    x.add_argument("--out", default="model.onnx")
    x.add_argument("--size", default="416x576", help="input HxW in pixels, multiples of 32 (default 416x576)")
    x.set_defaults(func=_cmd_export)

    cm = sub.add_parser("compare", help="train several recipes with one budget; one table of AP, AP50, mMR, "
                                        "recall, duplicate rate, ECE, s/iter and peak memory")
    cm.add_argument("recipes", nargs="+", help="recipe names or config YAML files, then key=value overrides for all")
    cm.add_argument("--out", default="compare", help="output folder: runs/, compare.md, compare.json (default: compare)")
    cm.add_argument("--reuse", action="store_true", help="keep runs that already have a summary.json")
    cm.set_defaults(func=_cmd_compare, overrides=[])

    d = sub.add_parser("data", help="datasets: sample data, format conversion, validation")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("sample", help="prepare a bundled real sample (trees: NEON aerial tree crowns)")
    s.add_argument("name", choices=["trees"])
    s.add_argument("--root", help="output folder (default: the e2edet cache)")
    s.add_argument("--force", action="store_true", help="rebuild even if present")
    c = dsub.add_parser("convert", help="convert Pascal VOC XML, YOLO txt or CrowdHuman .odgt annotations to COCO JSON")
    c.add_argument("format", choices=["voc", "yolo", "crowdhuman"])
    c.add_argument("inputs", nargs="+",
                   help="voc: VOC_ROOT; yolo: IMAGES_DIR LABELS_DIR; crowdhuman: ANNOTATION.odgt IMAGES_DIR")
    c.add_argument("--split", help="voc: ImageSets/Main split name (default: every XML file)")
    c.add_argument("--classes", help="class names file (one per line) or YOLO data.yaml")
    c.add_argument("--box", choices=["fbox", "vbox", "hbox"], default="fbox",
                   help="crowdhuman: full body (default, as DeFCN/O2F), visible body or head boxes")
    c.add_argument("--out", required=True, help="COCO JSON to write")
    k = dsub.add_parser("check", help="validate a COCO JSON file (and its images)")
    k.add_argument("ann", help="COCO JSON file")
    k.add_argument("--images", help="image folder, to check that every file exists")
    d.set_defaults(func=_cmd_data)

    r = sub.add_parser("recipes", help="list recipes, or `recipes show NAME` to print one as YAML")
    r.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    r.add_argument("name", nargs="?")
    r.set_defaults(func=_cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``e2edet`` console script.

    Returns the exit status: 0, or 2 with a one-line message on bad input (config, data, weights files, sizes).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "func", None) is _cmd_compare:  # recipes and key=value overrides share one positional list
        args.overrides = [x for x in args.recipes if "=" in x]
        args.recipes = [x for x in args.recipes if "=" not in x]
    # key=value overrides may follow options (``--resume X epochs=6``); anything else unknown is an error
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from e2edet.data.errors import DatasetError

    try:
        return args.func(args)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError) as e:
        if os.environ.get("E2EDET_DEBUG"):  # full traceback for bug reports
            raise
        print(f"e2edet: error: {e} (set E2EDET_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
