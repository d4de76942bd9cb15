"""SQR, selective query recollection (``e2edet.models.query.recollection``): the properties of spec ``detr.md`` §2.8
on the shared stage loop, the real AdaMixer and Sparse R-CNN, and the set criterion's per-stage sums (§2.4).

The official index lists (``Fangyi-Chen/SQR`` ``configs/sqr/adamixer_SQR_r50_1x_coco.py``, the 7-entry lists of
``configs/sqr/deformable_detr_SQR_r50_50e_coco.py`` and the commented ablation lists of
``configs/adamixer/adamixer_Qrecycle_r50_1x_coco.py``) are copied here as figures from spec §2.2.
"""

import pytest
import torch
from torch import nn

from e2edet.config import Config, ConfigError, apply_overrides
from e2edet.losses.set_criterion import SetCriterion
from e2edet.models.query import AdaMixer, SparseRCNN
from e2edet.models.query.recollection import Recollection, check_recollection, decode_stages, run_recollection
from e2edet.models.query.stages import QueryState, run_stages

D, N = 8, 3


# ---------------------------------------------------------------- 2.8 #1, #5: index rule and stage mapping
def test_official_lists_and_set_counts():
    sqr = Recollection.build(6)
    assert (sqr.starts, sqr.ends) == ((0, 0, 1, 2, 4, 7), (1, 2, 4, 7, 12, 20))
    assert sqr.set_counts == [1, 2, 3, 5, 8, 13] and sum(sqr.set_counts) == 32
    boundaries = [i + 1 for i, (a, b) in enumerate(zip(sqr.output_stages, sqr.output_stages[1:] + [6])) if a != b]
    assert boundaries == [1, 3, 6, 11, 19, 32]
    seven = Recollection.build(7)  # the Deformable-DETR config's 7th entry
    assert (seven.starts[6], seven.ends[6]) == (12, 33) and seven.set_counts[6] == 21 and sum(seven.set_counts) == 53
    dense = Recollection.build(6, "dense")
    assert dense.set_counts == [1, 2, 4, 8, 16, 32] and sum(dense.set_counts) == 63


@pytest.mark.parametrize("start_stage, starts, ends", [
    (2, (0, 1, 1, 2, 3, 5), (1, 2, 3, 5, 8, 13)),
    (3, (0, 1, 2, 2, 3, 4), (1, 2, 3, 4, 6, 9)),
    (4, (0, 1, 2, 3, 3, 4), (1, 2, 3, 4, 5, 7)),
    (5, (0, 1, 2, 3, 4, 4), (1, 2, 3, 4, 5, 6)),
    (6, (0, 1, 2, 3, 4, 5), (1, 2, 3, 4, 5, 6)),  # no recollection: the sequential loop
])
def test_start_stage_ablation_lists(start_stage, starts, ends):
    sqr = Recollection.build(6, start_stage=start_stage)
    assert (sqr.starts, sqr.ends) == (starts, ends)


def test_recollection_errors():
    with pytest.raises(ValueError, match="mode"):
        Recollection.build(6, "sparse")
    with pytest.raises(ValueError, match="start_stage"):
        Recollection.build(6, start_stage=0)
    with pytest.raises(ValueError, match="stage 1"):
        Recollection((0, 0), (1, 3))  # only 2 sets exist before stage 1
    with pytest.raises(ValueError, match="one length"):
        Recollection((0, 0), (1,))
    with pytest.raises(ValueError, match="6 stages, the model has 3"):
        check_recollection(Recollection.build(6), 3)
    with pytest.raises(ValueError, match="D-RMM"):
        check_recollection(Recollection.build(3), 3, drmm=True)
    with pytest.raises(TypeError):
        check_recollection("selective", 3)


# ---------------------------------------------------------------- a toy stage that records what it consumed
class DepthStage(nn.Module):
    def __init__(self, index: int, log: list):
        super().__init__()
        self.index, self.log, self.lin = index, log, nn.Linear(D, D)


def depth_step(stage: DepthStage, state: QueryState, features):
    """Content channel 0 carries the depth of the set (-1 for Q0); the stage logs the depths it consumed."""
    stage.log.append((stage.index, state.content[:, 0, 0].detach().clone()))
    image = features[0].mean(dim=(1, 2, 3))[:, None, None]  # per image: wrong if sets and images get mixed up
    content = torch.tanh(stage.lin(state.content) + image)
    content = torch.cat([torch.full_like(content[..., :1], float(stage.index)), content[..., 1:]], -1)
    reference = state.reference + content[..., 1:5]
    return QueryState(content, reference), {"pred_logits": content[..., 1:3], "pred_boxes": reference}


def _toy(num_stages=6, batch=2, seed=0):
    torch.manual_seed(seed)
    log: list = []
    stages = nn.ModuleList(DepthStage(i, log) for i in range(num_stages))
    content = torch.randn(batch, N, D)
    content[..., 0] = -1.0
    content.requires_grad_(True)
    reference = torch.rand(batch, N, 4)
    features = [torch.randn(batch, 2, 4, 6)]
    return stages, log, QueryState(content, reference), features


