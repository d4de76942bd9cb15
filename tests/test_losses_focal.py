"""Focal losses on logits and in probability space (specs/dense.md 2.4, 2.8.16, 2.9)."""

import pytest
import torch
import torchvision

from e2edet.losses.focal import prob_focal_loss, sigmoid_focal_loss


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 5, generator=gen) * 4
    targets = (torch.rand(6, 5, generator=gen) > 0.7).float()
    return logits, targets


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_logit_focal_equals_torchvision(reduction):
    logits, targets = _data()
    ours = sigmoid_focal_loss(logits, targets, 0.25, 2.0, reduction)
    ref = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction=reduction)
    assert torch.allclose(ours, ref)


def test_logit_focal_by_hand():
    # x = 0, y = 1: BCE = log 2, (1 - p_t)^2 = 0.25, alpha_t = 0.25.
    val = sigmoid_focal_loss(torch.zeros(1), torch.ones(1), reduction="sum")
    assert val.item() == pytest.approx(0.25 * 0.25 * torch.log(torch.tensor(2.0)).item())
    assert sigmoid_focal_loss(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)).dtype == torch.float32


def test_prob_focal_with_filter_at_infinity_equals_logit_focal():
    logits, targets = _data(1)
    filt = torch.full((6, 1), float("inf"))
    prob = torch.sigmoid(logits) * torch.sigmoid(filt)
    assert torch.all(torch.sigmoid(filt) == 1)
    ours = prob_focal_loss(prob, targets, reduction="none")
    ref = torchvision.ops.sigmoid_focal_loss(logits, targets, reduction="none")
    # fp32 probabilities lose a little precision in log(1 - q) for saturated logits (|x| ~ 10).
    assert torch.allclose(ours, ref, rtol=1e-3, atol=1e-6)


def test_prob_focal_differs_only_by_the_log_clamp():
    # A saturated wrong prediction: sigmoid(-200) underflows to 0, BCE's log is clamped at -100.
    logits = torch.tensor([-200.0])
    targets = torch.ones(1)
    prob = torch.sigmoid(logits)
    assert prob.item() == 0.0
    assert prob_focal_loss(prob, targets).item() == pytest.approx(0.25 * 100.0)
    assert torchvision.ops.sigmoid_focal_loss(logits, targets).item() == pytest.approx(0.25 * 200.0)


def test_prob_focal_formula_and_alpha_off():
    q = torch.tensor([0.2, 0.7, 0.9])
    y = torch.tensor([1.0, 0.0, 1.0])
    q_t = q * y + (1 - q) * (1 - y)
    bce = -(y * q.log() + (1 - y) * (1 - q).log())
    alpha_t = 0.25 * y + 0.75 * (1 - y)
    assert torch.allclose(prob_focal_loss(q, y), bce * (1 - q_t) ** 2 * alpha_t)
    assert torch.allclose(prob_focal_loss(q, y, alpha=-1), bce * (1 - q_t) ** 2)
    assert prob_focal_loss(q, y, reduction="sum").item() == pytest.approx((bce * (1 - q_t) ** 2 * alpha_t).sum().item())


def test_prob_focal_is_fp32_and_differentiable():
    logits = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    filt = torch.randn(4, 1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prob = logits.sigmoid() * filt.sigmoid()
        loss = prob_focal_loss(prob, torch.zeros(4, 3), reduction="sum")
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all() and torch.isfinite(filt.grad).all()


def test_bad_reduction_raises():
    with pytest.raises(ValueError):
        prob_focal_loss(torch.rand(3), torch.zeros(3), reduction="avg")
    with pytest.raises(ValueError):
        sigmoid_focal_loss(torch.rand(3), torch.zeros(3), reduction="avg")
