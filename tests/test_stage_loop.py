"""The shared decoder-stage loop of the query detectors (``e2edet.models.query.stages``): stage order, reference
detached between stages (content not), per-stage outputs collected, the query-set hook (``stage_pass``) that a
training-only strategy such as SQR (spec detr.md 2.2; its own tests are in test_sqr.py) is written on, and the input
checks."""

import pytest
import torch
from torch import nn

from e2edet.models.query import AdaMixer, SparseRCNN
from e2edet.models.inputs import check_inputs
from e2edet.models.query.stages import QueryState, run_stages, stage_pass
from e2edet.ops.boxes import xyxy_to_xyzr

D, N = 8, 3
H, W = 64, 96
STRIDES = [4, 8, 16, 32]


class ToyStage(nn.Module):
    """A stage whose content update reads the image features (per image) and whose box update reads only the content:
    a reference gradient can then only come through the reference path."""

    def __init__(self, index: int, log: list):
        super().__init__()
        self.index, self.log, self.lin = index, log, nn.Linear(D, D)


def toy_step(stage: ToyStage, state: QueryState, features):
    stage.log.append((stage.index, state))
    image = features[0].mean(dim=(1, 2, 3))[:, None, None]  # [B, 1, 1]: wrong if sets and images are mixed up
    content = torch.tanh(stage.lin(state.content) + image)
    reference = state.reference + content[..., :4]
    out = {"pred_logits": content[..., :2], "pred_boxes": reference, "pred_extra": content.sum(-1)}
    return QueryState(content, reference), out


def _toy(num_stages=3, batch=2, seed=0):
    torch.manual_seed(seed)
    log: list = []
    stages = nn.ModuleList(ToyStage(i, log) for i in range(num_stages))
    content = torch.randn(batch, N, D, requires_grad=True)
    reference = torch.rand(batch, N, 4, requires_grad=True)
    features = [torch.randn(batch, 2, 4, 6), torch.randn(batch, 2, 2, 3)]
    return stages, log, QueryState(content, reference), features


# ---------------------------------------------------------------- the sequential loop
def test_stages_run_in_order_and_every_output_is_collected():
    stages, log, queries, features = _toy(num_stages=4)
    outputs = run_stages(stages, toy_step, queries, features)
    assert [i for i, _ in log] == [0, 1, 2, 3]
    assert len(outputs) == 4 and all(set(o) == {"pred_logits", "pred_boxes", "pred_extra"} for o in outputs)
    # stage s's outputs are computed from what stage s-1 produced (the chain, not the initial queries every time)
    for s in range(1, 4):
        entering = log[s][1]
        assert torch.equal(entering.reference, outputs[s - 1]["pred_boxes"])
    expected = queries
    for s, stage in enumerate(stages):
        expected, out = toy_step(stage, QueryState(expected.content, expected.reference.detach()), features)
        torch.testing.assert_close(outputs[s]["pred_boxes"], out["pred_boxes"], rtol=0, atol=0)


def test_reference_detached_between_stages_content_not():
    stages, log, queries, features = _toy(num_stages=3)
    outputs = run_stages(stages, toy_step, queries, features)
    assert log[0][1] is queries  # stage 0 gets the queries as given (Sparse R-CNN's proposal boxes learn)
    for s in (1, 2):
        entering = log[s][1]
        assert not entering.reference.requires_grad and entering.reference.grad_fn is None
        assert entering.content.requires_grad and entering.content.grad_fn is not None  # content carried as it is
    outputs[2]["pred_boxes"].sum().backward()
    assert queries.reference.grad is None  # reached only through the detached references
    assert queries.content.grad is not None and queries.content.grad.abs().sum() > 0
    assert all(st.lin.weight.grad.abs().sum() > 0 for st in stages)  # through the content of every stage

    stages, log, queries, features = _toy(num_stages=3)
    run_stages(stages, toy_step, queries, features)[0]["pred_boxes"].sum().backward()
    torch.testing.assert_close(queries.reference.grad, torch.ones(2, N, 4))  # stage 0's own reference keeps its grad


def test_loop_errors():
    _, _, queries, features = _toy()
    with pytest.raises(ValueError, match="at least one stage"):
        run_stages([], toy_step, queries, features)
    with pytest.raises(ValueError, match="at least one query set"):
        stage_pass(toy_step, None, [], features)


