"""Sparse R-CNN and D-RMM + Sparse R-CNN model: DynamicConv sizes, box decode, RoI pooling, stage chaining, output
contract (spec query.md 1.2, 1.8 #1 #2 #5 #6 #10, 3.2, 3.8 #1 #2 #17; docs/architecture.md "Query model output")."""

import copy
import math

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from e2edet.models.query.dynamic_conv import DIIStage, DynamicConv
from e2edet.models.query.sparse_rcnn import PyramidRoIAlign, SparseRCNN
from e2edet.ops.boxes import MAX_LOG_RATIO, delta_xywh_decode

K, N, D = 5, 6, 32
MB = "mobilenet_v2"  # cheapest backbone to build
SIZES = torch.tensor([[48, 80], [64, 96]])  # unpadded (h, w) of a 64x96 padded batch


def _tiny(drmm=False, backbone="resnet18", num_queries=N, **kwargs):
    torch.manual_seed(0)
    return SparseRCNN(backbone, num_classes=K, pretrained=False, hidden_dim=D, num_queries=num_queries, num_heads=4,
                      dim_feedforward=64, dynamic_dim=8, drmm=drmm, **kwargs)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def srcnn():
    return _tiny()


@pytest.fixture(scope="module")
def drmm_model():
    return _tiny(drmm=True, backbone=MB, num_queries=12)  # 3 x 4 grid proposals


# ---------------------------------------------------------------- published sizes, init (1.8 #1, #5; 3.2)
@pytest.mark.parametrize("drmm", [False, True])
def test_published_layer_sizes_and_defaults(drmm):
    with torch.device("meta"):  # shapes only: no memory, no forward
        model = SparseRCNN(pretrained=False, num_queries=300, drmm=drmm)
    assert len(model.stages) == 6 and model.init_proposal_features.weight.shape == (300, 256)
    for stage in model.stages:
        dyn = stage.dynamic_conv
        assert (dyn.dynamic_layer.in_features, dyn.dynamic_layer.out_features) == (256, 2 * 256 * 64) == (256, 32768)
        assert (dyn.fc_layer.in_features, dyn.fc_layer.out_features) == (49 * 256, 256) == (12544, 256)
        assert stage.attention.embed_dim == 256 and stage.attention.num_heads == 8
        assert stage.ffn.net[0].out_features == 2048
        assert stage.output.fc_cls.out_features == (81 if drmm else 80)
        assert stage.output.fc_reg.out_features == (8 if drmm else 4)
        assert len(stage.output.cls_fcs) == 3 and len(stage.output.reg_fcs) == 9
        assert all(lin.bias is None for lin in stage.output.reg_fcs if isinstance(lin, torch.nn.Linear))
    assert model.fpn.inner_blocks[0][0].in_channels == 256 and model.fpn.layer_blocks[3][0].out_channels == 256
    assert len(model.fpn.inner_blocks) == 4 and model.fpn.extra_blocks is None and model.strides == [4, 8, 16, 32]
    pool = model.roi_pool
    assert (pool.strides, pool.output_size, pool.sampling_ratio, pool.aligned) == ((4, 8, 16, 32), 7, 2, True)


def test_dynamic_conv_matches_per_proposal_loop():
    torch.manual_seed(0)
    dyn = DynamicConv(dim=16, dynamic_dim=4, pooler_size=3)
    q, roi = torch.randn(5, 16), torch.randn(5, 16, 3, 3)
    out = dyn(q, roi)
    assert out.shape == (5, 16)
    ln = torch.nn.functional.layer_norm
    for r in range(5):
        params = dyn.dynamic_layer(q[r])
        p1, p2 = params[: 16 * 4].view(16, 4), params[16 * 4:].view(4, 16)
        x = roi[r].reshape(16, 9).T  # rows = the 9 positions
        x = torch.relu(ln(x @ p1, (4,), dyn.norm_in.weight, dyn.norm_in.bias))
        x = torch.relu(ln(x @ p2, (16,), dyn.norm_out.weight, dyn.norm_out.bias))
        ref = torch.relu(dyn.fc_norm(dyn.fc_layer(x.reshape(-1))))  # position-major flatten
        torch.testing.assert_close(out[r], ref)
    with pytest.raises(ValueError, match="DynamicConv"):
        dyn(q[:4], roi)


def test_dynamic_conv_output_at_published_width():
    torch.manual_seed(0)
    out = DynamicConv(256, 64, 7)(torch.randn(3, 256), torch.randn(3, 256, 7, 7))
    assert out.shape == (3, 256) and torch.isfinite(out).all()