@pytest.mark.parametrize("batched", [True, False])
def test_predecessor_rule(batched):
    # 2.8 #2: every input of stage s has depth s-1 or s-2, O_{s-2} first
    stages, log, queries, features = _toy()
    with torch.no_grad():
        run_recollection(stages, depth_step, queries, features, Recollection.build(6, batched=batched))
    counts = [1, 2, 3, 5, 8, 13]
    for s in range(6):
        depths = torch.cat([d for i, d in log if i == s]).tolist()
        assert len(depths) == counts[s] * 2  # G sets x B images
        assert set(depths) <= {s - 1.0, s - 2.0}
        assert depths == sorted(depths)  # O_{s-2} sets before O_{s-1} sets
        if s >= 1:
            assert depths.count(s - 1.0) == counts[s - 1] * 2


def test_sequential_chain_preserved():
    # 2.8 #3: the last set of each stage is the sequential chain, equal to run_stages
    stages, _, queries, features = _toy()
    with torch.no_grad():
        plain = run_stages(stages, depth_step, queries, features)
        chain, outputs, output_stages = run_recollection(stages, depth_step, queries, features,
                                                         Recollection.build(6))
    assert len(outputs) == 32 and output_stages == Recollection.build(6).output_stages
    for s in range(6):
        last = [o for o, k in zip(outputs, output_stages) if k == s][-1]
        assert last is chain[s]
        for key in plain[s]:
            torch.testing.assert_close(chain[s][key], plain[s][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_batched_equals_loop_for_every_batch(batch):
    # 2.8 #4 and #9: set-major batching split by the true batch (the official optimize version hard-codes 2)
    stages, _, queries, features = _toy(batch=batch)
    with torch.no_grad():
        a = run_recollection(stages, depth_step, queries, features, Recollection.build(6, batched=True))
        b = run_recollection(stages, depth_step, queries, features, Recollection.build(6, batched=False))
    assert a[2] == b[2]
    for x, y in zip(a[1], b[1]):
        for key in x:
            assert x[key].shape[0] == batch
            torch.testing.assert_close(x[key], y[key], rtol=1e-6, atol=1e-6)


def test_gradient_flow_through_recollected_content_not_references():
    # 2.8 #8: stage-0 output content gets gradients from stage 1 AND from its recollection at stage 2
    stages, _, queries, features = _toy(num_stages=3)
    stored = []

    def spy(stage, state, feats):
        new, out = depth_step(stage, state, feats)
        if stage.index == 0:
            stored.append(new.content)
        return new, out

    chain, outputs, output_stages = run_recollection(stages, spy, queries, features, Recollection.build(3))
    assert output_stages == [0, 1, 1, 2, 2, 2]
    # stage 1 consumes [Q0, O_0]; stage 2 consumes [O_0 (1 set), O_1 (2 sets)]
    def grad_of(out, wrt):
        (g,) = torch.autograd.grad(out["pred_logits"].sum(), [wrt], retain_graph=True, allow_unused=True)
        return torch.zeros_like(wrt) if g is None else g

    assert not grad_of(outputs[1], stored[0]).any()  # stage 1's first set came from Q0
    assert grad_of(outputs[2], stored[0]).abs().sum() > 0  # stage 1's second set: O_0 (stage s+1)
    assert grad_of(outputs[3], stored[0]).abs().sum() > 0  # stage 2's first set: O_0 recollected (stage s+2)
    assert not grad_of(outputs[3], stages[1].lin.weight).any()  # ... which skipped stage 1


def test_recollected_references_are_detached():
    stages, log, queries, features = _toy(num_stages=4)
    refs = []

    def spy(stage, state, feats):
        refs.append((stage.index, state.reference))
        return depth_step(stage, state, feats)

    run_recollection(stages, spy, queries, features, Recollection.build(4, batched=False))
    assert all(not r.requires_grad for s, r in refs if s > 0)


# ---------------------------------------------------------------- 2.8 #6: per-stage loss sums
def _targets():
    return [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 40.0], [30.0, 5.0, 90.0, 60.0]]),
             "labels": torch.tensor([0, 2]), "size": torch.tensor([64, 96])},
            {"boxes": torch.tensor([[0.0, 0.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
             "size": torch.tensor([64, 80])}]


def _stage_dicts(num_stages=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_stages):
        xy = torch.rand(2, 5, 2, generator=gen) * 40
        out.append({"pred_logits": torch.randn(2, 5, 3, generator=gen),
                    "pred_boxes": torch.cat([xy, xy + 5 + torch.rand(2, 5, 2, generator=gen) * 40], -1)})
    return out


def test_loss_of_repeated_chain_is_count_times_baseline():
    criterion = SetCriterion.for_stages(3)
    chain = _stage_dicts()
    sqr = Recollection.build(3)
    base = criterion({"stages": chain, **chain[-1]}, _targets())
    recollected = [chain[s] for s in sqr.output_stages]
    with_sqr = criterion({"stages": chain, **chain[-1], "recollected": recollected,
                          "recollected_stages": sqr.output_stages}, _targets())
    assert set(with_sqr) == set(base)
    for s, count in enumerate(sqr.set_counts):
        for term in ("loss_cls", "loss_bbox", "loss_iou"):
            torch.testing.assert_close(with_sqr[f"stage{s}_{term}"], count * base[f"stage{s}_{term}"])
        torch.testing.assert_close(with_sqr[f"stage{s}_pos_acc"], base[f"stage{s}_pos_acc"])


def test_each_recollected_set_is_matched_on_its_own():
    criterion = SetCriterion.for_stages(3)
    chain, other = _stage_dicts(seed=0), _stage_dicts(seed=1)
    recollected = [chain[0], other[1], chain[1]]
    out = criterion({"stages": chain, **chain[-1], "recollected": recollected, "recollected_stages": [0, 1, 1]},
                    _targets())
    alone = [criterion({"stages": [d], **d}, _targets()) for d in recollected]
    torch.testing.assert_close(out["stage1_loss_cls"], alone[1]["stage0_loss_cls"] + alone[2]["stage0_loss_cls"])
    assert "stage2_loss_cls" not in out  # the recollected sets replace the chain's stage entries
    with pytest.raises(ValueError, match="recollected_stages"):
        criterion({"stages": chain, **chain[-1], "recollected": recollected, "recollected_stages": [0, 1]},
                  _targets())


# ---------------------------------------------------------------- the real detectors
def _models(recollection):
    torch.manual_seed(0)
    srcnn = SparseRCNN("resnet18", num_classes=3, pretrained=False, norm="FrozenBN", hidden_dim=32, num_queries=N,
                       num_heads=4, dim_feedforward=64, dynamic_dim=8, num_stages=3, recollection=recollection)
    torch.manual_seed(0)
    adamixer = AdaMixer("resnet18", num_classes=3, pretrained=False, norm="FrozenBN", hidden_dim=32,
                        num_queries=N, num_heads=4, dim_feedforward=64, num_groups=4, in_points=4, out_points=8,
                        num_stages=3, recollection=recollection)
    return {"sparse_rcnn": srcnn, "adamixer": adamixer}


@pytest.mark.parametrize("which", ["sparse_rcnn", "adamixer"])
def test_inference_and_parameters_unchanged(which):
    # 2.8 #7: same parameters (strict load both ways), same eval outputs
    plain, sqr = _models(None)[which], _models(Recollection.build(3))[which]
    sqr.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(sqr.state_dict(), strict=True)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in sqr.parameters())
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    plain.eval(), sqr.eval()
    with torch.no_grad():
        a, b = plain(images), sqr(images)
    assert "recollected" not in b and set(a) == set(b)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])


