"""D-RMM mixture criterion: spec query.md §3.8 properties 4-15 and 18, and the test vectors of #11 / #12."""

import math

import pytest
import torch

from e2edet.losses.drmm import (
    DRMMCriterion,
    cauchy_log_pdf,
    coord_log_density,
    drmm_nll_mcm,
    floored_scales,
    mixture_log_components,
)

LOG2 = math.log(2.0)


def _stage(mu, sc, fg, cls):
    """One stage dict with a batch dimension of 1 (or B when the inputs already have it)."""
    if mu.dim() == 2:
        mu, sc, fg, cls = mu[None], sc[None], fg[None], cls[None]
    return {"pred_boxes": mu, "pred_scales": sc, "pred_fg": fg, "pred_logits": cls}


def _target(boxes, labels):
    return {"boxes": boxes, "labels": torch.as_tensor(labels, dtype=torch.int64)}


def _vector_inputs(dtype=torch.float32):
    """Spec §3.8 #11: GT (10,10,50,50) class 0; components A and B with fg 0.8 / 0.4 and p(c) 0.9 / 0.5."""
    cls = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.25, 0.25]], dtype=dtype).log()
    fg = torch.logit(torch.tensor([0.8, 0.4], dtype=dtype))
    mu = torch.tensor([[10, 10, 50, 50], [12, 10, 50, 52]], dtype=dtype)
    sc = torch.tensor([[2.0] * 4, [4.0] * 4], dtype=dtype)
    gt = torch.tensor([[10, 10, 50, 50]], dtype=dtype)
    return gt, torch.tensor([0]), mu, sc, fg, cls