def test_cls_bias_prior_and_drmm_zero_biases(srcnn, drmm_model):
    for stage in srcnn.stages:
        bias = stage.output.fc_cls.bias.detach()
        torch.testing.assert_close(bias, torch.full((K,), -math.log(99.0)))
        assert abs(bias[0].item() + 4.595) < 1e-3
        torch.testing.assert_close(bias.sigmoid(), torch.full((K,), 0.01))
        assert torch.all(stage.output.fc_reg.bias == 0)
    for stage in drmm_model.stages:
        assert torch.all(stage.output.fc_cls.bias == 0) and torch.all(stage.output.fc_reg.bias == 0)


def test_proposal_init_defaults_and_grid_300():
    assert torch.all(_tiny(backbone=MB, num_stages=1).init_proposal_boxes.weight == torch.tensor([0.5, 0.5, 1, 1]))
    grid = _tiny(drmm=True, backbone=MB, num_queries=300, num_stages=1).init_proposal_boxes.weight.detach()
    assert grid.shape == (300, 4)
    torch.testing.assert_close(grid[:, 0].unique(), (torch.arange(20) + 0.5) / 20)
    torch.testing.assert_close(grid[:, 1].unique(), (torch.arange(15) + 0.5) / 15)
    assert grid[:, 0].min().item() == pytest.approx(0.025) and grid[:, 0].max().item() == pytest.approx(0.975)
    assert grid[:, 1].min().item() == pytest.approx(1 / 30) and grid[:, 1].max().item() == pytest.approx(29 / 30)
    assert torch.all(grid[:, 2:] == 0.5) and len({tuple(r) for r in grid.tolist()}) == 300
    explicit = _tiny(drmm=True, backbone=MB, num_stages=1, proposal_init="whole")
    assert torch.all(explicit.init_proposal_boxes.weight == torch.tensor([0.5, 0.5, 1.0, 1.0]))


# ---------------------------------------------------------------- box decode (1.8 #2)
def test_delta_decode_zero_clamp_and_formula():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 100.0], [-30.0, 5.0, 200.0, 40.0]])
    torch.testing.assert_close(delta_xywh_decode(boxes, torch.zeros(2, 4)), boxes)
    assert MAX_LOG_RATIO == pytest.approx(4.135, abs=1e-3)
    out = delta_xywh_decode(boxes[:1], torch.tensor([[0.0, 0.0, 10.0, -10.0]]))
    w, h = 40 * math.exp(4.135166556742356), 80 * math.exp(-4.135166556742356)
    torch.testing.assert_close(out, torch.tensor([[30 - w / 2, 60 - h / 2, 30 + w / 2, 60 + h / 2]]))
    # stds (0.5, 0.5, 1, 1): dx = 1 moves the center by w/2; no clipping to the image
    out = delta_xywh_decode(boxes[:1], torch.tensor([[1.0, -2.0, math.log(2), 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[10.0, -60.0, 90.0, 20.0]]))
    assert delta_xywh_decode(boxes.half(), torch.zeros(2, 4).half()).dtype == torch.float32


# ---------------------------------------------------------------- RoI features (1.2, 1.8 #6)
def _square(side, x0=0.0):
    return torch.tensor([[x0, 0.0, x0 + side, side]])


def test_level_mapping_spec_vector_and_mmdet_formula():
    pool = PyramidRoIAlign()
    sides = [111.0, 112.0, 448.0, 10000.0, 1.0, 223.0, 224.0, 447.0]
    levels = pool.levels([torch.cat([_square(s) for s in sides])])
    assert levels.tolist() == [0, 1, 3, 3, 0, 1, 2, 2]
    # mmdet map_roi_levels (finest_scale 56) away from the level boundaries
    scale = torch.empty(500).uniform_(2, 1200)
    scale = scale[((scale / 56).log2() - (scale / 56).log2().round()).abs() > 1e-3]
    wh = torch.stack([scale * 0.5, scale * 2.0], 1)  # w·h = scale^2
    boxes = torch.cat([torch.zeros_like(wh), wh], 1)
    mmdet = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()
    assert torch.equal(pool.levels([boxes]), mmdet)


def test_roi_pooling_equals_roi_align_on_mapped_level():
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 3, 256 // s, 320 // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = [torch.tensor([[3.3, 4.1, 60.2, 50.7], [10.0, 20.0, 150.0, 190.0], [0.0, 0.0, 320.0, 256.0]]),
             torch.tensor([[100.5, 30.2, 340.9, 250.0], [7.0, 9.0, 31.0, 25.0]])]
    expected_levels = [0, 1, 2, 2, 0]  # sqrt(area): 53.5, 153.4, 286.2, 230, 19.6
    pool = PyramidRoIAlign((4, 8, 16, 32), 7, 2)
    out = pool(feats, boxes)
    assert out.shape == (5, 3, 7, 7) and pool.levels(boxes).tolist() == expected_levels
    image = [0, 0, 0, 1, 1]
    rows = torch.cat(boxes)
    for r, (b, lvl) in enumerate(zip(image, expected_levels)):
        ref = roi_align(feats[lvl], torch.cat([torch.tensor([[float(b)]]), rows[r:r + 1]], 1), 7,
                        spatial_scale=1 / (4 * 2**lvl), sampling_ratio=2, aligned=True)
        torch.testing.assert_close(out[r:r + 1], ref)
    # aligned=False is torchvision's MultiScaleRoIAlign given the padded input size
    tv = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    ref = tv(dict(zip(["p2", "p3", "p4", "p5"], feats)), boxes, [(256, 320)] * 2)
    torch.testing.assert_close(PyramidRoIAlign(aligned=False)(feats, boxes), ref)
    # the batched [B, N, 4] form (what the model and its ONNX graph use) pools the same rows in the same order
    same_n = [boxes[0][:2], boxes[1]]
    torch.testing.assert_close(pool(feats, torch.stack(same_n)), pool(feats, same_n))
    # a box with one negative side has no level and pools zeros
    flipped = pool(feats, [torch.tensor([[50.0, 10.0, 20.0, 60.0]]), torch.zeros(0, 4)])
    assert flipped.shape == (1, 3, 7, 7) and torch.all(flipped == 0)
    with pytest.raises(ValueError, match="consecutive powers of two"):
        PyramidRoIAlign((4, 16))