@pytest.mark.parametrize("which", ["sparse_rcnn", "adamixer"])
def test_training_forward_recollects_and_matches_loop(which):
    # dropout 0, frozen BN: batched == loop; float64, so that BLAS blocking by batch size cannot show in float32 ulps
    model = _models(Recollection.build(3))[which].train().double()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sizes = torch.tensor([[64, 96], [48, 80]])
    out = model(images, sizes)
    assert len(out["recollected"]) == 6 and out["recollected_stages"] == [0, 1, 1, 2, 2, 2]
    assert out["recollected"][-1] is out["stages"][-1]
    model.recollection = Recollection.build(3, batched=False)
    loop = model(images, sizes)
    for x, y in zip(out["recollected"], loop["recollected"]):
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-9, atol=1e-9)
    model.eval()
    assert "recollected" not in model(images, sizes)  # switched on model.training, not on requires_grad


def test_config_keys():
    cfg = apply_overrides(Config.for_arch("sparse_rcnn"), ["model.sqr=dense", "model.sqr_start_stage=2"])
    assert cfg.model.sqr == "dense"
    with pytest.raises(ConfigError, match="model.sqr"):
        apply_overrides(Config.for_arch("adamixer"), ["model.sqr=yes"])
    with pytest.raises(ConfigError, match="D-RMM"):
        apply_overrides(Config.for_arch("adamixer"), ["model.sqr=selective", "model.drmm=true", "test.score=drmm"])
    with pytest.raises(ConfigError, match="model.sqr"):
        apply_overrides(Config.for_arch("dense"), ["model.sqr=selective"])


def test_decode_stages_plain_is_run_stages():
    stages, _, queries, features = _toy(num_stages=2)
    with torch.no_grad():
        out = decode_stages(stages, depth_step, queries, features)
    assert set(out) == {"stages", "pred_logits", "pred_boxes"} and out["pred_boxes"] is out["stages"][-1]["pred_boxes"]
