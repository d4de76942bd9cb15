"""AdaMixer (and D-RMM + AdaMixer) model: operators, stage, init and the output contract (spec query.md 2.2, 2.8,
2.9, 3.10; docs/architecture.md "Query model output")."""

import math

import pytest
import torch

from e2edet.models.query.adamixer import AdaMixer, AdaMixerStage, ChannelMapping
from e2edet.models.query.adamixer_ops import (AdaptiveMixing, box_iof, initial_xyzr, iof_attn_bias, joint_layer_norm,
                                              level_weights, make_sample_points, position_embedding, sampling_3d)
from e2edet.ops.boxes import refine_xyzr, xyxy_to_xyzr, xyzr_to_xyxy
from e2edet.models.query.common import proposal_init

STRIDES = [4, 8, 16, 32]
H, W = 64, 96  # network input; levels 16x24, 8x12, 4x6, 2x3


def _tiny(drmm=False, backbone="resnet18", **kwargs):
    torch.manual_seed(0)
    cfg = dict(num_classes=3, pretrained=False, hidden_dim=32, num_queries=5, num_heads=4, dim_feedforward=64,
               num_groups=4, in_points=6, out_points=8, drmm=drmm)
    cfg.update(kwargs)
    return AdaMixer(backbone, **cfg)


def _features(channels=8, batch=2):
    return [torch.randn(batch, channels, H // s, W // s) for s in STRIDES]


# 1. xyzr round trip, initial state ------------------------------------------------------------------------------
def test_xyzr_round_trip_and_initial_state():
    xy = torch.rand(50, 2) * 100
    boxes = torch.cat([xy, xy + torch.rand(50, 2) * 80 + 0.5], dim=-1)
    torch.testing.assert_close(xyzr_to_xyxy(xyxy_to_xyzr(boxes)), boxes, rtol=0, atol=1e-4)
    # w = 2^(z - r/2), h = 2^(z + r/2)
    torch.testing.assert_close(xyzr_to_xyxy(torch.tensor([10.0, 20.0, 3.0, 2.0])), torch.tensor([8.0, 12, 12, 28]))

    sizes = torch.tensor([[64.0, 96.0], [50.0, 80.0]], requires_grad=True)
    xyzr = initial_xyzr(sizes, proposal_init("whole", 3))
    assert xyzr.shape == (2, 3, 4) and xyzr.dtype == torch.float32 and not xyzr.requires_grad
    expected = torch.tensor([48.0, 32.0, math.log2(math.sqrt(96 * 64)), math.log2(64 / 96)])
    torch.testing.assert_close(xyzr[0, 2], expected)
    torch.testing.assert_close(xyzr_to_xyxy(xyzr[1]), torch.tensor([[0.0, 0, 80, 50]]).expand(3, 4), atol=1e-4, rtol=0)


def test_grid_initial_xyzr_is_the_drmm_grid_and_the_drmm_default():
    sizes = torch.tensor([[60.0, 80.0], [40.0, 120.0]])
    xyzr = initial_xyzr(sizes, proposal_init("grid", 12))  # 3 x 4 grid of half-size boxes
    assert xyzr.shape == (2, 12, 4) and not xyzr.requires_grad
    boxes = xyzr_to_xyxy(xyzr)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([-10.0, -5.0, 30.0, 25.0]), atol=1e-4, rtol=0)  # (10, 10)
    torch.testing.assert_close(boxes[1, -1], torch.tensor([75.0, 23.333, 135.0, 43.333]), atol=1e-3, rtol=0)
    torch.testing.assert_close(boxes[..., 2] - boxes[..., 0], sizes[:, 1:2].expand(2, 12) / 2, atol=1e-4, rtol=0)
    assert _tiny(drmm=True, num_queries=12).proposal_init == "grid" and _tiny().proposal_init == "whole"
    assert _tiny(drmm=True, num_queries=12, proposal_init="whole").proposal_init == "whole"


# 2. refinement --------------------------------------------------------------------------------------------------
def test_refine_zero_delta_is_identity_and_dx_moves_by_sqrt_wh():
    xyzr = xyxy_to_xyzr(torch.tensor([[10.0, 20.0, 40.0, 100.0]]))  # w 30, h 80
    assert torch.equal(refine_xyzr(xyzr, torch.zeros(1, 4)), xyzr)
    step = math.sqrt(30 * 80)
    moved = xyzr_to_xyxy(refine_xyzr(xyzr, torch.tensor([[1.0, 0, 0, 0]])))
    torch.testing.assert_close(moved, torch.tensor([[10 + step, 20, 40 + step, 100]]))
    moved = xyzr_to_xyxy(refine_xyzr(xyzr, torch.tensor([[0.0, -1, 1, 0]])))  # up by sqrt(wh), twice as large
    torch.testing.assert_close(moved, torch.tensor([[-5.0, 60 - step - 80, 55, 60 - step + 80]]))


# 3. level weights -----------------------------------------------------------------------------------------------
def test_level_weights():
    z = torch.tensor([[2.0, 3.0, 4.0, 5.0, 3.5]])
    w = level_weights(z, STRIDES)
    assert w.shape == (1, 5, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 5))
    assert w[0, :4].argmax(-1).tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(w[0, 4, 1], w[0, 4, 2])
    # explicit formula softmax_j(-(z - log2 s_j)^2 / 2)
    logits = torch.tensor([-(3.5 - j) ** 2 / 2 for j in (2, 3, 4, 5)])
    torch.testing.assert_close(w[0, 4], logits.softmax(0))