# ---------------------------------------------------------------- stage and model outputs (1.8 #10, contract)
def test_dii_stage_shapes():
    torch.manual_seed(0)
    stage = DIIStage(D, K, num_heads=4, dim_feedforward=64, dynamic_dim=8)
    content, head = stage(torch.randn(2, N, D), torch.randn(2 * N, D, 7, 7))
    assert content.shape == (2, N, D) and head["pred_logits"].shape == (2, N, K)
    assert head["box_deltas"].shape == (2, N, 4)


def test_dii_stage_composition_adds_each_residual_once():
    torch.manual_seed(0)
    stage = DIIStage(D, K, num_heads=4, dim_feedforward=64, dynamic_dim=8)
    q, roi = torch.randn(2, N, D), torch.randn(2 * N, D, 7, 7)
    content, head = stage(q, roi)
    x = stage.attention_norm(q + stage.attention(q, q, q)[0]).reshape(2 * N, D)
    x = stage.dynamic_norm(x + stage.dynamic_conv(x, roi))
    x = stage.ffn.norm(x + stage.ffn.net(x)).view(2, N, D)
    torch.testing.assert_close(content, x)
    torch.testing.assert_close(head["pred_logits"], stage.output.fc_cls(stage.output.cls_fcs(x)))
    torch.testing.assert_close(head["box_deltas"], stage.output.fc_reg(stage.output.reg_fcs(x)))


def test_sparse_rcnn_output_contract(srcnn, images):
    contents = []
    hooks = [s.register_forward_hook(lambda m, i, o: contents.append(o[0])) for s in srcnn.stages]
    with torch.no_grad():
        out = srcnn(images, SIZES)
    for h in hooks:
        h.remove()
    assert set(out) == {"stages", "pred_logits", "pred_boxes"} and len(out["stages"]) == 6
    for stage in out["stages"]:
        assert set(stage) == {"pred_logits", "pred_boxes"}
        assert stage["pred_logits"].shape == (2, N, K) and stage["pred_boxes"].shape == (2, N, 4)
        assert stage["pred_boxes"].dtype == torch.float32 and torch.isfinite(stage["pred_boxes"]).all()
    assert [c.shape for c in contents] == [(2, N, D)] * 6
    assert out["pred_logits"] is out["stages"][-1]["pred_logits"]
    assert out["pred_boxes"] is out["stages"][-1]["pred_boxes"]
    assert srcnn.num_classes == K and srcnn.drmm is False


