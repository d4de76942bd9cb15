"""Dense (FCOS-style) recipes: the published DeFCN and O2F configs and CPU-sized MobileNetV2 variants.

COCO recipes follow ``specs/dense.md`` §1.6 / §2.6 (DeFCN ``playground/detection/coco/*/config.py``): R-50 FPN,
3x schedule with multi-scale training (270k iterations at 16 images per batch, lr steps at 210k and 250k, SGD
lr 0.01, warm-up 1000 iterations from 1e-3; POTO also 6x and 9x), 800/1333 test size. CrowdHuman recipes
(``*_r50_crowdhuman``) follow ``playground/detection/crowdhuman/*/config.py`` (:func:`_crowdhuman`).
``train.batch_size`` is per process: launch them with ``torchrun --nproc_per_node 8`` for the published batch of 16.
They need ``data=PATH`` (a dataset YAML).

O2F recipes follow ``specs/dense.md`` §3.6 (``strongwolf/o2f`` ``configs/r50_1x.py``, ``r50_3x_ms.py``,
``crowdhuman.py``): epoch-based mmdet schedules (12 / 36 / 50 epochs), SGD 0.01 (AdamW 4e-5 on CrowdHuman), warm-up
1000 iterations from 1e-3. mmdet's multi-scale ``'range'`` mode draws the shorter side uniformly in a range; here it
is approximated by the sizes of that range in steps of 32 pixels.

The ``*_mnv2_cpu`` recipes keep each method's assignment, head and loss exactly, and shrink only the backbone
(ImageNet MobileNetV2), the FPN/head width, the image size and the schedule so they train on a 2-core CPU.

O2F's instance-segmentation recipes (``o2f_condinst_*``) follow ``specs/dense.md`` §3.10 (``configs/condinst_r50_1x.py``,
``condinst_r50_3x.py``): the O2F head with the CondInst mask head (``model.masks``), GIoU weight 1.0, warm-up 500
iterations, threshold on the cls probability at test time (``test.score=cls_ctr_cls_thresh``), and the configs'
``paramwise_cfg=dict(bias_lr_mult=2., bias_decay_mult=0.)`` (``train.bias_lr_mult`` / ``train.bias_decay_mult``) with
mmcv's default ``norm_decay_mult`` 1, so norms keep the 1e-4 weight decay there (``train.weight_decay_norm``), unlike
the O2F detection configs (``norm_decay_mult=0.``).
"""

from __future__ import annotations

from e2edet.config import Config
from e2edet.recipes.registry import register_recipe

