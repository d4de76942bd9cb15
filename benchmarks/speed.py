"""Speed and memory of e2edet's detectors next to their peers, in one run: torchvision's FCOS for the dense recipes,
Hugging Face transformers' Deformable DETR for e2edet's Deformable DETR.

    python benchmarks/speed.py [--iters 10] [--batch 4] [--size 416] [--threads 2]
        [--recipes fcos_mnv2_cpu defcn_mnv2_cpu ...] [--trained RUN_DIR ...] [--detr] [--detr-iters 3] [--cpu-amp]

Dense rows (every ``*_mnv2_cpu`` dense recipe by default): all models get the same real BCCD images (the shorter side
resized to ``--size``, padded to 32) and the same architecture: ImageNet MobileNetV2 with frozen batch norms, FPN
P3-P7 (P6 from P5) of the recipe's width, the same head depth and width. Each is built by its own library: e2edet's
recipe as ``e2edet train`` builds it (folded frozen norms, the recipe's memory layout), torchvision's ``FCOS`` from
torchvision's ``mobilenet_v2``, ``BackboneWithFPN`` and ``FCOSHead``.

- **Training step**: forward, the recipe's loss (assignment included), backward and an SGD step, batch ``--batch``.
  torchvision's FCOS runs its own ``GeneralizedRCNNTransform`` (normalise, resize to the same size) and loss.
  ``--cpu-amp`` times both under CPU bf16 autocast (e2edet as ``train.cpu_amp`` trains: forward in bf16, loss in
  float32; torchvision's forward and loss under autocast, as its references' ``--amp``).
- **Inference**, batch 1: e2edet's :class:`~e2edet.inference.Predictor` on the preprocessed image (the model and the
  recipe's own post-processing: top-k, no NMS, except FCOS with its NMS 0.6) against torchvision's FCOS in eval mode
  (its transform, top-k and NMS 0.6). Timed with fresh weights (ImageNet backbone, freshly initialised head) and,
  with ``--trained``, with the weights of trained runs; each once with denormal floats flushed to zero
  (``torch.set_flush_denormal(True)``) and once without, to show whether denormals slow a model down; and, for the
  NMS-free recipes, the file ``e2edet export`` writes run by :class:`~e2edet.inference.OnnxPredictor` (onnxruntime,
  fresh weights), as ``e2edet predict model.onnx`` runs it.

Every e2edet time is measured alternately with its peer's (one warm-up each), so a slow spell of the machine weighs
on both alike; the ratio is the median of the per-pair ratios e2edet / peer (below 1 = e2edet faster). Peak memory
is the largest resident set (Linux ``VmHWM``, reset before the steps) of a child process that builds the model and
batch and runs three steps, above its resident set before the first step. The numbers depend on the
machine: compare ratios, not seconds, across machines.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from e2edet.build import build_criterion, build_datasets, build_model, fill_classes
from e2edet.config import apply_overrides
from e2edet.data.collate import collate
from e2edet.data.samples import ensure_mobilenet_weights
from e2edet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from e2edet.engine.precision import to_float32
from e2edet.export import export_onnx
from e2edet.inference import OnnxPredictor, Predictor
from e2edet.recipes import get_recipe
from timing import timed_pairs  # benchmarks/timing.py (the script's folder is on sys.path)

DENSE = ["fcos_mnv2_cpu", "fcos_wo_ctrness_mnv2_cpu", "atss_mnv2_cpu", "anchor_mnv2_cpu", "center_mnv2_cpu",
         "fg_loss_mnv2_cpu", "poto_mnv2_cpu", "poto_argmax_mnv2_cpu", "poto_3dmf_mnv2_cpu", "defcn_mnv2_cpu",
         "o2f_mnv2_cpu"]


def _config(recipe: str, args):
    cfg = apply_overrides(get_recipe(recipe), [f"data={args.data}", f"data.test_min_size={args.size}"])
    data = build_datasets(cfg, train=False)
    fill_classes(cfg, data.val.class_names)
    return cfg, data


def _batch(data, n: int):
    return collate([data.val[i] for i in range(n)])


def torchvision_fcos(cfg, size: int) -> FCOS:
    """torchvision's FCOS as torchvision builds it, with the architecture of the e2edet recipe ``cfg``: ImageNet
    MobileNetV2 ``features`` with ``FrozenBatchNorm2d`` (blocks 0-3 frozen, as ``model.freeze_at=2``), torchvision's
    ``BackboneWithFPN`` on blocks 6/13/18 (C3-C5) with ``LastLevelP6P7`` (P6 from P5) and ``model.fpn_channels``
    channels, an ``FCOSHead`` of ``model.num_convs`` convs; one anchor size per level (FCOS's points), NMS 0.6,
    score threshold 0.05, top 1000 per level and 100 detections (torchvision's defaults = cvpods FCOS's)."""
    ensure_mobilenet_weights()
    features = mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1, norm_layer=FrozenBatchNorm2d).features
    for block in features[:4]:
        block.requires_grad_(False)
    ch = cfg.model.fpn_channels
    backbone = BackboneWithFPN(features, {"6": "c3", "13": "c4", "18": "c5"}, [32, 96, 1280], ch,
                               extra_blocks=LastLevelP6P7(ch, ch))
    anchors = AnchorGenerator(sizes=tuple((8 * 2**i,) for i in range(5)), aspect_ratios=((1.0,),) * 5)
    return FCOS(backbone, num_classes=cfg.model.num_classes, anchor_generator=anchors,
                head=FCOSHead(ch, 1, cfg.model.num_classes, num_convs=cfg.model.num_convs), min_size=size,
                max_size=cfg.data.test_max_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                nms_thresh=0.6)


def torchvision_inputs(images: torch.Tensor, targets: list[dict]):
    """The batch as torchvision detection models take it: unpadded ``[0, 1]`` RGB images and boxes/labels."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tv_images, tv_targets = [], []
    for img, t in zip(images, targets):
        h, w = t["size"].tolist()
        tv_images.append(img[:, :h, :w] * std + mean)
        tv_targets.append({"boxes": t["boxes"], "labels": t["labels"]})
    return tv_images, tv_targets


def train_step_fn(model: nn.Module, criterion, batch, amp: bool = False):
    """One e2edet training step (forward, loss, backward, SGD) on ``batch`` as a closure; ``amp`` runs the forward
    under CPU bf16 autocast and the loss on float32 outputs, as the trainer does with ``train.cpu_amp``."""
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-4, momentum=0.9)
    images, targets = batch

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            outputs = model(images)
        losses = criterion(to_float32(outputs) if amp else outputs, targets)
        loss = sum(v for k, v in losses.items() if k.startswith("loss"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def tv_train_step_fn(model: FCOS, batch, amp: bool = False):
    """One torchvision FCOS training step; ``amp`` runs its forward and loss under CPU bf16 autocast, as
    torchvision's detection references do with ``--amp``."""
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-4, momentum=0.9)
    tv_images, tv_targets = torchvision_inputs(*batch)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = sum(model(tv_images, tv_targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _status_mb(field: str) -> float:
    """``VmRSS``/``VmHWM`` of this process from ``/proc/self/status``, in MB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _peak_child(kind: str, recipe: str, args, queue) -> None:
    """Child process: build ``recipe`` (``"torchvision"`` = torchvision's FCOS) and its batch, then report the peak
    resident set of three ``kind`` (``train``/``infer``) steps above the resident set before them, in MB."""
    torch.set_num_threads(args.threads)
    cfg, data = _config("fcos_mnv2_cpu" if recipe == "torchvision" else recipe, args)
    batch = _batch(data, args.batch if kind == "train" else 1)
    if recipe == "torchvision":
        model = torchvision_fcos(cfg, args.size).train(kind == "train")
        tv_images, _ = torchvision_inputs(*batch)
        fn = tv_train_step_fn(model, batch) if kind == "train" else (lambda: model(tv_images))
    elif kind == "train":
        fn = train_step_fn(build_model(cfg).train(), build_criterion(cfg), batch)
    else:
        predictor = Predictor(build_model(cfg), cfg, "cpu")
        fn = _predict_fn(predictor, batch)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _status_mb("VmRSS")
    with torch.inference_mode(kind != "train"):
        for _ in range(3):
            fn()
    queue.put(max(0.0, _status_mb("VmHWM") - before))


def peak_memory_mb(kind: str, recipe: str, args) -> float:
    """Peak memory of three ``kind`` steps of ``recipe`` in a fresh child process (see :func:`_peak_child`)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(kind, recipe, args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def _predict_fn(predictor: Predictor, batch):
    images, targets = batch
    sizes = torch.stack([t["size"] for t in targets])
    orig = torch.stack([t["orig_size"] for t in targets])
    return lambda: predictor.detect(images, sizes, orig)


def dense_rows(args) -> tuple[list, list]:
    """Training-step and inference rows of the dense recipes against torchvision's FCOS."""
    train_rows, infer_rows = [], []
    for recipe in args.recipes:
        cfg, data = _config(recipe, args)
        torch.manual_seed(0)
        tv = torchvision_fcos(cfg, args.size)
        batch = _batch(data, args.batch)
        model = build_model(cfg).train()
        ours_s, tv_s, ratio = timed_pairs(train_step_fn(model, build_criterion(cfg), batch, args.cpu_amp),
                                          tv_train_step_fn(tv.train(), batch, args.cpu_amp), args.iters)
        mem = (peak_memory_mb("train", recipe, args), peak_memory_mb("train", "torchvision", args))
        train_rows.append((recipe, ours_s, tv_s, ratio, *mem))

        one = _batch(data, 1)
        tv_images, _ = torchvision_inputs(*one)
        tv.eval()
        weights = [("fresh", None)] + [("trained", w) for w in args.trained if _run_recipe(w) == recipe]
        for label, source in weights:
            predictor = Predictor.from_weights(source, "cpu") if source else Predictor(build_model(cfg), cfg, "cpu")
            fn = _predict_fn(predictor, one)
            for flush in (True, False):
                torch.set_flush_denormal(flush)
                with torch.inference_mode():
                    ours_s, tv_s, ratio = timed_pairs(fn, lambda: tv(tv_images), args.iters)
                infer_rows.append((recipe, label, "on" if flush else "off", ours_s, tv_s, ratio))
            torch.set_flush_denormal(False)
        if cfg.test.nms_iou == 0 and not args.no_onnx:  # the exported NMS-free graph through onnxruntime
            with tempfile.TemporaryDirectory() as tmp:
                h, w = one[0].shape[-2:]
                path = export_onnx(build_model(cfg).eval(), cfg, Path(tmp) / "m.onnx", h, w)
                fn = _predict_fn(OnnxPredictor(path), one)
                ours_s, tv_s, ratio = timed_pairs(fn, lambda: tv(tv_images), args.iters)
            infer_rows.append((recipe, "fresh, ONNX (onnxruntime)", "", ours_s, tv_s, ratio))
        mem = (peak_memory_mb("infer", recipe, args), peak_memory_mb("infer", "torchvision", args))
        infer_rows.append((recipe, "peak MB", "", *mem))
    return train_rows, infer_rows


def _run_recipe(run_dir: str) -> str:
    import yaml

    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["name"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=416, help="shorter image side in pixels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="bccd")
    p.add_argument("--recipes", nargs="+", default=DENSE)
    p.add_argument("--trained", nargs="*", default=[], help="run folders of trained dense recipes")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows")
    p.add_argument("--detr", action="store_true", help="also Deformable DETR against transformers")
    p.add_argument("--detr-iters", type=int, default=3)
    p.add_argument("--cpu-amp", action="store_true",
                   help="time both sides' training steps under CPU bf16 autocast (peak memory stays float32)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    train_rows, infer_rows = dense_rows(args)
    print(f"\n## Dense training step: batch {args.batch}, shorter side {args.size}, {args.threads} threads, median "
          f"of {args.iters} alternated pairs{', bf16 autocast' if args.cpu_amp else ''}; peak MB (float32) above "
          "the built model")
    print("| recipe | e2edet s | torchvision FCOS s | ratio | e2edet peak MB | torchvision peak MB |")
    print("|---|---|---|---|---|---|")
    for r in train_rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.0f} | {r[5]:.0f} |")
    print("\n## Dense inference: batch 1, e2edet Predictor (recipe's post-processing) vs torchvision FCOS + NMS 0.6")
    print("| recipe | weights | flush denormals | e2edet s | torchvision FCOS s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in infer_rows:
        if r[1] == "peak MB":
            print(f"| {r[0]} | peak MB | | {r[3]:.0f} | {r[4]:.0f} | |")
        else:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.2f} |")
    if args.detr:
        from deformable_detr_vs_transformers import main as detr_main

        sys.argv = [sys.argv[0], "--iters", str(args.detr_iters), "--threads", str(args.threads)]
        print("\n## Deformable DETR vs transformers")
        detr_main()


if __name__ == "__main__":
    main()