def test_drmm_output_contract(drmm_model, images):
    with torch.no_grad():
        out = drmm_model(images, SIZES)
    keys = {"pred_logits", "pred_boxes", "pred_fg", "pred_scales"}
    assert set(out) == keys | {"stages"} and len(out["stages"]) == 6
    for stage in out["stages"]:
        assert set(stage) == keys
        assert stage["pred_logits"].shape == (2, 12, K) and stage["pred_fg"].shape == (2, 12)
        assert stage["pred_boxes"].shape == stage["pred_scales"].shape == (2, 12, 4)
        assert stage["pred_boxes"].dtype == stage["pred_scales"].dtype == torch.float32
        fg = stage["pred_fg"].sigmoid()
        assert torch.all((fg > 0) & (fg < 1)) and torch.all(stage["pred_scales"] > 0)
        torch.testing.assert_close(stage["pred_logits"].softmax(-1).sum(-1), torch.ones(2, 12))
    assert all(out[k] is out["stages"][-1][k] for k in keys) and drmm_model.drmm is True


def _pixel_boxes(norm_cxcywh, sizes):
    """Independent reference: per image (x1, y1, x2, y2) = (cx -/+ w/2) * W, (cy -/+ h/2) * H."""
    cx, cy, w, h = norm_cxcywh.T
    return torch.stack([torch.stack([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H], -1)
                        for H, W in sizes.tolist()])


def test_drmm_zero_reg_keeps_rois_exactly_and_uses_unpadded_sizes(drmm_model, images):
    model = copy.deepcopy(drmm_model)
    with torch.no_grad():
        for stage in model.stages:
            stage.output.fc_reg.weight.zero_()
            stage.output.fc_reg.bias.zero_()
        out = model(images, SIZES)
    expected = _pixel_boxes(model.init_proposal_boxes.weight, SIZES)
    torch.testing.assert_close(out["stages"][0]["pred_boxes"], expected)
    for prev, cur in zip(out["stages"], out["stages"][1:]):
        assert torch.equal(cur["pred_boxes"], prev["pred_boxes"])  # mu = roi + 0 exactly
    torch.testing.assert_close(out["stages"][0]["pred_scales"], torch.full((2, 12, 4), math.log(2.0)))
    assert not torch.allclose(expected[0], _pixel_boxes(model.init_proposal_boxes.weight, SIZES[1:])[0])


def test_sparse_rcnn_zero_reg_decodes_whole_unpadded_image(srcnn, images):
    model = copy.deepcopy(srcnn)
    with torch.no_grad():
        for stage in model.stages:
            stage.output.fc_reg.weight.zero_()
        out = model(images, SIZES)
    whole = torch.tensor([[[0.0, 0.0, 80.0, 48.0]], [[0.0, 0.0, 96.0, 64.0]]]).expand(2, N, 4)
    for stage in out["stages"]:
        torch.testing.assert_close(stage["pred_boxes"], whole)
    with torch.no_grad():
        padded = model(images)["pred_boxes"]
    torch.testing.assert_close(padded, torch.tensor([0.0, 0.0, 96.0, 64.0]).expand(2, N, 4))


# ---------------------------------------------------------------- gradients and detaching (1.2 "Box update", 3.2)
@pytest.mark.parametrize("drmm", [False, True])
def test_stage0_boxes_learn_later_boxes_are_detached(drmm, images):
    model = _tiny(drmm=drmm, backbone=MB, num_stages=2)
    out = model(images, SIZES)
    out["stages"][1]["pred_boxes"].sum().backward(retain_graph=True)
    assert model.init_proposal_boxes.weight.grad is None  # stage-1 input boxes detached
    assert model.stages[0].output.fc_reg.weight.grad is None  # no path through stage-0 boxes
    assert model.stages[0].attention.in_proj_weight.grad is not None  # content (obj_feat) not detached
    assert model.stages[1].output.fc_reg.weight.grad is not None
    out["stages"][0]["pred_boxes"].sum().backward()
    grad = model.init_proposal_boxes.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert out["stages"][0]["pred_boxes"].grad_fn is not None


@pytest.mark.parametrize("drmm,backbone", [(False, "resnet18"), (True, MB)])
def test_every_trainable_parameter_gets_a_finite_gradient(drmm, backbone, images):
    model = _tiny(drmm=drmm, backbone=backbone, num_stages=2)
    out = model(images, SIZES)
    loss = sum(t.float().sum() for stage in out["stages"] for t in stage.values())
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 50
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert sum(p.grad.abs().sum() for n, p in trainable if n.startswith("backbone")) > 0