# 4. sampling_3d -------------------------------------------------------------------------------------------------
def _loop_sampling(points, features, strides):
    """Every point's bilinear sample (align_corners False, zeros outside) and level mix, with explicit loops."""
    b_, n_, g_, p_, _ = points.shape
    c = features[0].shape[1] // g_
    out = torch.zeros(b_, n_, g_, p_, c, dtype=torch.float64)
    for b in range(b_):
        for n in range(n_):
            for g in range(g_):
                for p in range(p_):
                    x, y, z = points[b, n, g, p].tolist()
                    logits = [-(z - math.log2(s)) ** 2 / 2.0 for s in strides]
                    top = max(logits)
                    weights = [math.exp(v - top) for v in logits]
                    weights = [v / sum(weights) for v in weights]
                    for fmap, s, wl in zip(features, strides, weights):
                        fmap = fmap[b, g * c:(g + 1) * c].double()
                        u, v = x / s - 0.5, y / s - 0.5  # pixel coordinates of the point on this level
                        u0, v0 = math.floor(u), math.floor(v)
                        for xx, wx in ((u0, 1 - (u - u0)), (u0 + 1, u - u0)):
                            for yy, wy in ((v0, 1 - (v - v0)), (v0 + 1, v - v0)):
                                if 0 <= xx < fmap.shape[2] and 0 <= yy < fmap.shape[1]:
                                    out[b, n, g, p] += wl * wx * wy * fmap[:, yy, xx]
    return out


def test_sampling_3d_matches_loop_reference():
    feats = _features(channels=4)
    points = torch.rand(2, 3, 2, 4, 3) * torch.tensor([136.0, 104.0, 5.0]) - torch.tensor([20.0, 20.0, -1.0])
    out = sampling_3d(points, feats, STRIDES)
    assert out.shape == (2, 3, 2, 4, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _loop_sampling(points, feats, STRIDES), rtol=1e-5, atol=1e-5)