# ---------------------------------------------------------------- the hook point: several query sets per stage
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_batched_sets_equal_separate_calls_split_by_true_batch(batch):
    stages, log, queries, features = _toy(num_stages=1, batch=batch)
    torch.manual_seed(5)
    sets = [QueryState(torch.randn(batch, N, D), torch.rand(batch, N, 4)) for _ in range(3)]
    joint = stage_pass(toy_step, stages[0], sets, features)
    assert len(log) == 1 and log[0][1].content.shape == (3 * batch, N, D)  # one call, set-major concatenation
    assert torch.equal(log[0][1].content[batch:2 * batch], sets[1].content)
    for j, s in enumerate(sets):
        (alone_state, alone), (state, out) = stage_pass(toy_step, stages[0], [s], features)[0], joint[j]
        assert set(out) == set(alone) and not state.reference.requires_grad
        for key in alone:
            torch.testing.assert_close(out[key], alone[key])
        torch.testing.assert_close(state.content, alone_state.content)
        torch.testing.assert_close(state.reference, alone_state.reference)
    with pytest.raises(ValueError, match="batch"):
        stage_pass(toy_step, stages[0], [sets[0], QueryState(torch.randn(batch + 1, N, D), sets[0].reference)],
                   features)


def _tiny_models():
    torch.manual_seed(0)
    srcnn = SparseRCNN("resnet18", num_classes=3, pretrained=False, hidden_dim=32, num_queries=N, num_heads=4,
                       dim_feedforward=64, dynamic_dim=8, num_stages=2)
    adamixer = AdaMixer("resnet18", num_classes=3, pretrained=False, hidden_dim=32, num_queries=N, num_heads=4,
                        dim_feedforward=64, num_groups=4, in_points=4, out_points=8, drmm=True,
                        proposal_init="whole", num_stages=2)
    return srcnn.eval(), adamixer.eval()


@pytest.mark.parametrize("which", ["sparse_rcnn", "adamixer_drmm"])
def test_every_query_detector_step_runs_batched_sets(which):
    # the hook is written once for all query detectors: each model's stage_step takes G sets batched
    model = dict(zip(["sparse_rcnn", "adamixer_drmm"], _tiny_models()))[which]
    gen = torch.Generator().manual_seed(3)
    features = [torch.randn(2, 32, H // s, W // s, generator=gen) for s in STRIDES]
    sets = []
    for _ in range(2):
        xy = torch.rand(2, N, 2, generator=gen) * torch.tensor([W / 2, H / 2])
        boxes = torch.cat([xy, xy + 8 + torch.rand(2, N, 2, generator=gen) * 30], dim=-1)
        sets.append(QueryState(torch.randn(2, N, 32, generator=gen),
                               boxes if which == "sparse_rcnn" else xyxy_to_xyzr(boxes)))
    with torch.no_grad():
        joint = stage_pass(model.stage_step, model.stages[1], sets, features)
        for j, s in enumerate(sets):
            state, alone = stage_pass(model.stage_step, model.stages[1], [s], features)[0]
            assert set(joint[j][1]) == set(alone)
            for key in alone:
                torch.testing.assert_close(joint[j][1][key], alone[key], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(joint[j][0].reference, state.reference, rtol=1e-5, atol=1e-5)


def test_model_forward_is_the_shared_loop():
    images = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    for model in _tiny_models():
        calls = []

        def spy(stage, state, features, _step=model.stage_step):
            calls.append(stage)
            return _step(stage, state, features)

        model.stage_step = spy  # instance attribute: the forward goes through the model's step, stage by stage
        with torch.no_grad():
            out = model(images)
        assert calls == list(model.stages) and len(out["stages"]) == 2


# ---------------------------------------------------------------- input checks (one place for both detectors)
def test_check_inputs():
    images = torch.zeros(2, 3, 64, 96)
    assert torch.equal(check_inputs(images, None), torch.tensor([[64.0, 96.0], [64.0, 96.0]]))
    assert check_inputs(images, torch.tensor([[48, 80], [64, 96]])).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        check_inputs(images[0], None)
    with pytest.raises(ValueError, match="multiples of 32"):
        check_inputs(torch.zeros(1, 3, 64, 90), None)
    with pytest.raises(ValueError, match="rows"):
        check_inputs(images, torch.tensor([[48, 80]]))
    for bad in ([[48, 80], [64, 128]], [[0, 80], [64, 96]], [[65, 80], [64, 96]]):
        with pytest.raises(ValueError, match="image_sizes"):
            check_inputs(images, torch.tensor(bad))