def _scene(n=6, k=4, g=3, seed=0, dtype=torch.float64, noise_seed=None):
    """G GTs (from ``seed``) with N components scattered ~1 px around them (noise from ``noise_seed``), scales
    1..3 px: every L_i is ~1e-5..1e-3, so the 1e-12 floors act at the 1e-8 level at most."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(g, 2, generator=gen, dtype=dtype) * 200
    wh = 30 + torch.rand(g, 2, generator=gen, dtype=dtype) * 60
    gt = torch.cat([xy, xy + wh], 1)
    labels = torch.randint(0, k, (g,), generator=gen)
    if noise_seed is not None:
        gen = torch.Generator().manual_seed(noise_seed)
    mu = gt[torch.arange(n) % g] + torch.randn(n, 4, generator=gen, dtype=dtype)
    sc = 1 + 2 * torch.rand(n, 4, generator=gen, dtype=dtype)
    fg = torch.randn(n, generator=gen, dtype=dtype)
    cls = torch.randn(n, k, generator=gen, dtype=dtype)
    return gt, labels, mu, sc, fg, cls


def test_cauchy_matches_torch_and_student_t_dof1():  # #4
    gen = torch.Generator().manual_seed(1)
    x, loc = torch.randn(50, generator=gen) * 30, torch.randn(50, generator=gen) * 30
    scale = 0.5 + 10 * torch.rand(50, generator=gen)
    ref = torch.distributions.Cauchy(loc, scale).log_prob(x)
    assert torch.allclose(cauchy_log_pdf(x, loc, scale), ref, atol=1e-5)
    assert torch.allclose(cauchy_log_pdf(x, loc, scale).exp(), 1 / (math.pi * scale * (1 + ((x - loc) / scale) ** 2)))
    gt, _, mu, sc, _, _ = _scene(dtype=torch.float32)
    cauchy = coord_log_density(gt, mu, sc, "cauchy")
    assert torch.allclose(coord_log_density(gt, mu, sc, "student_t", dof=1.0), cauchy, atol=1e-4)
    assert not torch.allclose(coord_log_density(gt, mu, sc, "student_t", dof=5.0), cauchy, atol=1e-2)
    normal = torch.distributions.Normal(mu[None], sc[None]).log_prob(gt[:, None]).sum(-1)
    assert torch.allclose(coord_log_density(gt, mu, sc, "gaussian"), normal, atol=1e-4)
    with pytest.raises(ValueError, match="coord_dist"):
        coord_log_density(gt, mu, sc, "laplace")
    with pytest.raises(ValueError, match="coord_dist"):
        DRMMCriterion(4, coord_dist="laplace")


def _linear_nll(gt, labels, mu, sc, fg, cls, include_g=True):
    """Independent float64 linear-space reference of spec §3.4 with explicit loops."""
    fgp = [1 / (1 + math.exp(-float(f))) for f in fg]
    s_tot = sum(fgp)
    out = []
    for i in range(gt.shape[0]):
        total = 0.0
        for k in range(mu.shape[0]):
            dens = 1.0
            for d in range(4):
                z = (float(gt[i, d]) - float(mu[k, d])) / float(sc[k, d])
                dens *= 1 / (math.pi * float(sc[k, d]) * (1 + z * z))
            exps = [math.exp(float(v)) for v in cls[k]]
            prob = exps[int(labels[i])] / sum(exps)
            total += (gt.shape[0] if include_g else 1) * fgp[k] / s_tot * dens * prob
        out.append(-math.log(total + 1e-12))
    return torch.tensor(out, dtype=torch.float64)


def test_nll_matches_linear_reference_and_single_component_formula():  # #5
    gt, labels, mu, sc, fg, cls = _scene()
    nll, _ = drmm_nll_mcm(*mixture_log_components(gt, labels, mu, sc, fg, cls))
    assert torch.allclose(nll, _linear_nll(gt, labels, mu, sc, fg, cls), rtol=1e-10)
    # N = 1: -log G + sum_d [log(pi s_d) + log(1 + z_d^2)] - log p(c)  (pi_1 = 1).
    # component 0 lies near GT 0; G = 2 (GT 0 twice) so that the log G term is tested.
    gt, labels = gt[[0, 0]], labels[[0, 0]]
    nll1, _ = drmm_nll_mcm(*mixture_log_components(gt, labels, mu[:1], sc[:1], fg[:1], cls[:1]))
    z = (gt - mu[:1]) / sc[:1]
    expect = -math.log(2) + (torch.log(math.pi * sc[:1]) + torch.log1p(z**2)).sum(1)
    expect = expect - torch.log_softmax(cls[0], 0)[labels]
    assert nll1[0] < 15 and torch.allclose(nll1, expect, rtol=1e-7)


def test_removing_g_shifts_nll_by_log_g_and_keeps_mcm():  # #6
    gt, labels, mu, sc, fg, cls = _scene(g=4)
    log_comp, log_mcm = mixture_log_components(gt, labels, mu, sc, fg, cls)
    nll, mcm = drmm_nll_mcm(log_comp, log_mcm)
    nll_no_g, mcm_no_g = drmm_nll_mcm(log_comp - math.log(4), log_mcm - math.log(4))
    assert torch.allclose(nll_no_g - nll, torch.full_like(nll, math.log(4)), atol=1e-9)
    assert torch.allclose(mcm_no_g, mcm, atol=1e-7) and mcm.max() > 1e-2
    assert torch.allclose(nll_no_g, _linear_nll(gt, labels, mu, sc, fg, cls, include_g=False), rtol=1e-10)


def test_mcm_bounds():  # #7
    gen = torch.Generator().manual_seed(2)
    # >= 0 up to the 1e-12 floor: for S > 1, M/(S + eps) + eps can exceed 1 by ~1e-12 (official formula).
    _, mcm = drmm_nll_mcm(torch.randn(20, 7, generator=gen, dtype=torch.float64) * 30 - 40)
    assert (mcm >= -1e-11).all() and mcm.max() > 0.1
    comp = torch.tensor([[1e-3, 0.0, 0.0], [1e-3, 1e-300, 1e-300]], dtype=torch.float64)
    _, mcm = drmm_nll_mcm(comp.log())
    assert (mcm.abs() < 1e-8).all()
    for k in (2, 5, 300):
        _, mcm = drmm_nll_mcm(torch.full((1, k), 1e-3, dtype=torch.float64).log())
        assert mcm.item() == pytest.approx(math.log(k), abs=1e-6)


def test_mcm_gradient_isolation():  # #8
    gt, labels, mu, sc, fg, cls = _scene()
    raw = torch.log(torch.expm1(sc)).requires_grad_()
    mu, fg, cls = mu.requires_grad_(), fg.requires_grad_(), cls.requires_grad_()
    scales = floored_scales(torch.nn.functional.softplus(raw), mu)
    _, mcm = drmm_nll_mcm(*mixture_log_components(gt, labels, mu, scales, fg, cls))
    g_mu, g_raw, g_fg, g_cls = torch.autograd.grad(mcm.sum(), (mu, raw, fg, cls), allow_unused=True)
    assert g_mu is None or (g_mu == 0).all()
    assert g_raw is None or (g_raw == 0).all()
    assert g_fg.abs().max() > 1e-3 and g_cls.abs().max() > 1e-3


def test_mcm_step_increases_max_responsibility():  # #9
    # Two well-separated GTs, two components each: each GT's responsibilities depend on its own pair only.
    gt = torch.tensor([[10, 10, 60, 60], [300, 300, 380, 360]], dtype=torch.float64)
    mu = gt[[0, 0, 1, 1]] + torch.tensor([[1, -1, 2, 0], [-2, 1, 0, 1], [0, 2, -1, 1], [1, 1, 1, -2]]).double()
    sc = torch.full((4, 4), 3.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    fg = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    cls = torch.randn(4, 5, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([1, 3])

    def max_resp():
        log_comp, log_mcm = mixture_log_components(gt, labels, mu, sc, fg, cls)
        return log_comp.softmax(1).max(1).values, drmm_nll_mcm(log_comp, log_mcm)[1].sum()

    before, mcm = max_resp()
    g_fg, g_cls = torch.autograd.grad(mcm, (fg, cls))
    with torch.no_grad():
        fg -= 1e-2 * g_fg
        cls -= 1e-2 * g_cls
    after, _ = max_resp()
    assert (after > before + 1e-6).all()


def _stages(seed=0, b=2, n=8, k=4, g=3, num_stages=2):
    """Outputs of ``num_stages`` stages for ``b`` images whose components all lie near the images' GTs."""
    stages = []
    for s in range(num_stages):
        parts = [_scene(n, k, g, seed=seed + i, dtype=torch.float32, noise_seed=100 * s + i) for i in range(b)]
        stages.append(_stage(*(torch.stack([p[j] for p in parts]) for j in (2, 3, 4, 5))))
    targets = [_target(*_scene(n, k, g, seed=seed + i, dtype=torch.float32)[:2]) for i in range(b)]
    return {"stages": stages}, targets