#: Every dense method: (description, model/loss/test fields). DeFCN folders are under
#: ``Megvii-BaseDetection/DeFCN`` ``playground/detection/{coco,crowdhuman}/`` (``specs/dense.md`` §2.7).
VARIANTS = {
    "fcos": ("FCOS (imprv) one-to-many baseline; evaluated with NMS 0.6",
             dict(centerness=True), dict(assigner="fcos", score="cls", reg_weight=1.0),
             dict(score="cls_ctr_sqrt", nms_iou=0.6)),
    "fcos_wo_ctrness": ("FCOS without the centerness branch (plain GIoU, score cls; fcos...3x_ms.wo_ctrness); NMS 0.6",
                        dict(), dict(assigner="fcos", score="cls", reg_weight=1.0), dict(score="cls", nms_iou=0.6)),
    "atss": (("ATSS one-to-many (top-9 nearest per level, IoU of 8-stride anchors >= mean + std, inside the box) on "
              "the FCOS head with centerness, GIoU weight 2 (atss.res50...crowdhuman); NMS 0.6"),
             dict(centerness=True), dict(assigner="atss", score="cls", reg_weight=2.0),
             dict(score="cls_ctr_sqrt", nms_iou=0.6)),
    "anchor": (("DeFCN one-to-one baseline Anchor: each GT takes its top-1 anchor by IoU (one square anchor per "
                "location, 32..512 on P3..P7), DeltaXYWH regression (anchor.res50...); no NMS"),
               dict(box_coder="anchor_deltas", anchor_size=4.0), dict(assigner="anchor", score="cls"),
               dict(score="cls")),
    "center": (("DeFCN one-to-one baseline Center: per level the point nearest to the GT centre, kept within the FCOS "
                "scale range, smallest GT wins (center.res50...); no NMS"),
               dict(), dict(assigner="center", score="cls"), dict(score="cls")),
    "fg_loss": (("DeFCN one-to-one baseline Foreground loss: Hungarian minimising focal + 2 GIoU inside the 1.5-stride "
                 "centre prior (loss.res50...); no NMS"),
                dict(), dict(assigner="fg_loss", score="cls"), dict(score="cls")),
    "poto": ("POTO one-to-one (Hungarian on p^0.2 IoU^0.8); no NMS",
             dict(), dict(assigner="poto", score="cls"), dict(score="cls")),
    "poto_argmax": ("POTO one-to-one, per-GT argmax instead of Hungarian; no NMS",
                    dict(), dict(assigner="poto_argmax", score="cls"), dict(score="cls")),
    "poto_3dmf": ("POTO + 3D max filtering (score cls*filter); no NMS",
                  dict(max_filter=True), dict(assigner="poto", score="cls_filter"), dict(score="cls_filter")),
    "poto_3dmf_wo_gn": ("POTO + 3D max filtering without GroupNorm (poto...3dmf_wo_gn); no NMS",
                        dict(max_filter=True, max_filter_gn=False), dict(assigner="poto", score="cls_filter"),
                        dict(score="cls_filter")),
    "defcn": ("DeFCN = POTO + 3DMF + auxiliary one-to-many loss; no NMS",
              dict(max_filter=True), dict(assigner="poto", score="cls_filter", aux=True), dict(score="cls_filter")),
    "defcn_wo_gn": ("DeFCN with 3DMF without GroupNorm (poto...3dmf_wo_gn.aux); no NMS",
                    dict(max_filter=True, max_filter_gn=False), dict(assigner="poto", score="cls_filter", aux=True),
                    dict(score="cls_filter")),
    "o2f": ("O2F one-to-few (top-7 per object: 1 certain + soft anchors, t(e) 0.6 -> 0.2), score cls*ctr; no NMS",
            dict(centerness=True, ctr_convs=3, ctr_channels=64), dict(assigner="o2f", score="cls_ctr", reg_weight=2.0),
            dict(score="cls_ctr")),
}
#: The COCO table of DeFCN (3x ms, iteration-based cvpods schedules; POTO also 6x and 9x); O2F has its own
#: epoch-based recipes (``_o2f``).
COCO_VARIANTS = ("fcos", "fcos_wo_ctrness", "anchor", "center", "fg_loss", "poto", "poto_argmax", "poto_3dmf",
                 "poto_3dmf_wo_gn", "defcn", "defcn_wo_gn")
#: ``MAX_ITER`` and ``STEPS`` of DeFCN's ``poto.res50.fpn.coco.800size.{3x,6x,9x}_ms/config.py``.
COCO_SCHEDULES = {"3x": (270_000, (210_000, 250_000)), "6x": (540_000, (480_000, 520_000)),
                  "9x": (810_000, (750_000, 790_000))}
#: The CrowdHuman table of DeFCN (``playground/detection/crowdhuman/*.800size.30k``).
CROWDHUMAN_VARIANTS = ("fcos", "atss", "poto", "poto_3dmf", "defcn")
#: CPU-sized variants: every method of the DeFCN tables that the BCCD comparison trains, and O2F.
CPU_VARIANTS = ("fcos", "fcos_wo_ctrness", "atss", "anchor", "center", "fg_loss", "poto", "poto_argmax", "poto_3dmf",
                "defcn", "o2f")


