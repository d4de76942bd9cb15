"""Time one training step of the CPU recipes next to torchvision's own FCOS with the same backbone.

    python benchmarks/train_step.py [--iters 10] [--batch 4] [--size 416] [--threads 2]

All models get the same batch of real BCCD images (resized to the same shorter side, padded to 32), the same
MobileNetV2 + FPN (P3-P7, P6 from P5) and the same head depth and width. One step = forward, loss, backward and
an SGD step. torchvision's FCOS also runs its internal GeneralizedRCNNTransform (normalise + resize to the same
size), which is part of its training step. Reported: median and min seconds/step over ``--iters`` steps after
two warm-up steps, and the ratio to torchvision. The numbers are machine-dependent: run both in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead

from e2edet.build import build_criterion, build_datasets, build_model, fill_classes
from e2edet.config import apply_overrides
from e2edet.data.collate import collate
from e2edet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from e2edet.recipes import get_recipe


class _BackboneWithFPN(nn.Module):
    """Our MobileNetV2 + FPN as a torchvision detection backbone (OrderedDict of P3..P7, ``out_channels``)."""

    def __init__(self, detector: nn.Module, out_channels: int):
        super().__init__()
        self.body, self.fpn, self.out_channels = detector.backbone, detector.fpn, out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((f"p{i + 3}", f) for i, f in enumerate(self.fpn(self.body(x))))


def time_steps(step, iters: int) -> list[float]:
    """Wall seconds of ``iters`` calls of ``step`` after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=416, help="shorter image side in pixels")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--data", default="bccd")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    batch = None
    for recipe in ("fcos_mnv2_cpu", "defcn_mnv2_cpu"):
        cfg = apply_overrides(get_recipe(recipe), [f"data={args.data}", "model.pretrained=false",
                                                   f"data.test_min_size={args.size}"])
        data = build_datasets(cfg, train=False)
        fill_classes(cfg, data.val.class_names)
        if batch is None:
            images, targets = collate([data.val[i] for i in range(args.batch)])
            batch = (images, targets)
        model, criterion = build_model(cfg).train(), build_criterion(cfg)
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)

        def step(model=model, criterion=criterion, opt=opt):
            losses = criterion(model(batch[0]), batch[1])
            loss = sum(v for k, v in losses.items() if k.startswith("loss"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rows.append((f"e2edet {recipe}", time_steps(step, args.iters)))
        if recipe == "fcos_mnv2_cpu":
            ours_fcos = model

    # torchvision FCOS: same backbone + FPN module type and width, same head depth, same image size and batch.
    ch = cfg.model.fpn_channels
    anchors = AnchorGenerator(sizes=tuple((s,) for s in ours_fcos.strides), aspect_ratios=((1.0,),) * 5)
    tv = FCOS(_BackboneWithFPN(build_model(cfg), ch), num_classes=cfg.model.num_classes, anchor_generator=anchors,
              head=FCOSHead(ch, 1, cfg.model.num_classes, num_convs=cfg.model.num_convs),
              min_size=args.size, max_size=cfg.data.test_max_size, image_mean=list(IMAGENET_MEAN),
              image_std=list(IMAGENET_STD)).train()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tv_images, tv_targets = [], []
    for img, t in zip(*batch):
        h, w = t["size"].tolist()
        tv_images.append(img[:, :h, :w] * std + mean)  # back to [0, 1] RGB; torchvision normalises itself
        tv_targets.append({"boxes": t["boxes"], "labels": t["labels"]})  # sigmoid classes 0..K-1
    tv_opt = torch.optim.SGD([q for q in tv.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)

    def tv_step():
        loss = sum(tv(tv_images, tv_targets).values())
        tv_opt.zero_grad(set_to_none=True)
        loss.backward()
        tv_opt.step()

    rows.append(("torchvision FCOS (same backbone/FPN/head size)", time_steps(tv_step, args.iters)))
    ref = statistics.median(rows[-1][1])
    print(f"\nTrain step, batch {args.batch}, {tuple(batch[0].shape[-2:])} padded input, "
          f"{torch.get_num_threads()} threads, {args.iters} steps after 2 warm-up")
    print("| model | median s/step | min s/step | ratio to torchvision FCOS |")
    print("|---|---|---|---|")
    for name, times in rows:
        med = statistics.median(times)
        print(f"| {name} | {med:.3f} | {min(times):.3f} | {med / ref:.2f} |")


if __name__ == "__main__":
    main()