def test_sampling_3d_constant_map_and_outside_points():
    const = torch.arange(8.0).view(1, 8, 1, 1) + 1.0  # channel k holds k + 1
    feats = [const.expand(1, 8, H // s, W // s) for s in STRIDES]
    inside = torch.rand(1, 5, 2, 6, 3) * torch.tensor([64.0, 32.0, 6.0]) + torch.tensor([16.0, 16.0, 0.0])
    out = sampling_3d(inside, feats, STRIDES)  # >= 1 feature pixel inside every level (stride 32 map is 2x3)
    torch.testing.assert_close(out[0, :, 0], (torch.arange(4.0) + 1).expand(5, 6, 4))
    torch.testing.assert_close(out[0, :, 1], (torch.arange(4.0) + 5).expand(5, 6, 4))
    far = inside.clone()
    far[..., 0] = -1000.0
    assert torch.equal(sampling_3d(far, feats, STRIDES), torch.zeros_like(out))


# 5. channel-group isolation -------------------------------------------------------------------------------------
def test_channel_group_isolation():
    feats = _features(channels=8)
    points = torch.rand(2, 3, 4, 5, 3) * torch.tensor([96.0, 64.0, 4.0]) + torch.tensor([0.0, 0.0, 1.5])
    base = sampling_3d(points, feats, STRIDES)
    for g in range(4):
        bumped = [f.clone() for f in feats]
        for f in bumped:
            f[:, 2 * g:2 * g + 2] += torch.randn_like(f[:, 2 * g:2 * g + 2])
        out = sampling_3d(points, bumped, STRIDES)
        changed = (out - base).abs().amax(dim=(0, 1, 3, 4)) > 1e-4
        assert changed.tolist() == [k == g for k in range(4)]


# 6. adaptive mixing ---------------------------------------------------------------------------------------------
def test_mixing_widths_at_published_sizes_and_shared_params_at_init():
    stage = AdaMixerStage()  # 256-d, 8 heads, G 4, P_in 32, P_out 128
    assert stage.mixing.parameter_generator.weight.shape == (32768, 256)  # 4·(64·64 + 32·128)
    assert stage.mixing.out_proj.weight.shape == (256, 32768)
    assert stage.offset_generator.weight.shape == (384, 256)
    m, s = stage.mixing.generate(torch.randn(2, 7, 256))
    assert m.shape == (2, 7, 4, 64, 64) and s.shape == (2, 7, 4, 128, 32)
    assert torch.equal(m, m[:1, :1].expand_as(m)) and torch.equal(s, s[:1, :1].expand_as(s))
    assert m[0, 0, 0].std() > 0 and m.abs().max() <= 1 / 16  # the generator bias keeps its default uniform init


def test_adaptive_mixing_matches_explicit_reference():
    mix = AdaptiveMixing(16, 24, in_points=5, out_points=7, num_groups=2)
    torch.nn.init.normal_(mix.parameter_generator.weight, std=0.1)
    x, q = torch.randn(2, 3, 2, 5, 8), torch.randn(2, 3, 24)
    params = q @ mix.parameter_generator.weight.T + mix.parameter_generator.bias
    out = torch.zeros(2, 3, 2, 7, 8)
    for b in range(2):
        for n in range(3):
            for g in range(2):
                chunk = params[b, n].view(2, -1)[g]
                m_, s_ = chunk[:64].view(8, 8), chunk[64:].view(7, 5)
                t = x[b, n, g] @ m_
                t = torch.relu((t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5))
                t = s_ @ t
                out[b, n, g] = torch.relu((t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5))
    expected = mix.out_proj(out.flatten(2))
    torch.testing.assert_close(mix(x, q), expected, rtol=1e-4, atol=1e-5)


# 7. joint layer norm --------------------------------------------------------------------------------------------
def test_joint_layer_norm_statistics():
    x = torch.randn(2, 3, 4, 8, 16) * torch.rand(8, 1) * 5 + torch.randn(8, 1) * 3  # per-point scale and shift
    y = joint_layer_norm(x)
    torch.testing.assert_close(y.mean(dim=(-2, -1)), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(-2, -1), unbiased=False), torch.ones(2, 3, 4), atol=1e-3, rtol=0)
    assert y.mean(-1).abs().max() > 0.1  # not a per-point (row-wise) layer norm


# 8. IoF attention bias ------------------------------------------------------------------------------------------
def test_iof_attention_bias():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [100, 100, 110, 110], [0, 0, 20, 20]],
                          [[0.0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 60, 60]]])
    tau = torch.tensor([0.5, 1.0, 2.0])
    bias = iof_attn_bias(xyxy_to_xyzr(boxes), tau)
    assert bias.shape == (6, 3, 3)
    assert torch.diagonal(bias, dim1=-2, dim2=-1).abs().max() < 1e-5
    log_zero = math.log(1e-7)
    assert log_zero == pytest.approx(-16.118, abs=1e-3)
    for h in range(3):  # row b·heads + h
        torch.testing.assert_close(bias[h, 0, 1], tau[h] * log_zero)
        torch.testing.assert_close(bias[h, 0, 2], torch.tensor(0.0), atol=1e-5, rtol=0)  # box 0 inside box 2: IoF 1
        torch.testing.assert_close(bias[h, 2, 0], tau[h] * math.log(0.25 + 1e-7))  # IoF uses the row box's area
        torch.testing.assert_close(bias[3 + h, 0, 1], tau[h] * math.log(0.5 + 1e-7))
        torch.testing.assert_close(bias[3 + h, 2, 1], tau[h] * log_zero)
    torch.testing.assert_close(box_iof(boxes)[1, 1, 0], torch.tensor(0.5), atol=1e-4, rtol=0)
    tau.requires_grad_(True)
    iof_attn_bias(xyxy_to_xyzr(boxes), tau).sum().backward()
    assert tau.grad is not None and torch.isfinite(tau.grad).all()


