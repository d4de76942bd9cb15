"""Dense (FCOS-style) recipes: the published DeFCN and O2F configs and CPU-sized MobileNetV2 variants.

COCO recipes follow ``specs/dense.md`` §1.6 / §2.6 (DeFCN ``playground/detection/coco/*/config.py``): R-50 FPN,
3x schedule with multi-scale training (270k iterations at 16 images per batch, lr steps at 210k and 250k, SGD
lr 0.01, warm-up 1000 iterations from 1e-3), 800/1333 test size. ``train.batch_size`` is per process: launch
them with ``torchrun --nproc_per_node 8`` for the published batch of 16. They need ``data=PATH`` (a dataset YAML).

O2F recipes follow ``specs/dense.md`` §3.6 (``strongwolf/o2f`` ``configs/r50_1x.py``, ``r50_3x_ms.py``,
``crowdhuman.py``): epoch-based mmdet schedules (12 / 36 / 50 epochs), SGD 0.01 (AdamW 4e-5 on CrowdHuman), warm-up
1000 iterations from 1e-3. mmdet's multi-scale ``'range'`` mode draws the shorter side uniformly in a range; here it
is approximated by the sizes of that range in steps of 32 pixels.

The ``*_mnv2_cpu`` recipes keep each method's assignment, head and loss exactly, and shrink only the backbone
(ImageNet MobileNetV2), the FPN/head width, the image size and the schedule so they train on a 2-core CPU.
"""

from __future__ import annotations

from e2edet.config import Config
from e2edet.recipes.registry import register_recipe

#: The four DeFCN-paper variants plus the FCOS baseline: (name suffix, description, model/loss/test fields).
VARIANTS = {
    "fcos": ("FCOS (imprv) one-to-many baseline; evaluated with NMS 0.6",
             dict(centerness=True), dict(assigner="fcos", score="cls", reg_weight=1.0),
             dict(score="cls_ctr_sqrt", nms_iou=0.6)),
    "poto": ("POTO one-to-one (Hungarian on p^0.2 IoU^0.8); no NMS",
             dict(), dict(assigner="poto", score="cls"), dict(score="cls")),
    "poto_argmax": ("POTO one-to-one, per-GT argmax instead of Hungarian; no NMS",
                    dict(), dict(assigner="poto_argmax", score="cls"), dict(score="cls")),
    "poto_3dmf": ("POTO + 3D max filtering (score cls*filter); no NMS",
                  dict(max_filter=True), dict(assigner="poto", score="cls_filter"), dict(score="cls_filter")),
    "defcn": ("DeFCN = POTO + 3DMF + auxiliary one-to-many loss; no NMS",
              dict(max_filter=True), dict(assigner="poto", score="cls_filter", aux=True), dict(score="cls_filter")),
    "o2f": ("O2F one-to-few (top-7 per object: 1 certain + soft anchors, t(e) 0.6 -> 0.2), score cls*ctr; no NMS",
            dict(centerness=True, ctr_convs=3, ctr_channels=64), dict(assigner="o2f", score="cls_ctr", reg_weight=2.0),
            dict(score="cls_ctr")),
}
#: Recipes of the DeFCN paper (iteration-based cvpods schedules); O2F has its own epoch-based ones (``_o2f``).
DEFCN_VARIANTS = ("fcos", "poto", "poto_argmax", "poto_3dmf", "defcn")


def _sizes(lo: int, hi: int) -> tuple[int, ...]:
    """Shorter sides ``lo, lo + 32, ..., hi`` (mmdet's ``'range'`` multi-scale mode on a 32-pixel grid)."""
    return tuple(range(lo, hi + 1, 32))


def _apply(cfg: Config, model: dict, loss: dict, test: dict) -> None:
    for section, values in (("model", model), ("loss", loss), ("test", test)):
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)


def _coco(variant: str) -> Config:
    desc, model, loss, test = VARIANTS[variant]
    cfg = Config.for_arch("dense", name=f"{variant}_r50_3x_ms",
                          description=f"{desc}. COCO R-50 FPN 3x ms (published config)")
    cfg.data.dataset = ""
    cfg.data.train_min_sizes = (640, 672, 704, 736, 768, 800)
    cfg.model.backbone = "resnet50"
    _apply(cfg, model, loss, test)
    t = cfg.train
    t.batch_size, t.max_iters, t.steps = 2, 270_000, (210_000 / 270_000, 250_000 / 270_000)
    t.optimizer, t.lr, t.warmup_iters, t.warmup_factor, t.eval_period = "sgd", 0.01, 1000, 0.001, 0
    return cfg