# ---------------------------------------------------------------- errors
def test_bad_inputs_raise(srcnn, images):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        srcnn(images[0])
    with pytest.raises(ValueError, match="multiples of 32"):
        srcnn(torch.zeros(1, 3, 64, 90))
    with pytest.raises(ValueError, match="rows"):
        srcnn(images, SIZES[:1])
    with pytest.raises(ValueError, match="image_sizes"):
        srcnn(images, torch.tensor([[48, 80], [64, 128]]))
    with pytest.raises(ValueError, match="num_stages"):
        _tiny(backbone=MB, num_stages=0)
    with pytest.raises(ValueError, match="grid"):
        _tiny(drmm=True, backbone=MB, num_queries=7)


# ---------------------------------------------------------------- stage_init="adamixer" (short-schedule init)
def test_adamixer_stage_init_zeroes_generator_weight_and_fc_reg(images):
    model = _tiny(stage_init="adamixer")
    for stage in model.stages:
        gen = stage.dynamic_conv.dynamic_layer
        assert not gen.weight.any() and gen.bias.abs().sum() > 0  # bias kept: filters shared, not zero
        assert not stage.output.fc_reg.weight.any() and stage.output.fc_reg.bias.abs().sum() == 0
        assert stage.attention.in_proj_weight.abs().sum() > 0  # the rest keeps the official xavier init
    # every query starts from the same dynamic filters: equal RoI features give equal outputs whatever the query
    dyn = model.stages[0].dynamic_conv
    roi = torch.randn(1, D, 7, 7).expand(3, -1, -1, -1)
    out = dyn(torch.randn(3, D), roi)
    torch.testing.assert_close(out, out[:1].expand(3, -1))
    with torch.no_grad():  # every stage starts as the identity update of the whole unpadded image
        boxes = model(images, SIZES)["pred_boxes"]
    torch.testing.assert_close(boxes, torch.tensor([[[0.0, 0, 80, 48]], [[0.0, 0, 96, 64]]]).expand(2, N, 4))
    with pytest.raises(ValueError, match="unknown stage_init"):
        DIIStage(D, K, num_heads=4, dim_feedforward=64, dynamic_dim=8, stage_init="zero")


def _refinement_gain(stage_init: str, steps: int = 200) -> float:
    """Train one DII stage to refine jittered boxes of a bright square on synthetic features; return the mean IoU
    gain of its decoded boxes over the input boxes on held-out jitter (random N(0, 1) query per proposal)."""
    from torchvision.ops import box_iou

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dim, num = 16, 32
    stage = DIIStage(dim, 1, num_heads=2, dim_feedforward=32, dynamic_dim=4, stage_init=stage_init)
    pool = PyramidRoIAlign((4,))
    proj = torch.randn(dim, 2, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    gt = torch.tensor([40.0, 32.0, 88.0, 96.0])  # pixels; features at stride 4
    inside = ((xx * 4 + 2 >= gt[0]) & (xx * 4 + 2 <= gt[2]) & (yy * 4 + 2 >= gt[1]) & (yy * 4 + 2 <= gt[3])).float()
    feats = [(proj[:, :1, None] * inside + proj[:, 1:, None] * (1 - inside)).unsqueeze(0)]
    query = torch.randn(1, num, dim, generator=gen)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-3)

    def jitter():
        wh = gt[2:] - gt[:2]
        ctr = (gt[:2] + gt[2:]) / 2 + 0.15 * wh * torch.randn(num, 2, generator=gen)
        size = wh * torch.exp(0.15 * torch.randn(num, 2, generator=gen))
        return torch.cat([ctr - size / 2, ctr + size / 2], dim=1)

    def refine(rois):
        return delta_xywh_decode(rois, stage(query, pool(feats, [rois]))[1]["box_deltas"][0])

    for _ in range(steps):
        rois = jitter()
        loss = (1 - box_iou(refine(rois), gt[None])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rois = jitter()
    with torch.no_grad():
        return float(box_iou(refine(rois), gt[None]).mean() - box_iou(rois, gt[None]).mean())


def test_adamixer_stage_init_learns_refinement_from_roi_features():
    # the property the init exists for (DIIStage docstring): from random per-query content, one stage learns to
    # move jittered boxes toward the object within a short schedule (measured gain 0.18 IoU; the official init 0.02,
    # printed by running this file)
    assert _refinement_gain("adamixer") > 0.1


if __name__ == "__main__":  # measurement aid, not a test: gain per init
    print({init: round(_refinement_gain(init), 3) for init in ("official", "adamixer")})
