"""Config: dotted overrides, aliases, type checks, YAML round trip, recipes."""

import pytest

from e2edet.config import (RANGES, Config, ConfigError, apply_overrides, from_dict, load_config, parse_device,
                           save_config, to_dict)
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
    ("loss.assigner=hungarian", "is not one of fcos, poto, poto_argmax"),
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
    ("loss.center_radius=0", "loss.center_radius must be > 0"),
    ("loss.o2f_topk=0", "loss.o2f_topk must be >= 1"),
    ("loss.giou_weight=nan", "loss.giou_weight must be a finite number"),
    ("model.num_classes=-2", "model.num_classes must be >= 0"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^command line: {message}".replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(Config(), [override])


def test_ranges_name_real_keys_and_every_recipe_passes():
    keys = {f"{s}.{k}" for s, sec in to_dict(Config()).items() if isinstance(sec, dict) for k in sec}
    assert set(RANGES) <= keys
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