def _sizes(lo: int, hi: int) -> tuple[int, ...]:
    """Shorter sides ``lo, lo + 32, ..., hi`` (mmdet's ``'range'`` multi-scale mode on a 32-pixel grid)."""
    return tuple(range(lo, hi + 1, 32))


def _apply(cfg: Config, model: dict, loss: dict, test: dict) -> None:
    for section, values in (("model", model), ("loss", loss), ("test", test)):
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)


def _coco(variant: str, schedule: str = "3x") -> Config:
    desc, model, loss, test = VARIANTS[variant]
    cfg = Config.for_arch("dense", name=f"{variant}_r50_{schedule}_ms",
                          description=f"{desc}. COCO R-50 FPN {schedule} ms (published config)")
    cfg.data.dataset = ""
    cfg.data.train_min_sizes = (640, 672, 704, 736, 768, 800)
    cfg.model.backbone = "resnet50"
    _apply(cfg, model, loss, test)
    iters, steps = COCO_SCHEDULES[schedule]
    t = cfg.train
    t.batch_size, t.max_iters, t.steps = 2, iters, tuple(s / iters for s in steps)
    t.optimizer, t.lr, t.warmup_iters, t.warmup_factor, t.eval_period = "sgd", 0.01, 1000, 0.001, 0
    return cfg


def _crowdhuman(variant: str) -> Config:
    """DeFCN's CrowdHuman configs (``playground/detection/crowdhuman/<variant>.res50.fpn.crowdhuman.800size.30k``):
    30k iterations at 16 images (steps 20k, 25k), lr 0.01, short side 800 (no multi-scale) with the long side at most
    1400, flip, top-500 detections; POTO's prior is the inside of the box (``POTO.CENTER_SAMPLING_RADIUS=0``), FCOS
    keeps its 1.5-stride centre sampling. The single class comes from the data (``e2edet data convert crowdhuman``);
    ignore regions are crowd boxes, which training leaves out, as the official ``gt_classes >= 0`` filter does."""
    desc, model, loss, test = VARIANTS[variant]
    cfg = Config.for_arch("dense", name=f"{variant}_r50_crowdhuman",
                          description=f"{desc}. CrowdHuman R-50 FPN 30k iterations (published config)")
    cfg.data.dataset = ""
    cfg.data.train_min_sizes, cfg.data.train_max_size = (800,), 1400
    cfg.data.test_min_size, cfg.data.test_max_size = 800, 1400
    cfg.model.backbone = "resnet50"
    _apply(cfg, model, loss, test)
    if loss["assigner"] == "poto":
        cfg.loss.center_radius = 0.0
    cfg.test.max_detections = 500
    t = cfg.train
    t.batch_size, t.max_iters, t.steps = 2, 30_000, (20_000 / 30_000, 25_000 / 30_000)
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
    # 100 epochs of the 40 tree tiles (1000 iterations, 14-17 min on 2 CPU cores): DeFCN's AP on the held-out crop
    # without NMS approaches its AP with NMS only late (epoch 20: 8.1 / 9.5, 60: 10.8 / 11.6, 80: 11.0 / 11.3,
    # 100: 10.3 / 10.5, seed 42; 60 epochs ended at 9.3 / 10.5, 140 epochs at 10.7 / 10.8 in 1.4x the time);
    # evaluated every 10 epochs, so `best` is chosen by validation AP and the AP curve has points
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


