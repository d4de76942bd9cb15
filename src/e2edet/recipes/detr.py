"""DETR-family recipes: Deformable DETR and its published variants (COCO configs and CPU-sized variants).

COCO recipes follow ``specs/detr.md`` §1.6 (``fundamentalvision/Deformable-DETR`` ``main.py`` and
``configs/r50_deformable_detr*.sh``): R-50 (stem + layer1 frozen, FrozenBN), 300 queries, 6 + 6 layers, d 256, AdamW
lr 2e-4 with the backbone and the ``reference_points``/``sampling_offsets`` projections at 0.1 x (the model's
``lr_multipliers``, ``model.lr_backbone_mult``/``model.lr_linear_proj_mult``), weight decay 1e-4 on every parameter
(the official AdamW has one weight decay, so ``train.weight_decay_norm`` is 1e-4 too), gradient clipping at L2 norm
0.1, no warm-up, 50 epochs with the lr drop (x0.1) at epoch 40. ``train.batch_size`` is per process: the README
results use a total batch of 32 (launch with ``torchrun`` on 16 GPUs, 2 images each; §1.9: a total of 16 costs about
0.5-1 AP). The 12-epoch recipes are the H-DETR/MS-DETR baselines (``HDETR/H-Deformable-DETR``
``configs/two_stage/deformable-detr-baseline/12eps/r50_*.sh``: ``--epochs 12 --lr_drop 11``, FFN 2048, otherwise
``main.py``'s defaults; the README trains on 8 GPUs x 2 = a total batch of 16). Test: short side 800 (max 1333),
top-100 over queries x classes, no NMS. They need ``data=PATH``.

Deviations: the DETR augmentation's second branch (resize to 400/500/600, random crop 384-600, then the multi-scale
resize) is approximated by ``data.crop`` (a random crop of 50-100 % of each side, then the multi-scale resize), as in
the query recipes; multi-scale is 480..800 in steps of 32 with max 1333, as in the official code.

SQR and MS-DETR (``specs/detr.md`` §2.6, §3.6) are training strategies on top of these variants: the published
SQR-Deformable-DETR (single-stage, no refinement, 50 epochs) and MS-DETR on the 12-epoch baselines (300 queries;
Deformable-DETR++ also 900 queries, evaluated top-300); o2o class weight 1, o2m 2 / 5 / 2, encoder matched on the
anchors without class cost. The CPU recipes put them on the refinement variant (SQR, MS-DETR and both, a combination
no official code has) and MS-DETR on ++.

The ``*_mnv2_cpu`` recipes keep each variant's decoder (6 layers), losses and inference and shrink the backbone
(ImageNet MobileNetV2), the width (128, 8 heads of 16), the FFN (half the published width: 512, and 1024 for ++), the
queries (100), the encoder (3 layers: it runs over every position of the 4 levels, about 5000 at 416x576, and took
~1.6 s of a ~14 s training step per layer at batch 4 on 2 cores; the decoder's 100 queries cost little), the image
size and the schedule (24 epochs, warm-up of 100 iterations, drops at 75 % and 92 %) so they train on a 2-core CPU.
"""

from __future__ import annotations

from e2edet.config import Config
from e2edet.recipes.registry import register_recipe

#: variant -> (name infix, description, model fields). ``two_stage`` is the README's cumulative "++ two-stage".
VARIANTS = {
    "plain": ("", "Deformable DETR: multi-scale deformable attention encoder and decoder, focal set loss on every "
                  "decoder layer; top-100, no NMS", dict()),
    "refine": ("_refine", "Deformable DETR + iterative box refinement; top-100, no NMS", dict(with_box_refine=True)),
    "two_stage": ("_two_stage", "Deformable DETR ++ two-stage (refinement + encoder proposals, class-agnostic "
                                "encoder loss); top-100, no NMS", dict(with_box_refine=True, two_stage=True)),
    "two_stage_ffn2048": ("_two_stage_ffn2048", "Deformable DETR two-stage + refinement, FFN 2048 (the "
                                                "'Deformable-DETR' baseline of H-DETR and MS-DETR); top-100, no NMS",
                          dict(with_box_refine=True, two_stage=True, dim_feedforward=2048)),
    "pp": ("_pp", "Deformable-DETR++ (H-DETR 'Deformable-DETR + tricks', MS-DETR's baseline): two-stage + "
                  "refinement, FFN 2048, dropout 0, mixed query selection, look-forward-twice; top-100, no NMS",
           dict(with_box_refine=True, two_stage=True, dim_feedforward=2048, dropout=0.0, mixed_selection=True,
                look_forward_twice=True)),
}
#: variant -> epochs of its published COCO recipe (50: Deformable-DETR README; 12: H-DETR's baselines).
COCO_EPOCHS = {"plain": 50, "refine": 50, "two_stage": 50, "two_stage_ffn2048": 12, "pp": 12}
#: variants with a CPU-sized recipe (two_stage_ffn2048 differs from two_stage only in the FFN width).
CPU_VARIANTS = ("plain", "refine", "two_stage", "pp")


def _base(variant: str, name: str, description: str) -> Config:
    infix, desc, model = VARIANTS[variant]
    cfg = Config.for_arch("deformable_detr", name=name, description=f"{desc}. {description}")
    for key, value in model.items():
        setattr(cfg.model, key, value)
    cfg.test.score, cfg.test.max_detections = "cls", 100
    t = cfg.train
    t.optimizer, t.lr, t.weight_decay, t.weight_decay_norm, t.clip_grad_norm = "adamw", 2e-4, 1e-4, 1e-4, 0.1
    return cfg