# 9. position embedding ------------------------------------------------------------------------------------------
def test_position_embedding_shape_and_values():
    xyzr = torch.tensor([[[480.0, 320.0, 7.5, -0.5]]]).expand(2, 3, 4)
    pe = position_embedding(xyzr, 16)
    assert pe.shape == (2, 3, 64)
    for k, value in enumerate([0.48, 0.32, 7.5, -0.5]):
        for i in range(16):
            angle = value / 10000 ** (2 * (i // 2) / 16)
            assert pe[1, 2, 16 * k + i].item() == pytest.approx(math.sin(angle) if i % 2 == 0 else math.cos(angle),
                                                                 abs=1e-6)


# 10. stage outputs ----------------------------------------------------------------------------------------------
def test_stage_outputs_shapes_and_zero_deltas_at_init():
    stage = AdaMixerStage(32, num_classes=3, num_heads=4, dim_feedforward=64, num_groups=4, in_points=4,
                          out_points=8)
    xyzr = xyxy_to_xyzr(torch.tensor([[10.0, 10, 50, 40], [0, 0, 96, 64]]).expand(2, 2, 4))
    out = stage(torch.randn(2, 2, 32), xyzr, _features(32), STRIDES)
    assert out["pred_logits"].shape == (2, 2, 3) and out["content"].shape == (2, 2, 32)
    assert torch.equal(out["box_deltas"], torch.zeros(2, 2, 4))
    assert torch.equal(out["xyzr"], xyzr)
    torch.testing.assert_close(out["pred_boxes"], xyzr_to_xyxy(xyzr))
    # square P_in = 4: regular 2x2 grid of cell centers; z offset -1
    bias = stage.offset_generator.bias.view(4, 4, 3)
    assert torch.equal(bias[0, :, :2], torch.tensor([[-0.25, -0.25], [-0.25, 0.25], [0.25, -0.25], [0.25, 0.25]]))
    points = make_sample_points(stage.offset_generator(out["content"]), xyzr, 4)
    torch.testing.assert_close(points[0, 0, 0, 0], torch.tensor([20.0, 17.5, xyzr[0, 0, 2].item() - 1]))


def test_init_survives_model_construction():
    model = _tiny()
    assert model.neck.norm.num_groups == 32 and all(torch.equal(c.bias, torch.zeros(32)) for c in model.neck.convs)
    assert [type(m) for m in model.neck.modules()].count(torch.nn.GroupNorm) == 1  # one GN shared by all levels
    for stage in model.stages:
        assert torch.equal(stage.offset_generator.weight, torch.zeros_like(stage.offset_generator.weight))
        bias = stage.offset_generator.bias.view(4, 6, 3)
        assert torch.all(bias[..., 2] == -1) and bias[..., :2].abs().max() <= 0.5 and bias[..., :2].std() > 0.1
        assert not stage.mixing.parameter_generator.weight.any()
        assert stage.mixing.parameter_generator.bias.abs().max() > 0
        assert torch.all(stage.head.fc_reg.weight == 0) and torch.all(stage.head.fc_reg.bias == 0)
        torch.testing.assert_close(stage.head.fc_cls.bias, torch.full((3,), -math.log(99.0)))
        assert stage.iof_tau.min() >= 0 and stage.iof_tau.max() <= 4 and stage.iof_tau.shape == (4,)
    assert not any("xyzr" in name for name, _ in model.named_parameters())  # stage-0 position is not learnable


# model-level contract -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drmm", [False, True])
def test_forward_contract_and_finite_gradients(drmm):
    # the D-RMM run skips the backbone backward (speed); whole-image stage-0 boxes for both (D-RMM defaults to grid)
    model = _tiny(drmm, freeze_at=5 if drmm else 2, proposal_init="whole")
    sizes = torch.tensor([[64, 80], [50, 96]])
    out = model(torch.randn(2, 3, H, W), sizes)
    keys = {"pred_logits", "pred_boxes"} | ({"pred_fg", "pred_scales"} if drmm else set())
    assert set(out) == keys | {"stages"} and len(out["stages"]) == 6
    for stage in out["stages"]:
        assert set(stage) == keys
        assert stage["pred_logits"].shape == (2, 5, 3)
        assert stage["pred_boxes"].shape == (2, 5, 4) and stage["pred_boxes"].dtype == torch.float32
        if drmm:
            assert stage["pred_fg"].shape == (2, 5) and stage["pred_scales"].shape == (2, 5, 4)
            assert stage["pred_scales"].dtype == torch.float32 and torch.all(stage["pred_scales"] > 0)
            fg = stage["pred_fg"].sigmoid()
            assert torch.all((fg > 0) & (fg < 1))
    for key in keys:
        assert out[key] is out["stages"][-1][key]
    # zero fc_reg at init: every stage's box is the whole UNPADDED image
    whole = torch.tensor([[0.0, 0, 80, 64], [0, 0, 96, 50]])[:, None].expand(2, 5, 4)
    for stage in out["stages"]:
        torch.testing.assert_close(stage["pred_boxes"], whole, atol=1e-4, rtol=0)

    loss = sum((s[k].float() * torch.rand_like(s[k].float())).sum() for s in out["stages"] for k in keys)
    loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    silent = {n for n, p in params.items() if not p.grad.any()}
    assert all(".head.reg_fcs." in n for n in silent)  # only behind the zero-initialised fc_reg
    assert model.content.weight.grad.abs().sum() > 0 and model.stages[0].iof_tau.grad.abs().sum() > 0


def test_xyzr_detached_between_stages():
    model = _tiny(freeze_at=5, num_stages=2)
    out = model(torch.randn(1, 3, H, W))
    out["stages"][1]["pred_boxes"].sum().backward()
    assert model.stages[0].head.fc_reg.weight.grad is None  # stage-0 boxes feed stage 1 only through detached xyzr
    assert model.stages[1].head.fc_reg.weight.grad.abs().sum() > 0


def test_input_and_width_errors():
    model = _tiny(drmm=True, backbone="mobilenet_v2", num_queries=6).eval()  # 2 x 3 grid proposals
    assert model.drmm and model.num_classes == 3 and model.strides == STRIDES
    images = torch.randn(1, 3, H, W)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 60, 96))
    with pytest.raises(ValueError, match="rows"):
        model(images, torch.tensor([[64, 96], [64, 96]]))
    with pytest.raises(ValueError, match="image_sizes"):  # the shared check (models.inputs.check_inputs)
        model(images, torch.tensor([[64, 128]]))
    with pytest.raises(ValueError, match="hidden_dim"):
        _tiny(hidden_dim=36)
    with pytest.raises(ValueError, match="rows x cols grid"):
        _tiny(drmm=True)  # D-RMM's default grid init cannot place 5 queries
    with pytest.raises(ValueError, match="unknown proposal init"):
        _tiny(proposal_init="random")
    with pytest.raises(ValueError, match="feature maps"):
        ChannelMapping([8], 32)([torch.randn(1, 8, 4, 4)] * 2)
    with pytest.raises(ValueError, match="3 sampling groups"):
        sampling_3d(torch.zeros(1, 1, 3, 2, 3), _features(8, 1), STRIDES)