def test_permutation_invariance():  # #10
    outputs, targets = _stages()
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(4))
    permuted = {"stages": [{key: v[:, perm] for key, v in st.items()} for st in outputs["stages"]]}
    crit = DRMMCriterion(4)
    a, b = crit(outputs, targets), crit(permuted, targets)
    for key in ("stage0_mm_loss", "stage1_mm_loss"):
        assert torch.allclose(a[key], b[key], rtol=1e-6)


def test_spec_test_vector():  # #11
    gt, labels, mu, sc, fg, cls = _vector_inputs()
    log_box = coord_log_density(gt, mu, floored_scales(sc, mu))
    assert torch.allclose(log_box.exp()[0], torch.tensor([6.41624e-4, 2.56650e-5]), rtol=1e-5)
    log_comp, log_mcm = mixture_log_components(gt, labels, mu, floored_scales(sc, mu), fg, cls)
    assert torch.allclose(log_comp.exp()[0], torch.tensor([3.84974e-4, 4.27749e-6]), rtol=1e-5)
    nll, mcm = drmm_nll_mcm(log_comp, log_mcm)
    assert nll.item() == pytest.approx(7.851284, abs=2e-5)
    assert mcm.item() == pytest.approx(0.0110498, abs=1e-6)
    out = DRMMCriterion(3)({"stages": [_stage(mu, sc, fg, cls)]}, [_target(gt, [0])])
    assert out["stage0_mm_loss"].dtype == torch.float32
    assert out["stage0_mm_loss"].item() == pytest.approx(7.856809, abs=2e-5)
    assert out["num_gt"].item() == 1 and out["stage0_mean_nll"].item() == pytest.approx(7.851284, abs=2e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is disabled inside: same fp32 value
        half = DRMMCriterion(3)({"stages": [_stage(mu.bfloat16().float(), sc, fg, cls)]}, [_target(gt, [0])])
    assert half["stage0_mm_loss"].item() == pytest.approx(7.856809, abs=2e-5)


def test_eps_artefacts_and_finite_gradients():  # #12
    nll, mcm = drmm_nll_mcm(torch.tensor([[9e-16, 1e-16]], dtype=torch.float64).log())
    assert nll.item() == pytest.approx(-math.log(1.001e-12), abs=1e-6)
    assert nll.item() == pytest.approx(27.6300, abs=1e-4)
    assert mcm.item() == pytest.approx(7.0141, abs=1e-4)
    _, mcm = drmm_nll_mcm(torch.tensor([[1e-30, 1e-40]], dtype=torch.float64).log())  # outer floor: ratio 1e-18
    assert mcm.item() == pytest.approx(-math.log(1e-30 / (1e-30 + 1e-40 + 1e-12) + 1e-12), rel=1e-9)
    _, mcm = drmm_nll_mcm(torch.tensor([[5e-6, 5e-6]]).log())
    assert mcm.item() == pytest.approx(0.693147, abs=1e-6)
    cases = [
        torch.tensor([[1e-300, 1e-300], [1e-3, 1e-300]], dtype=torch.float64).log(),
        torch.tensor([[0.0, 0.0], [1e-3, 0.0]]).log(),  # fp32 underflow: log = -inf
        torch.tensor([[-690.8, -690.8], [-2000.0, -1e6]]),
    ]
    for log_comp in cases:
        log_comp.requires_grad_()
        nll, mcm = drmm_nll_mcm(log_comp)
        (grad,) = torch.autograd.grad((nll + 0.5 * mcm).sum(), log_comp)
        assert torch.isfinite(nll).all() and torch.isfinite(mcm).all() and torch.isfinite(grad).all()


def test_scale_floor_with_gradient():  # #13
    mu = torch.tensor([[20.0, 30.0, 120.0, 80.0]], requires_grad=True)  # w = 100, h = 50
    raw = torch.tensor([[-1e4] * 4], requires_grad=True)
    scales = floored_scales(torch.nn.functional.softplus(raw), mu)
    assert scales[0, 0].item() == 4.0 and scales[0, 2].item() == 4.0 and scales[0, 1].item() == pytest.approx(2.0)
    cls = torch.zeros(1, 3, requires_grad=True)
    fg = torch.zeros(1, requires_grad=True)
    stage = _stage(mu, torch.nn.functional.softplus(raw), fg, cls)
    loss = DRMMCriterion(3)({"stages": [stage]}, [_target(mu.detach().clone(), [1])])["stage0_mm_loss"]
    (g_mu,) = torch.autograd.grad(loss, mu)
    # g = mu: only the floor path moves mu_x2: d/dw [log s_x1 + log s_x2] = 2 · 0.04 / 4 = 0.02.
    assert g_mu[0, 2].item() == pytest.approx(0.02, rel=1e-4)
    assert g_mu[0, 0].item() == pytest.approx(-0.02, rel=1e-4)


def test_zero_gt_image():  # #14
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 1 + 4 + 4 + 4)
    feat = torch.randn(1, 6, 5)
    raw = head(feat)
    base = torch.tensor([[40.0, 40.0, 120.0, 100.0]]) + torch.arange(6.0)[:, None] * 10
    mu = base[None] + raw[..., 1:5]
    cls = raw[..., 9:13] + torch.tensor([0.0, 0.0, 5.0, 0.0])  # fake class = argmax = 2 (not 0)
    stage = _stage(mu, torch.nn.functional.softplus(raw[..., 5:9]) + 1.0, raw[..., 0], cls)
    for s in stage.values():
        s.retain_grad()
    crit = DRMMCriterion(4)
    out = crit({"stages": [stage]}, [_target(torch.zeros(0, 4), [])])
    loss = out["stage0_mm_loss"]
    k = stage["pred_fg"][0].argmax()
    fake = _target(stage["pred_boxes"][0, k].detach()[None], [2])
    assert stage["pred_logits"][0, k].argmax() == 2
    normal = crit({"stages": [stage]}, [fake])["stage0_mm_loss"]
    assert torch.isfinite(loss) and loss.item() > 0 and loss.item() * 1e12 == pytest.approx(normal.item(), rel=1e-5)
    assert out["num_gt"].item() == 0 and out["stage0_mean_nll"].item() == 0
    (g_normal,) = torch.autograd.grad(normal, stage["pred_boxes"], retain_graph=True)
    for s in stage.values():  # retain_grad() also records grads taken by autograd.grad
        s.grad = None
    loss.backward()
    assert torch.allclose(stage["pred_boxes"].grad * 1e12, g_normal, rtol=1e-4, atol=1e-7)  # fake box is detached
    for name, p in [*head.named_parameters(), *stage.items()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_batch_is_per_image_sum():  # pi is normalised per image; an empty image adds ~1e-12 x its fake term
    outputs, targets = _stages(b=3)
    targets[1] = _target(torch.zeros(0, 4), [])
    crit = DRMMCriterion(4)
    full = crit(outputs, targets)
    singles = [crit({"stages": [{k: v[b : b + 1] for k, v in st.items()} for st in outputs["stages"]]}, [t])
               for b, t in enumerate(targets)]
    for s in range(2):
        assert torch.allclose(full[f"stage{s}_mm_loss"], sum(x[f"stage{s}_mm_loss"] for x in singles), rtol=1e-6)
    assert full["num_gt"].item() == 6


def test_six_stage_keys_and_gt_duplication():  # #15
    outputs, targets = _stages(b=1, num_stages=6)
    crit = DRMMCriterion(4)
    out = crit(outputs, targets)
    losses = sorted(k for k in out if "loss" in k.split("_"))
    assert losses == [f"stage{s}_mm_loss" for s in range(6)]
    assert set(out) - set(losses) == {"num_gt", "stage5_mean_nll", "stage5_mean_mcm"}
    dup = [_target(targets[0]["boxes"].repeat(2, 1), targets[0]["labels"].repeat(2))]
    out_dup = crit(outputs, dup)
    g = targets[0]["boxes"].shape[0]
    for s in range(6):  # 2G terms, each NLL lowered by log 2, MCM unchanged
        assert out_dup[f"stage{s}_mm_loss"].item() == pytest.approx(
            2 * out[f"stage{s}_mm_loss"].item() - 2 * g * LOG2, rel=1e-5)
    assert out_dup["stage5_mean_nll"].item() == pytest.approx(out["stage5_mean_nll"].item() - LOG2, abs=1e-4)
    assert out_dup["stage5_mean_mcm"].item() == pytest.approx(out["stage5_mean_mcm"].item(), abs=1e-5)


def test_mixing_weight_gradient():  # #18
    gt, labels, mu, sc, _, cls = _scene(n=7, g=3, seed=5)
    fgp = torch.rand(7, generator=torch.Generator().manual_seed(6), dtype=torch.float64).clamp(0.05, 0.95)
    fgp.requires_grad_()
    log_comp, _ = mixture_log_components(gt, labels, mu, sc, torch.logit(fgp), cls)
    nll, _ = drmm_nll_mcm(log_comp)
    (grad,) = torch.autograd.grad(nll.sum(), fgp)
    r = log_comp.detach().softmax(1)
    expect = 3 / fgp.detach().sum() - r.sum(0) / fgp.detach()
    assert torch.allclose(grad, expect, rtol=1e-6, atol=1e-9)


def test_bad_inputs_raise():
    outputs, targets = _stages(b=1)
    crit = DRMMCriterion(4)
    with pytest.raises(ValueError, match="stages"):
        crit({"pred_boxes": outputs["stages"][0]["pred_boxes"]}, targets)
    bad = {"stages": [{k: v for k, v in outputs["stages"][0].items() if k != "pred_scales"}]}
    with pytest.raises(ValueError, match="pred_scales"):
        crit(bad, targets)
    with pytest.raises(ValueError, match="pred_logits"):
        DRMMCriterion(5)(outputs, targets)
    with pytest.raises(ValueError, match="batch size"):
        crit(outputs, targets * 2)
    with pytest.raises(ValueError, match="labels"):
        crit(outputs, [_target(targets[0]["boxes"], [0, 1, 4])])
    with pytest.raises(ValueError, match="G, N"):
        drmm_nll_mcm(torch.zeros(3))