def _cpu(variant: str) -> Config:
    desc, model, loss, test = VARIANTS[variant]
    cfg = Config.for_arch("dense", name=f"{variant}_mnv2_cpu",
                          description=f"{desc}. CPU-sized: MobileNetV2-FPN-128, ~400 px images")
    cfg.data.dataset = "trees"
    cfg.data.train_min_sizes = (352, 384, 416, 448)
    cfg.data.train_max_size = 640
    cfg.data.test_min_size = 416
    cfg.data.test_max_size = 640
    cfg.model.backbone = "mobilenet_v2"
    cfg.model.fpn_channels = 128
    cfg.model.num_convs = 2
    cfg.model.channels_last = True  # NHWC convolutions: 0.86x the NCHW training step on 2 CPU cores
    _apply(cfg, model, loss, test)
    cfg.model.ctr_channels = cfg.model.fpn_channels // 4  # O2F: feat_channels // 4 (64 of 256)
    t = cfg.train
    # 100 epochs of the 40 tree tiles (1000 iterations, 14 min on 2 CPU cores): DeFCN's AP on the held-out crop
    # without NMS reaches its AP with NMS only late (epoch 20: 7.5 / 10.5, 60: 7.2 / 7.6, 80: 9.4 / 9.5, 90: 9.3 / 9.3,
    # 100: 8.9 / 8.9, seed 42); evaluated every 10 epochs, so `best` is chosen by validation AP and the AP curve has points
    t.epochs, t.batch_size, t.workers = 100, 4, 2
    t.optimizer, t.lr, t.weight_decay, t.warmup_iters, t.warmup_factor = "adamw", 1e-3, 1e-4, 100, 0.01
    t.steps, t.clip_grad_norm, t.log_period, t.eval_period = (0.75, 0.92), 10.0, 10, 10
    return cfg


def _o2f(name: str) -> Config:
    """O2F published configs: ``r50_1x``, ``r50_3x_ms``, ``r101_1x``, ``r101_3x_ms``, ``r50_crowdhuman``."""
    desc, model, loss, test = VARIANTS["o2f"]
    cfg = Config.for_arch("dense", name=f"o2f_{name}", description=f"{desc}. Published config {name} (specs/dense.md 3.6)")
    cfg.data.dataset = ""
    cfg.model.backbone = "resnet101" if name.startswith("r101") else "resnet50"
    _apply(cfg, model, loss, test)
    t = cfg.train
    t.batch_size, t.optimizer, t.lr, t.weight_decay, t.momentum = 2, "sgd", 0.01, 1e-4, 0.9
    t.warmup_iters, t.warmup_factor, t.eval_period, t.clip_grad_norm = 1000, 0.001, 0, 0.0
    if name.endswith("1x"):
        cfg.data.train_min_sizes, t.epochs, t.steps = (800,), 12, (8 / 12, 11 / 12)
    elif name.endswith("3x_ms"):
        cfg.data.train_min_sizes, t.epochs, t.steps = _sizes(640, 800), 36, (24 / 36, 33 / 36)
    else:  # CrowdHuman: num_classes 1, top-4, AdamW 4e-5 (as written in the config), 50 epochs, 500 detections
        cfg.data.train_min_sizes, cfg.data.train_max_size = _sizes(480, 960), 1400
        cfg.data.test_max_size = 1400
        cfg.loss.o2f_topk = 4
        t.epochs, t.steps, t.optimizer, t.lr, t.weight_decay = 50, (40 / 50,), "adamw", 4e-5, 1e-4
        cfg.test.max_detections, cfg.test.topk_candidates = 500, 5000
    return cfg


for _variant in VARIANTS:
    register_recipe(lambda v=_variant: _cpu(v))
for _variant in DEFCN_VARIANTS:
    register_recipe(lambda v=_variant: _coco(v))
for _name in ("r50_1x", "r50_3x_ms", "r101_1x", "r101_3x_ms", "r50_crowdhuman"):
    register_recipe(lambda n=_name: _o2f(n))
