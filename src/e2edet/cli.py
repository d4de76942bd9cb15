"""Command line: ``e2edet train | eval | predict | export | compare | data | weights | recipes``.

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
    e2edet weights import r50_deformable_detr-checkpoint.pth --out runs/ddetr_coco --data coco.yaml
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

from e2edet.config import ALIASES, DEVICE_FORMS, ConfigError, apply_overrides, to_dict


def _cmd_train(args: argparse.Namespace) -> int:
    from e2edet.recipes import load_recipe_or_file
    from e2edet.tasks import train

    cfg = apply_overrides(load_recipe_or_file(args.recipe), args.overrides)
    train(cfg, resume=args.resume, num_pictures=args.pictures, exist_ok=args.exist_ok)
    return 0


def _check_device(device: str) -> None:
    """Before loading trained weights: the ``--device`` exists (one line naming ``--device`` otherwise). Weights that
    do not fit their model are reported by the loader (:func:`e2edet.engine.checkpoint.load_model_weights`)."""
    from e2edet.engine.device import select_device

    select_device(device, key="--device")


def _cmd_eval(args: argparse.Namespace) -> int:
    from e2edet.tasks import evaluate_weights

    _check_device(args.device)
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    evaluate_weights(args.weights, args.overrides, out=args.out, device=args.device, bootstrap=args.bootstrap)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from e2edet.inference import list_images
    from e2edet.tasks import predict

    if args.score is not None and not 0 <= args.score <= 1:
        raise ConfigError(f"--score {args.score}: must be a score in [0, 1]")
    if args.coco_ann is not None and not Path(args.coco_ann).is_file():
        raise ConfigError(f"--coco-ann {args.coco_ann}: no such COCO JSON file")
    files = list_images(args.sources)
    if Path(args.weights).suffix.lower() != ".onnx":  # onnxruntime's devices are checked when the file is loaded
        _check_device(args.device)
    predict(args.weights, files, args.out, args.score, draw=not args.no_draw, device=args.device,
            coco_json=args.coco_json, coco_ann=args.coco_ann)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from e2edet.export import export_onnx, parse_size, supports_dynamic_size
    from e2edet.inference import Predictor

    height, width = parse_size(args.size, "--size")
    predictor = Predictor.from_weights(args.weights, device="cpu")
    dynamic = not args.static and supports_dynamic_size(predictor.model)
    path = export_onnx(predictor.model, predictor.cfg, args.out, height, width, dynamic=dynamic)
    shape = "H, W] (any multiples of 32; checked at " + f"{height}x{width})" if dynamic else f"{height}, {width}]"
    print(f"{path}: images [B, 3, {shape} -> boxes, scores, labels (top {predictor.cfg.test.max_detections}, no NMS), "
          "preprocessing in its metadata; onnxruntime matches PyTorch")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from e2edet.compare import compare

    rows = compare(args.recipes, args.overrides, args.out, reuse=args.reuse)
    return 1 if any(r.get("error") for r in rows) else 0


def _cmd_weights(args: argparse.Namespace) -> int:
    from e2edet.weights_import import import_weights

    out = import_weights(args.source, args.out, dataset=args.data, name=args.name)
    print(f"wrote {out} (evaluate with `e2edet eval {out}" + ("" if args.data else " data=PATH") + "`)")
    return 0


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


class UsageError(ConfigError):
    """A command line argparse refuses (unknown option, missing argument, bad choice)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are a :class:`UsageError` (one line, exit status 2, from :func:`main`)
    instead of argparse's usage block; ``--help`` is unchanged."""

    def error(self, message: str):  # noqa: D102 - argparse API
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _version() -> str:
    """The installed distribution's version (``importlib.metadata``), else the package's ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("e2edet")
    except metadata.PackageNotFoundError:
        from e2edet import __version__

        return __version__


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001 - warnings API
    """``warnings.formatwarning`` of the command line: one line ``e2edet: warning: <message>``, without the Python
    file, line number and source line of the default format (``E2EDET_DEBUG=1`` keeps the default). Replacing the
    format, not ``showwarning``, leaves ``warnings.catch_warnings(record=True)`` working."""
    return f"e2edet: warning: {' '.join(str(message).split())}\n"


#: ``--device`` help of the commands that load trained weights.
_DEVICE_HELP = f"{DEVICE_FORMS} (default auto)"


def build_parser() -> argparse.ArgumentParser:
    """The ``e2edet`` argument parser (sub-commands train, eval, predict, data, recipes)."""
    p = _Parser(prog="e2edet", description="End-to-end (NMS-free) object detection.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("::")[1])
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    aliases = ", ".join(f"{short}= ({key})" for short, key in ALIASES.items())
    t = sub.add_parser("train", help="train a recipe (name or YAML), then evaluate with and without NMS",
                       epilog=f"Short aliases for overrides: {aliases}. Any other key by its dotted name, e.g. "
                              "train.eval_period=2; `e2edet recipes show NAME` lists them.")
    t.add_argument("recipe", help="recipe name (see `e2edet recipes`) or a config YAML")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=6 data=bccd")
    t.add_argument("--resume", help="run folder or checkpoint folder to resume from (training goes on in that "
                                    "folder)")
    t.add_argument("--exist-ok", action="store_true",
                   help="train into output_dir/name even if it holds a run, replacing that run's outputs (default: "
                        "a new numbered folder, e.g. runs/NAME-2)")
    t.add_argument("--pictures", type=int, default=8, help="validation images to draw predictions on (default 8)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="COCO AP of trained weights, with and without NMS side by side")
    e.add_argument("weights", help="run folder, checkpoint folder or model.safetensors")
    e.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data=bccd test.max_detections=300")
    e.add_argument("--out", help="results JSON (default: eval.json beside the weights)")
    e.add_argument("--device", default="auto", help=_DEVICE_HELP)
    e.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="also a 95%% confidence interval of AP without NMS minus AP with NMS from N paired "
                        "resamples of the images (seed 0; each costs two COCO evaluations; default 0 = off)")
    e.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("predict", help="detect objects in images; writes detections.json and pictures")
    pr.add_argument("weights", help="run folder, checkpoint folder, model.safetensors, or an exported .onnx file "
                                    "(run by onnxruntime with the preprocessing stored in it)")
    pr.add_argument("sources", nargs="+", help="image files or folders")
    pr.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    pr.add_argument("--score", type=float, default=None,
                    help="minimum score to keep a detection (default: the run's F1-optimal threshold on its "
                         "validation split, test.predict_score, else 0.3)")
    pr.add_argument("--no-draw", action="store_true", help="write detections.json only")
    pr.add_argument("--device", default="auto", help=_DEVICE_HELP)
    pr.add_argument("--coco-json", action="store_true",
                    help="also write results.json (COCO detection results: image_id, category_id, bbox xywh, score; "
                         "every detection, --score not applied) and images.json (the COCO image list its ids name)")
    pr.add_argument("--coco-ann", metavar="FILE",
                    help="COCO dataset JSON the images come from: results.json takes its image and category ids "
                         "(implies --coco-json)")
    pr.set_defaults(func=_cmd_predict)

    x = sub.add_parser("export", help="ONNX export of an end-to-end model (post-processing included, no NMS)")
    x.add_argument("weights", help="run folder, checkpoint folder or model.safetensors")
    x.add_argument("--out", default="model.onnx")
    x.add_argument("--size", default="416x576",
                   help="input HxW or N (square) in pixels, multiples of 32 (default 416x576); the size a graph with "
                        "dynamic height/width is traced and checked at")
    x.add_argument("--static", action="store_true",
                   help="fix height and width at --size even where the graph allows dynamic sizes")
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

    w = sub.add_parser("weights", help="published weights: `weights import` a Deformable DETR checkpoint")
    wsub = w.add_subparsers(dest="weights_cmd", required=True)
    wi = wsub.add_parser("import", help="official Deformable-DETR/MS-DETR .pth or transformers folder -> run folder")
    wi.add_argument("source", help="official .pth checkpoint, or a transformers checkpoint folder")
    wi.add_argument("--out", required=True, help="run folder to write (checkpoints/best + config.yaml)")
    wi.add_argument("--data", help="dataset whose categories (by id) the class logits are reduced to, e.g. coco.yaml")
    wi.add_argument("--name", help="experiment name stored in the config (default: the source's file name)")
    w.set_defaults(func=_cmd_weights)

    r = sub.add_parser("recipes", help="list recipes, or `recipes show NAME` to print one as YAML")
    r.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    r.add_argument("name", nargs="?")
    r.set_defaults(func=_cmd_recipes)
    return p


#: Appended to every one-line error message.
_DEBUG_HINT = "(set E2EDET_DEBUG=1 for a traceback)"


def _worker_message(message: str) -> str:
    r"""The original message of an exception re-raised from a DataLoader worker process.

    torch re-raises it in the main process with the message ``"Caught DatasetError in DataLoader worker process 0.
    \nOriginal Traceback (most recent call last):\n ... \ne2edet.data.errors.DatasetError: <msg>"``; this returns
    ``<msg>`` (every line of it), or ``message`` unchanged when it is not such a message.
    """
    head = re.match(r"Caught (\w+) in DataLoader worker process \d+\.", message)
    if head is None or "Original Traceback" not in message:
        return message
    name = re.escape(head.group(1))
    lines = message.splitlines()
    for i in range(len(lines) - 1, -1, -1):  # the last "module.Type: message" line starts the original message
        found = re.match(rf"(?:[\w.]+\.)?{name}: ?(.*)$", lines[i])
        if found:
            return "\n".join([found.group(1), *lines[i + 1:]]).strip()
        if re.match(rf"(?:[\w.]+\.)?{name}$", lines[i].strip()):  # raised without a message
            return head.group(1)
    return message


def one_line(message: str, max_items: int = 3) -> str:
    """Collapse a (possibly multi-line) error message into one line: the first line, then the first
    ``max_items`` further lines joined by ``; `` and a count of the rest."""
    lines = [" ".join(line.split()) for line in _worker_message(str(message)).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    more = f"; ... ({len(rest) - max_items} more)" if len(rest) > max_items else ""
    return f"{head.rstrip(':')}: {'; '.join(rest[:max_items])}{more}"


def _error_exit_code(exc: BaseException) -> int | None:
    """Exit status for an exception that ends a command with one line instead of a traceback, else None.

    * an ``exit_code`` attribute (e.g. ``e2edet.engine.trainer.TrainingInterrupted``, 130;
      ``e2edet.export.ExportMismatchError``, 1): that code;
    * ``KeyboardInterrupt``: 130;
    * bad input, 2: ``ConfigError`` (also the device, export and usage errors), ``DatasetError``, the weights
      errors of :mod:`e2edet.engine.checkpoint` (unreadable, NaN/inf, not matching the model), ``OSError``
      (missing, unreadable or unwritable files), ``FloatingPointError`` (a training that diverged: a non-finite
      loss) and ``ValueError`` (the project's convention for a refused argument).

    Other exceptions (``RuntimeError`` from model code, ``KeyError``...) are bugs: they keep their traceback.
    """
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(exc, SystemExit):
        return code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    # the project's error types, looked up only if their modules were imported (a usage error must not import torch)
    own = tuple(getattr(sys.modules.get(module), name, ConfigError) for module, name in (
        ("e2edet.data.errors", "DatasetError"), ("e2edet.engine.checkpoint", "WeightsError")))
    if isinstance(exc, (ConfigError, *own, OSError, FloatingPointError, ValueError)):
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``e2edet`` console script.

    Returns the exit status: 0; 2 with one line ``e2edet: error: ... (set E2EDET_DEBUG=1 for a traceback)`` on stderr
    on bad input (usage, config, data, weights or image files, devices, sizes, output paths; see
    :func:`_error_exit_code`); 1 with the same kind of line when a check fails (an exported ONNX graph whose
    outputs differ from PyTorch's); 130 with ``e2edet: interrupted`` (or the interruption's own message) on Ctrl-C.
    With ``E2EDET_DEBUG=1`` these exceptions propagate with their traceback. Warnings print as one line
    ``e2edet: warning: ...`` while the command runs (:func:`_format_warning`).
    """
    import warnings

    formatter = warnings.formatwarning
    if not os.environ.get("E2EDET_DEBUG"):
        warnings.formatwarning = _format_warning
    try:
        return _run(argv)
    except BaseException as exc:
        code = _error_exit_code(exc)
        if code is None or os.environ.get("E2EDET_DEBUG"):
            raise
        message = one_line(str(exc))
        if code != 130:  # an error: bad input (2) or a failed check such as the export parity check (1)
            line = f"e2edet: error: {message or type(exc).__name__} {_DEBUG_HINT}"
        elif (isinstance(exc, KeyboardInterrupt) and not hasattr(exc, "exit_code")) or not message:
            line = "e2edet: interrupted"
        else:  # an interruption with its own message (TrainingInterrupted: where to resume from)
            line = message if message.startswith("e2edet:") else f"e2edet: {message}"
        print(line, file=sys.stderr)
        return code
    finally:
        warnings.formatwarning = formatter


def _run(argv: list[str] | None) -> int:
    """Parse ``argv`` and run the sub-command (errors are turned into exit codes by :func:`main`)."""
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
