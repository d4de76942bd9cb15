"""MS-DETR (spec ``detr.md`` §3.2, §3.4, §3.8 properties 7-11) and SQR (§2.8) on Deformable DETR: the layer order and
one-to-many tap, no leakage of the o2m branch into inference, the o2m and encoder sets of the criterion, and SQR's
recollected sets (own references, batched = loop, inference unchanged), alone and combined."""

import pytest
import torch

from e2edet.build import build_criterion, build_model
from e2edet.config import apply_overrides
from e2edet.models.detr.deformable_detr import DeformableDETR
from e2edet.models.detr.transformer import DeformableDecoderLayer
from e2edet.models.query.recollection import Recollection
from e2edet.recipes import get_recipe

SIZES = torch.tensor([[128, 160], [96, 128]])


def _targets():
    return [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 90.0], [70.0, 20.0, 150.0, 100.0]]),
             "labels": torch.tensor([0, 2]), "size": SIZES[0]},
            {"boxes": torch.tensor([[5.0, 5.0, 50.0, 40.0]]), "labels": torch.tensor([1]), "size": SIZES[1]}]


def _images():
    return torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))


def _model(**kw):
    torch.manual_seed(0)
    args = dict(backbone_name="resnet18", num_classes=3, pretrained=False, norm="FrozenBN", hidden_dim=32,
                num_queries=12, enc_layers=1, dec_layers=3, num_heads=4, dim_feedforward=64, dropout=0.0)
    return DeformableDETR(**{**args, **kw})


# ---------------------------------------------------------------- the MS-DETR decoder layer (property 7)
def _layer_inputs():
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 10), (4, 5)]
    memory = torch.randn(2, 100, 32, generator=g)
    return (torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g),
            torch.rand(2, 6, 2, 2, generator=g), memory, shapes, None)


def test_ms_detr_layer_order_and_tap():
    torch.manual_seed(0)
    plain = DeformableDecoderLayer(32, 64, 0.0, 2, 4, 2)
    torch.manual_seed(0)
    ms = DeformableDecoderLayer(32, 64, 0.0, 2, 4, 2, ms_detr=True, aux_ffn=False)
    ms.load_state_dict(plain.state_dict())
    tgt, pos, ref, memory, shapes, mask = _layer_inputs()
    post_ca = ms._cross_attention(tgt, pos, ref, memory, shapes, mask)
    out, tap = ms(tgt, pos, ref, memory, shapes, mask)  # modules start in training mode
    assert torch.equal(tap, post_ca)  # without the aux FFN the tap is the post-cross-attention state
    torch.testing.assert_close(out, ms._ffn(ms._self_attention(post_ca, pos)))  # CA -> SA -> FFN
    base, none = plain(tgt, pos, ref, memory, shapes, mask)
    assert none is None and not torch.allclose(base, out)  # the baseline order SA -> CA -> FFN differs

    torch.manual_seed(0)
    aux = DeformableDecoderLayer(32, 64, 0.0, 2, 4, 2, ms_detr=True, aux_ffn=True)
    _, tap = aux(tgt, pos, ref, memory, shapes, mask)
    t = aux._cross_attention(tgt, pos, ref, memory, shapes, mask)
    torch.testing.assert_close(tap, aux.norm4(t + aux.linear4(torch.relu(aux.linear3(t)))))
    assert {"linear3.weight", "linear4.weight", "norm4.weight"} <= set(aux.state_dict())  # official names


@pytest.mark.parametrize("variant", [dict(with_box_refine=True), dict(with_box_refine=True, two_stage=True,
                                                                      mixed_selection=True, look_forward_twice=True)])
def test_o2m_branch_does_not_reach_inference(variant):
    # property 8 and "identical inference outputs with the o2m branch present or absent"
    with_aux, without = _model(ms_detr=True, aux_ffn=True, **variant), _model(ms_detr=True, aux_ffn=False, **variant)
    missing, unexpected = without.load_state_dict(with_aux.state_dict(), strict=False)
    assert not missing and unexpected and all(k.split(".")[-2] in ("linear3", "linear4", "norm4") for k in unexpected)
    with_aux.eval(), without.eval()
    with torch.no_grad():
        a = with_aux(_images(), SIZES)
        for layer in with_aux.transformer.decoder.layers:  # perturb the auxiliary FFN
            layer.linear3.weight.add_(1.0)
            layer.norm4.bias.add_(0.5)
        b, c = with_aux(_images(), SIZES), without(_images(), SIZES)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    assert "pred_logits_o2m" not in a  # the tap is training-only
    with_aux.train()  # dropout 0: same o2o outputs in training, and the tap is there
    train_out = with_aux(_images(), SIZES)
    torch.testing.assert_close(train_out["pred_logits"], b["pred_logits"])
    assert train_out["stages"][0]["pred_logits_o2m"].shape == b["pred_logits"].shape


