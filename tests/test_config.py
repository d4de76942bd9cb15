"""Config: dotted overrides, aliases, type checks, YAML round trip, recipes."""

import pytest

from e2edet.config import Config, ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict
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
