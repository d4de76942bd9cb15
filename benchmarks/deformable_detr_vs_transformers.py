"""Time a training step and an inference of e2edet's Deformable DETR next to Hugging Face transformers'
``DeformableDetrForObjectDetection`` with the same architecture, weights, backbone, sizes, queries and batch.

    python benchmarks/deformable_detr_vs_transformers.py [--iters 5] [--batch 2] [--size 384] [--variant two_stage]
        [--width 256] [--layers 6] [--queries 300] [--threads 2]

transformers' model (random weights, its own ResNet-50 backbone config: no download) is converted to e2edet with
``e2edet.models.detr.convert.from_transformers``, so both compute the same function (checked before timing); both
backbones use frozen BatchNorm and train layer2-layer4, as the published models do (transformers' model is built
with its backbone frozen; its last three stages are unfrozen here, so both train the same parameters). Dropout is
the official 0.1 in both: after attention, after the FFN activation and on the decoder self-attention weights
(transformers' defaults are 0 for the last two). The input is a padded batch of random images; one training step =
forward + the model's Hungarian set loss on the same targets (transformers: its own ``loss_function`` with labels;
e2edet: the ``deformable_detr`` criterion) + backward + an AdamW step. Reported: median seconds over ``--iters``
(the two models timed alternately, after one warm-up each) and the median of the per-pair ratios e2edet /
transformers. The numbers depend on the machine; both run in this one process.
"""

from __future__ import annotations

import argparse

import torch

from e2edet.build import build_criterion
from e2edet.config import Config, apply_overrides
from e2edet.models.detr.convert import from_transformers
from e2edet.models.detr.deformable_detr import DeformableDETR
from timing import timed_pairs  # benchmarks/timing.py (the script's folder is on sys.path)

VARIANTS = {"plain": {}, "refine": {"with_box_refine": True}, "two_stage": {"with_box_refine": True, "two_stage": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=384, help="square input side in pixels (multiple of 32)")
    p.add_argument("--variant", choices=list(VARIANTS), default="two_stage")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    kw = VARIANTS[args.variant]
    backbone = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                         layer_type="bottleneck", out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=backbone,
        d_model=args.width, encoder_layers=args.layers, decoder_layers=args.layers, encoder_ffn_dim=1024,
        decoder_ffn_dim=1024, num_queries=args.queries, two_stage_num_proposals=args.queries, num_labels=3,
        auxiliary_loss=True, dropout=0.1, activation_dropout=0.1, attention_dropout=0.1, **kw)
    torch.manual_seed(0)
    hf = transformers.DeformableDetrForObjectDetection(config)
    ours = DeformableDETR("resnet50", num_classes=3, pretrained=False, norm="FrozenBN", hidden_dim=args.width,
                          num_queries=args.queries, enc_layers=args.layers, dec_layers=args.layers, **kw)
    ours.load_state_dict(from_transformers(hf.state_dict()), strict=False)
    for name, param in hf.named_parameters():  # train the same backbone stages as the official recipe (layer2-4)
        if ".backbone." in name and any(f"stages.{i}." in name for i in (1, 2, 3)):
            param.requires_grad_(True)
    cfg = apply_overrides(Config.for_arch("deformable_detr"), ["model.num_classes=3", f"model.fpn_channels={args.width}",
                                                               f"model.dec_layers={args.layers}"]
                          + [f"model.{k}=true" for k in kw])
    criterion = build_criterion(cfg)
    b, s = args.batch, args.size
    images = torch.randn(b, 3, s, s)
    sizes = torch.tensor([[s, s]] + [[s - 32, s - 64]] * (b - 1))
    mask = ((torch.arange(s)[None, :, None] < sizes[:, 0, None, None])
            & (torch.arange(s)[None, None, :] < sizes[:, 1, None, None])).long()
    boxes = torch.tensor([[20.0, 30.0, 120.0, 160.0], [150.0, 100.0, 250.0, 300.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 2]), "size": sz} for sz in sizes]
    labels = [{"class_labels": t["labels"],
               "boxes": torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
               / torch.tensor([sz[1], sz[0], sz[1], sz[0]]).float()} for t, sz in zip(targets, sizes)]
    for m in (hf, ours):
        m.eval()
    with torch.no_grad():
        diff = (hf(pixel_values=images, pixel_mask=mask).logits - ours(images, sizes)["pred_logits"]).abs().max()
    print(f"check: max |logits difference| = {float(diff):.2e} (same function); trainable parameters: e2edet "
          f"{sum(q.numel() for q in ours.parameters() if q.requires_grad):,}, transformers "
          f"{sum(q.numel() for q in hf.parameters() if q.requires_grad):,}")
    opt_hf = torch.optim.AdamW([q for q in hf.parameters() if q.requires_grad], lr=1e-5)
    opt_ours = torch.optim.AdamW([q for q in ours.parameters() if q.requires_grad], lr=1e-5)

    def step_hf():
        out = hf(pixel_values=images, pixel_mask=mask, labels=labels)
        opt_hf.zero_grad()
        out.loss.backward()
        opt_hf.step()

    def step_ours():
        losses = criterion(ours(images, sizes), targets)
        opt_ours.zero_grad()
        sum(v for k, v in losses.items() if "loss" in k).backward()
        opt_ours.step()

    rows = []
    for name, fn_hf, fn_ours, mode in (
        ("inference", lambda: hf(pixel_values=images, pixel_mask=mask), lambda: ours(images, sizes), "eval"),
        ("training step", step_hf, step_ours, "train"),
    ):
        for m in (hf, ours):
            m.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            rows.append((name, *timed_pairs(fn_ours, fn_hf, args.iters)))
    print(f"Deformable DETR ({args.variant}), R-50, d={args.width}, {args.layers}+{args.layers} layers, "
          f"{args.queries} queries, batch {b} of {s}x{s}, {args.threads} threads, median of {args.iters}")
    print(f"| {'':14} | e2edet s | transformers s | ratio |")
    for name, t_ours, t_hf, ratio in rows:
        print(f"| {name:14} | {t_ours:8.3f} | {t_hf:14.3f} | {ratio:5.2f} |")


if __name__ == "__main__":
    main()