def test_self_attention_adds_iof_bias_per_head_and_pe_to_residual():
    stage = AdaMixerStage(16, num_classes=2, num_heads=2, dim_feedforward=32, num_groups=2, in_points=3,
                          out_points=4)
    with torch.no_grad():
        stage.iof_tau.copy_(torch.tensor([0.5, 3.0]))
    boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 0, 15, 10], [40, 40, 60, 70]],
                          [[0.0, 0, 30, 30], [10, 10, 20, 20], [0, 0, 5, 5]]])
    xyzr, q = xyxy_to_xyzr(boxes), torch.randn(2, 3, 16)
    t = q + position_embedding(xyzr, 4)
    wq, wk, wv = stage.attention.in_proj_weight.chunk(3)
    bq, bk, bv = stage.attention.in_proj_bias.chunk(3)
    heads = []
    for h in range(2):  # explicit per-head attention with logits + tau_h · log(IoF + 1e-7)
        sl = slice(8 * h, 8 * h + 8)
        qh, kh, vh = (t @ w[sl].T + b[sl] for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        logits = qh @ kh.transpose(1, 2) / math.sqrt(8) + stage.iof_tau[h] * torch.log(box_iof(boxes) + 1e-7)
        heads.append(logits.softmax(-1) @ vh)
    expected = stage.attention_norm(t + stage.attention.out_proj(torch.cat(heads, dim=-1)))
    torch.testing.assert_close(stage.self_attention(q, xyzr), expected, rtol=1e-4, atol=1e-5)