def _condinst(schedule: str) -> Config:
    """O2F CondInst published configs: ``condinst_r50_1x`` (12 epochs, shorter side 800) and ``condinst_r50_3x``
    (36 epochs, shorter side 640-800, mmdet's 'range' on a 32-pixel grid)."""
    _, model, loss, test = VARIANTS["o2f"]
    cfg = Config.for_arch("dense", name=f"o2f_condinst_r50_{schedule}",
                          description=f"O2F instance segmentation (CondInst-style dynamic mask head, dice loss, mask "
                                      f"AP beside box AP); no NMS. Published config condinst_r50_{schedule} "
                                      "(specs/dense.md 3.10)")
    cfg.data.dataset, cfg.data.masks = "", True
    cfg.model.backbone, cfg.model.masks = "resnet50", True
    _apply(cfg, model, loss, test)
    cfg.loss.reg_weight, cfg.test.score = 1.0, "cls_ctr_cls_thresh"
    t = cfg.train
    t.batch_size, t.optimizer, t.lr, t.weight_decay, t.momentum = 2, "sgd", 0.01, 1e-4, 0.9
    t.warmup_iters, t.warmup_factor, t.eval_period, t.clip_grad_norm = 500, 0.001, 0, 0.0
    t.bias_lr_mult, t.bias_decay_mult, t.weight_decay_norm = 2.0, 0.0, 1e-4  # condinst_r50_*.py paramwise_cfg
    if schedule == "1x":
        cfg.data.train_min_sizes, t.epochs, t.steps = (800,), 12, (8 / 12, 11 / 12)
    else:
        cfg.data.train_min_sizes, t.epochs, t.steps = _sizes(640, 800), 36, (24 / 36, 33 / 36)
    return cfg


def _condinst_cpu() -> Config:
    """O2F CondInst on DSB2018 nuclei at CPU size: MobileNetV2-FPN-64, 2 tower convs, mask branch 64 wide with 2 convs
    (8 bases, the 169-parameter dynamic head and every loss unchanged), 256-384 px images."""
    cfg = _condinst("1x")
    cfg.name = "o2f_condinst_mnv2_cpu"
    cfg.description = ("O2F instance segmentation (CondInst-style mask head) on DSB2018 nuclei; no NMS. CPU-sized: "
                       "MobileNetV2-FPN-64, mask branch 64 x 2, ~320 px images")
    cfg.data.dataset = "dsb2018"
    cfg.data.train_min_sizes, cfg.data.train_max_size = (256, 288, 320, 352, 384), 512
    cfg.data.test_min_size, cfg.data.test_max_size = 320, 512
    cfg.model.backbone, cfg.model.fpn_channels, cfg.model.num_convs = "mobilenet_v2", 64, 2
    cfg.model.ctr_channels = cfg.model.fpn_channels // 4
    cfg.model.mask_channels, cfg.model.mask_convs = 64, 2
    t = cfg.train
    # 4 epochs of the 520 training images (520 iterations, ~1.7 s each on 2 CPU cores: ~15 min), evaluated after
    # epochs 2 and 4 (the 72 validation images with masks take ~1-2 min); O2F's t(e) runs over these 4 epochs
    t.epochs, t.batch_size, t.workers = 4, 4, 2
    t.optimizer, t.lr, t.weight_decay, t.warmup_iters, t.warmup_factor = "adamw", 1e-3, 1e-4, 100, 0.01
    # the AdamW CPU schedule was tuned and measured (README) without the published paramwise_cfg
    t.bias_lr_mult, t.bias_decay_mult, t.weight_decay_norm = 1.0, 1.0, 0.0
    t.steps, t.clip_grad_norm, t.log_period, t.eval_period = (0.75,), 10.0, 10, 2
    return cfg


for _variant in CPU_VARIANTS:
    register_recipe(lambda v=_variant: _cpu(v))
for _variant in COCO_VARIANTS:
    register_recipe(lambda v=_variant: _coco(v))
for _schedule in ("6x", "9x"):
    register_recipe(lambda s=_schedule: _coco("poto", s))
for _variant in CROWDHUMAN_VARIANTS:
    register_recipe(lambda v=_variant: _crowdhuman(v))
for _name in ("r50_1x", "r50_3x_ms", "r101_1x", "r101_3x_ms", "r50_crowdhuman"):
    register_recipe(lambda n=_name: _o2f(n))
for _schedule in ("1x", "3x"):
    register_recipe(lambda n=_schedule: _condinst(n))
register_recipe(_condinst_cpu)