def test_ms_detr_criterion_sets_and_weights():
    cfg = apply_overrides(get_recipe("ms_detr_pp_300q_r50_12e"), ["model.num_classes=3"])
    crit = build_criterion(cfg)
    by_name = {s.name: s for s in crit.sets}
    assert set(by_name) == {"stage{i}", "enc", "stage{i}_o2m"}
    o2o, enc, o2m = by_name["stage{i}"], by_name["enc"], by_name["stage{i}_o2m"]
    assert (o2o.cls_weight, o2o.l1_weight, o2o.giou_weight) == (1.0, 5.0, 2.0)  # --cls_loss_coef 1
    assert (o2m.cls_weight, o2m.l1_weight, o2m.giou_weight, o2m.normalizer) == (2.0, 5.0, 2.0, "num_gt")
    assert (enc.cls_weight, enc.l1_weight, enc.giou_weight) == (2.0, 5.0, 2.0)
    assert enc.match_boxes_key == "anchors_norm" and enc.matcher.cost_class == 0.0  # property 11
    assert (o2m.matcher.threshold, o2m.matcher.k, o2m.matcher.coef_box, o2m.matcher.coef_cls) == (0.4, 6, 0.7,
                                                                                                   pytest.approx(0.3))
    assert o2m.logits_key == "pred_logits_o2m" and o2m.boxes_key == "pred_boxes_norm_o2m"


def test_ms_detr_training_step_has_o2m_losses_on_every_layer():
    # property 9: 6 layers x 3 o2m terms; finite, every parameter (aux FFN included) gets a gradient
    cfg = apply_overrides(get_recipe("ms_detr_pp_mnv2_cpu"), ["model.pretrained=false", "model.num_classes=3",
                                                              "model.num_queries=20"])
    torch.manual_seed(0)
    model, crit = build_model(cfg).train(), build_criterion(cfg)
    losses = crit(model(_images(), SIZES), _targets())
    o2m = [k for k in losses if "_o2m_loss" in k]
    assert len(o2m) == 18 and sorted({k.split("_")[0] for k in o2m}) == [f"stage{i}" for i in range(6)]
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    assert torch.isfinite(total)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_encoder_set_matches_on_anchors():
    # property 11: the anchors decide the matching, the loss uses the regressed boxes
    cfg = apply_overrides(get_recipe("ms_detr_pp_mnv2_cpu"), ["model.pretrained=false", "model.num_classes=3"])
    crit = build_criterion(cfg)
    enc = next(s for s in crit.sets if s.name == "enc")
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(2, 30, 4, generator=g) * 0.3 + 0.2
    anchors = torch.rand(2, 30, 4, generator=g) * 0.3 + 0.2
    logits = torch.randn(2, 30, 3, generator=g)
    from e2edet.losses.set_criterion import SetCriterion

    only_enc = SetCriterion(3, sets=[enc])
    a = only_enc({"enc_outputs": {"pred_logits": logits, "pred_boxes_norm": boxes, "anchors_norm": anchors}},
                 _targets())
    b = only_enc({"enc_outputs": {"pred_logits": logits, "pred_boxes_norm": boxes, "anchors_norm": boxes}},
                 _targets())
    assert not torch.equal(a["enc_loss_bbox"], b["enc_loss_bbox"])


# ---------------------------------------------------------------- SQR on Deformable DETR
@pytest.mark.parametrize("variant", [dict(), dict(with_box_refine=True), dict(with_box_refine=True, two_stage=True,
                                                                              mixed_selection=True,
                                                                              look_forward_twice=True)],
                         ids=["plain", "refine", "pp"])
def test_sqr_detr_inference_unchanged_and_batched_equals_loop(variant):
    plain, sqr = _model(**variant), _model(recollection=Recollection.build(3), **variant)
    sqr.load_state_dict(plain.state_dict(), strict=True)
    plain.eval(), sqr.eval()
    with torch.no_grad():
        a, b = plain(_images(), SIZES), sqr(_images(), SIZES)
    assert "recollected" not in b
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
    sqr.train()  # dropout 0: batched and loop agree; the chain equals the plain decoder
    out = sqr(_images(), SIZES)
    assert len(out["recollected"]) == 6 and out["recollected_stages"] == [0, 1, 1, 2, 2, 2]
    sqr.recollection = Recollection.build(3, batched=False)
    loop = sqr(_images(), SIZES)
    for x, y in zip(out["recollected"], loop["recollected"]):
        for key in ("pred_logits", "pred_boxes_norm"):
            torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-4)
    for s in range(3):
        torch.testing.assert_close(out["stages"][s]["pred_boxes_norm"], a["stages"][s]["pred_boxes_norm"],
                                   rtol=1e-4, atol=1e-5)


def test_sqr_with_ms_detr_supervises_o2m_on_every_recollected_set():
    cfg = apply_overrides(get_recipe("sqr_ms_detr_refine_mnv2_cpu"), ["model.pretrained=false",
                                                                      "model.num_classes=3", "model.num_queries=20"])
    torch.manual_seed(0)
    model, crit = build_model(cfg).train(), build_criterion(cfg)
    out = model(_images(), SIZES)
    assert len(out["recollected"]) == 32 and all("pred_logits_o2m" in d for d in out["recollected"])
    losses = crit(out, _targets())
    single = crit({"stages": out["stages"], **out["stages"][-1]}, _targets())  # the chain alone
    assert losses["stage5_o2m_loss_cls"] > 5 * single["stage5_o2m_loss_cls"]  # 13 sets summed at layer 5
    torch.testing.assert_close(losses["stage0_o2m_loss_cls"], single["stage0_o2m_loss_cls"])  # 1 set at layer 0


def test_sqr_detr_config_checks():
    from e2edet.config import ConfigError

    with pytest.raises(ConfigError, match="aux_loss"):
        apply_overrides(get_recipe("deformable_detr_mnv2_cpu"), ["model.sqr=selective", "loss.aux_loss=false"])
    with pytest.raises(ConfigError, match="belongs to"):
        apply_overrides(get_recipe("fcos_mnv2_cpu"), ["model.ms_detr=true"])
