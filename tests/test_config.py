"""Config: dotted overrides, aliases, type checks, YAML round trip, recipes."""

import pytest

from e2edet.config import (Config, ConfigError, apply_overrides, from_dict, load_config, overrides_for_arch,
                           parse_device, ranges, save_config, to_dict)
from e2edet.recipes import get_recipe, list_recipes


def test_overrides_types_and_aliases():
    cfg = apply_overrides(Config(), ["data=bccd", "train.epochs=3", "data.train_min_sizes=320,352",
                                     "model.pretrained=false", "lr=1e-3", "train.steps=[0.5, 0.8]"])
    assert cfg.data.dataset == "bccd" and cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.train_min_sizes == (320, 352) and cfg.model.pretrained is False
    assert cfg.train.steps == (0.5, 0.8)


def test_overrides_return_a_copy():
    base = Config()
    apply_overrides(base, ["train.epochs=3"])
    assert base.train.epochs == Config().train.epochs


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "did you mean train.epochs"),
    ("train.epochs=abc", "expects an integer"),
    ("loss.assigner=hungarian", "is not one of fcos, atss, poto, poto_argmax, anchor, center, fg_loss, o2f"),
    ("model.pretrained=maybe", "expects true/false"),
    ("train", "not of the form key=value"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("loss.score=cls_filter", "needs model.max_filter=true"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


def test_yaml_round_trip(tmp_path):
    cfg = get_recipe("defcn_mnv2_cpu")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(tmp_path / "empty.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line 2 column 1: expected ',' or ']'"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "bad.yaml").write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.epochz'"):
        load_config(tmp_path / "bad.yaml")


def test_recipes_cover_the_published_variants():
    names = [n for n, _ in list_recipes()]
    for variant in ("fcos", "poto", "poto_3dmf", "defcn"):
        assert f"{variant}_r50_3x_ms" in names and f"{variant}_mnv2_cpu" in names
    defcn = get_recipe("defcn_r50_3x_ms")
    assert defcn.model.max_filter and defcn.loss.aux and defcn.loss.assigner == "poto"
    assert defcn.loss.score == defcn.test.score == "cls_filter" and defcn.test.nms_iou == 0
    assert defcn.train.max_iters == 270_000 and defcn.train.lr == 0.01
    assert [round(s * 270_000) for s in defcn.train.steps] == [210_000, 250_000]
    fcos = get_recipe("fcos_r50_3x_ms")
    assert fcos.model.centerness and fcos.test.score == "cls_ctr_sqrt" and fcos.test.nms_iou == 0.6
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe("nope")


@pytest.mark.parametrize("override, message", [
    ("model.fpn_channels=0", "model.fpn_channels must be >= 1, got 0"),
    ("model.fpn_channels=-32", "model.fpn_channels must be >= 1"),
    ("model.num_convs=-1", "model.num_convs must be >= 0"),
    ("model.freeze_at=6", "model.freeze_at must be in [0, 5]"),
    ("model.num_queries=0", "model.num_queries must be >= 1"),
    ("model.dropout=1", "model.dropout must be in [0, 1)"),
    ("test.topk_candidates=0", "test.topk_candidates must be >= 1, got 0"),
    ("test.max_detections=0", "test.max_detections must be >= 1"),
    ("test.score_thresh=1", "test.score_thresh must be in [0, 1)"),
    ("test.nms_iou=-0.1", "test.nms_iou must be in [0, 1)"),
    ("test.eval_nms_iou=0", "test.eval_nms_iou must be in (0, 1]"),
    ("batch=0", "train.batch_size must be >= 1"),
    ("workers=-1", "train.workers must be >= 0"),
    ("lr=0", "train.lr must be > 0"),
    ("lr=nan", "train.lr must be a finite number"),
    ("lr=inf", "train.lr must be a finite number"),
    ("train.momentum=1", "train.momentum must be in [0, 1)"),
    ("train.weight_decay=-1e-4", "train.weight_decay must be >= 0"),
    ("train.gamma=0", "train.gamma must be > 0"),
    ("train.warmup_factor=0", "train.warmup_factor must be in (0, 1]"),
    ("train.warmup_iters=-5", "train.warmup_iters must be >= 0"),
    ("train.max_iters=-1", "train.max_iters must be >= 0"),
    ("train.log_period=0", "train.log_period must be >= 1"),
    ("train.eval_period=-1", "train.eval_period must be >= 0"),
    ("seed=-1", "train.seed must be >= 0"),
    ("train.steps=0.5,1.5", "train.steps must be in (0, 1)"),
    ("data.train_min_sizes=640,0", "data.train_min_sizes must be >= 1"),
    ("data.test_max_size=0", "data.test_max_size must be >= 1"),
    ("data.flip_prob=2", "data.flip_prob must be in [0, 1]"),
    ("loss.focal_gamma=-1", "loss.focal_gamma must be >= 0"),
    ("loss.center_radius=-1", "loss.center_radius must be >= 0"),
    ("loss.o2f_topk=0", "loss.o2f_topk must be >= 1"),
    ("loss.giou_weight=nan", "loss.giou_weight must be a finite number"),
    ("model.num_classes=-2", "model.num_classes must be >= 0"),
])
def test_out_of_range_values_name_the_key(override, message):
    query_only = override.split("=")[0] in ("model.num_queries", "model.dropout", "loss.giou_weight")
    base = Config.for_arch("sparse_rcnn") if query_only else Config()
    with pytest.raises(ConfigError, match=f"^command line: {message}".replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(base, [override])


def test_ranges_name_real_keys_and_every_recipe_passes():
    for arch in ("dense", "sparse_rcnn", "adamixer"):
        cfg = Config.for_arch(arch)
        keys = {f"{s}.{k}" for s, sec in to_dict(cfg).items() if isinstance(sec, dict) for k in sec}
        assert set(ranges(arch)) <= keys
    assert len(ranges()) >= 66  # every number of every architecture has its range (63 before the typed sections)
    for name, _ in list_recipes():
        from_dict(to_dict(get_recipe(name)), name)  # validates
    assert apply_overrides(Config(), ["loss.focal_alpha=-1"]).loss.focal_alpha == -1  # alpha < 0 disables it


def test_class_names_must_match_num_classes():
    with pytest.raises(ConfigError, match="model.num_classes=3 but model.class_names lists 2 names"):
        apply_overrides(Config(), ["model.num_classes=3", "model.class_names=a,b"])


@pytest.mark.parametrize("spec, parsed", [
    ("auto", ("auto", None)), ("cpu", ("cpu", None)), ("CPU", ("cpu", None)), ("cuda", ("cuda", None)),
    ("cuda:1", ("cuda", 1)), ("0", ("cuda", 0)), ("1", ("cuda", 1)), (0, ("cuda", 0)), ("mps", ("mps", None)),
    ("mps:0", ("mps", 0)), (" cuda:0 ", ("cuda", 0)),
])
def test_device_forms(spec, parsed):
    assert parse_device(spec) == parsed
    assert apply_overrides(Config(), [f"device={spec}"]).train.device == str(spec).strip()


@pytest.mark.parametrize("spec, message", [
    ("gpu", "train.device='gpu' is not a device .*for a GPU write cuda or 0"),
    ("tpu", "train.device='tpu' is not a device"),
    ("cuda:x", "train.device='cuda:x': the device index must be a number"),
    ("cuda:", "train.device='cuda:': the device index must be a number"),
    ("cuda:-1", "the device index must be a number"),
    ("mps:1", "Apple MPS has a single device"),
    ("0,1", "one device per process"),
    ("", "is not a device"),
])
def test_bad_device_strings_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [f"device={spec}"])


def test_a_key_of_another_architecture_names_where_it_belongs(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: model.num_queries belongs to model.arch=sparse_rcnn or "
                                          r"adamixer or deformable_detr, not to model.arch=dense"):
        apply_overrides(get_recipe("defcn_mnv2_cpu"), ["model.num_queries=50"])
    with pytest.raises(ConfigError, match="loss.assigner belongs to model.arch=dense, not to model.arch=adamixer"):
        apply_overrides(get_recipe("adamixer_mnv2_cpu"), ["loss.assigner=o2f"])
    with pytest.raises(ConfigError, match="model.num_groups belongs to model.arch=adamixer, not to "
                                          "model.arch=sparse_rcnn"):
        apply_overrides(get_recipe("sparse_rcnn_mnv2_cpu"), ["model.num_groups=8"])
    data = to_dict(get_recipe("poto_mnv2_cpu"))
    data["model"]["dynamic_dim"] = 16
    (tmp_path / "c.yaml").write_text(__import__("yaml").safe_dump(data))
    with pytest.raises(ConfigError, match=r"c.yaml: model.dynamic_dim belongs to model.arch=sparse_rcnn"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"model.arch='detr' is not one of dense, sparse_rcnn, adamixer, "
                                          r"deformable_detr"):
        apply_overrides(Config(), ["model.arch=detr"])


def test_sections_hold_only_their_architecture_keys():
    dense, query = to_dict(get_recipe("defcn_mnv2_cpu")), to_dict(get_recipe("adamixer_mnv2_cpu"))
    assert "num_queries" not in dense["model"] and "cls_weight" not in dense["loss"]
    assert "num_convs" not in query["model"] and "assigner" not in query["loss"]
    assert {"num_groups", "in_points", "out_points"} <= set(query["model"]) and "dynamic_dim" not in query["model"]
    assert {"cost_class", "cost_l1", "cost_giou"} <= set(query["loss"])


def test_switching_arch_keeps_the_shared_keys():
    cfg = apply_overrides(get_recipe("poto_mnv2_cpu"), ["model.num_queries=50", "model.arch=sparse_rcnn",
                                                        "loss.focal_gamma=1.5"])
    assert cfg.model.arch == "sparse_rcnn" and cfg.model.num_queries == 50 and cfg.model.dynamic_dim == 64
    assert cfg.model.backbone == "mobilenet_v2" and cfg.model.fpn_channels == 128  # shared keys kept
    assert cfg.loss.focal_gamma == 1.5 and cfg.loss.cls_weight == 2.0 and not hasattr(cfg.loss, "assigner")


def test_flat_config_of_the_earlier_format_loads():
    """A flat config (every architecture's keys, as written up to c2b5238) loads; the other keys are dropped, and
    only a complete flat section is read that way (one stray key is still an error)."""
    flat_model = dict(arch="adamixer", backbone="resnet50", pretrained=True, freeze_at=2, fpn_channels=256, num_convs=4,
                      centerness=False, ctr_convs=0, ctr_channels=64, max_filter=False, max_filter_gn=True,
                      num_queries=300, num_stages=6, num_heads=8, dim_feedforward=2048, dynamic_dim=64,
                      stage_init="official", num_groups=4, in_points=32, out_points=128, dropout=0.0, proposal_init="",
                      drmm=False, num_classes=0, class_names=[])
    flat_loss = dict(assigner="poto", score="cls", aux=False, focal_alpha=0.25, focal_gamma=2.0, reg_weight=2.0,
                     poto_alpha=0.8, center_radius=1.5, aux_topk=9, aux_weight=1.0, keep_infeasible=False, o2f_topk=7,
                     soft_weight=0.4, max_soft_weight=1.0, max_t=0.6, min_t=0.2, o2f_neg_weight=0.75, cls_weight=3.0,
                     l1_weight=5.0, giou_weight=2.0, min_scale_ratio=0.04, mm_weight=1.0, mcm_weight=0.5,
                     prob_weight=1.0, coord_dist="cauchy")
    cfg = from_dict({"model": flat_model, "loss": flat_loss}, "old.yaml")
    assert cfg.model.arch == "adamixer" and cfg.model.num_queries == 300 and cfg.loss.cls_weight == 3.0
    assert cfg.loss.cost_class == 2.0  # not in the flat format: the default, as the matcher then used
    with pytest.raises(ConfigError, match="old.yaml: model.num_convs belongs to model.arch=dense"):
        from_dict({"model": {"arch": "adamixer", "num_convs": 4}}, "old.yaml")


def test_for_arch_and_unknown_sections():
    cfg = Config.for_arch("adamixer", name="x")
    assert cfg.model.arch == "adamixer" and type(cfg.loss).__name__ == "QueryLossSection" and cfg.name == "x"
    assert type(Config().loss).__name__ == "DenseLossSection"
    with pytest.raises(ConfigError, match="unknown config key 'modle'; did you mean model"):
        from_dict({"modle": {}})
    with pytest.raises(ConfigError, match="model must be a mapping"):
        from_dict({"model": 3})


def test_overrides_for_arch_leave_out_keys_of_other_architectures():
    over = ["data=bccd", "model.num_queries=10", "model.num_convs=1", "model.dynamic_dim=8", "loss.aux=true",
            "model.arch=adamixer", "model.nope=1"]
    assert overrides_for_arch(over, "dense") == ["data=bccd", "model.num_convs=1", "loss.aux=true",
                                                 "model.arch=adamixer", "model.nope=1"]
    assert overrides_for_arch(over, "sparse_rcnn") == ["data=bccd", "model.num_queries=10", "model.dynamic_dim=8",
                                                       "model.arch=adamixer", "model.nope=1"]