def _coco(variant: str) -> Config:
    epochs = COCO_EPOCHS[variant]
    gpus = 16 if epochs == 50 else 8
    name = f"deformable_detr{VARIANTS[variant][0]}_r50_{epochs}e"
    source = "Deformable-DETR README" if epochs == 50 else "H-DETR 12-epoch baseline"
    cfg = _base(variant, name, f"COCO R-50 {epochs} epochs, lr drop at {epochs - 10 if epochs == 50 else 11} "
                               f"({source}); 2 images per process: launch on {gpus} GPUs for the published total "
                               f"batch of {2 * gpus}")
    cfg.data.dataset = ""
    cfg.data.train_min_sizes, cfg.data.train_max_size, cfg.data.crop = tuple(range(480, 801, 32)), 1333, True
    cfg.data.test_min_size, cfg.data.test_max_size = 800, 1333
    m, t = cfg.model, cfg.train
    m.backbone, m.fpn_channels, m.num_queries = "resnet50", 256, 300
    t.epochs, t.batch_size, t.eval_period = epochs, 2, 0
    t.steps = (40 / 50,) if epochs == 50 else (11 / 12,)
    t.warmup_iters = 0  # the official StepLR has no warm-up
    return cfg


def _cpu(variant: str) -> Config:
    name = f"deformable_detr{VARIANTS[variant][0]}_mnv2_cpu"
    cfg = _base(variant, name, "CPU-sized: MobileNetV2, 128-d, 3 encoder + 6 decoder layers, 100 queries, ~400 px "
                                 "images")
    cfg.data.dataset = "trees"
    cfg.data.train_min_sizes, cfg.data.train_max_size = (352, 384, 416, 448), 640
    cfg.data.test_min_size, cfg.data.test_max_size = 416, 640
    m = cfg.model
    m.backbone, m.fpn_channels, m.num_queries, m.enc_layers = "mobilenet_v2", 128, 100, 3
    m.dim_feedforward //= 2  # 1024 -> 512, ++: 2048 -> 1024 (the published ratio to the width, at half the width)
    t = cfg.train
    t.epochs, t.batch_size, t.workers = 24, 4, 2
    t.warmup_iters, t.warmup_factor, t.steps, t.log_period, t.eval_period = 100, 0.01, (0.75, 0.92), 10, 0
    return cfg


#: training strategy -> (description, model fields, loss fields), applied on top of a variant's recipe.
STRATEGIES = {
    "sqr": ("SQR: layer s also re-runs the query sets of layers s-1 and s-2 (1, 2, 3, 5, 8, 13 sets: 32 supervised "
            "layer passes, each set with its own reference); inference unchanged", dict(sqr="selective"), {}),
    "ms": ("MS-DETR: one-to-many supervision of the same queries, tapped after cross-attention through an auxiliary "
           "FFN (layers CA -> SA -> FFN), up to 6 queries per GT; inference one-to-one", dict(ms_detr=True),
           dict(cls_weight=1.0, enc_cost_class=0.0, enc_match_anchors=True)),
}


def _with(strategies: tuple[str, ...], cfg: Config, name: str) -> Config:
    """``cfg`` with the strategies' model and loss fields and ``name``; descriptions joined."""
    cfg.name = name
    cfg.description = ". ".join([STRATEGIES[s][0] for s in strategies] + [cfg.description])
    for s in strategies:
        for section, fields in (("model", STRATEGIES[s][1]), ("loss", STRATEGIES[s][2])):
            for key, value in fields.items():
                setattr(getattr(cfg, section), key, value)
    return cfg


def _sqr_coco() -> Config:
    """SQR-Deformable-DETR (``Fangyi-Chen/SQR`` ``configs/sqr/deformable_detr_SQR_r50_50e_coco.py``): the
    single-stage model without refinement, 50 epochs, total batch 32 (the author's 8 GPUs x 4)."""
    return _with(("sqr",), _coco("plain"), "sqr_deformable_detr_r50_50e")


def _ms_coco(variant: str, queries: int) -> Config:
    """MS-DETR (``Atten4Vis/MS-DETR`` ``scripts/train_ms_detr_300.sh``, ``train_ms_detr_pp_300.sh``,
    ``train_ms_detr_pp_900.sh``): the 12-epoch baselines with ``--use_ms_detr --use_aux_ffn --cls_loss_coef 1``,
    total batch 16; 900 queries are evaluated top-300."""
    infix = "_pp" if variant == "pp" else ""
    cfg = _with(("ms",), _coco(variant), f"ms_detr{infix}_{queries}q_r50_12e")
    cfg.model.num_queries, cfg.test.max_detections = queries, 300 if queries == 900 else 100
    return cfg


def _strategy_cpu(strategies: tuple[str, ...], variant: str) -> Config:
    prefix = "sqr_" if "sqr" in strategies else ""
    base = "ms_detr" if "ms" in strategies else "deformable_detr"
    return _with(strategies, _cpu(variant), f"{prefix}{base}{VARIANTS[variant][0]}_mnv2_cpu")


for _variant in CPU_VARIANTS:
    register_recipe(lambda v=_variant: _cpu(v))
for _strategies, _variant in ((("sqr",), "refine"), (("ms",), "refine"), (("sqr", "ms"), "refine"), (("ms",), "pp")):
    register_recipe(lambda s=_strategies, v=_variant: _strategy_cpu(s, v))
for _variant in VARIANTS:
    register_recipe(lambda v=_variant: _coco(v))
register_recipe(_sqr_coco)
for _variant, _queries in (("two_stage_ffn2048", 300), ("pp", 300), ("pp", 900)):
    register_recipe(lambda v=_variant, q=_queries: _ms_coco(v, q))
