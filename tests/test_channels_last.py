"""``model.channels_last`` of the dense detector: NHWC weights and inputs compute the same function as NCHW, and the
layout survives loading weights."""

from __future__ import annotations

import torch

from e2edet.build import build_model
from e2edet.config import apply_overrides
from e2edet.recipes import get_recipe

TINY = ["model.pretrained=false", "model.num_classes=3", "model.fpn_channels=32"]


def _model(channels_last: bool):
    cfg = apply_overrides(get_recipe("defcn_mnv2_cpu"), [*TINY, f"model.channels_last={str(channels_last).lower()}"])
    torch.manual_seed(0)
    return build_model(cfg)


def test_nhwc_model_equals_nchw_model():
    nchw, nhwc = _model(False), _model(True)
    assert get_recipe("defcn_mnv2_cpu").model.channels_last  # the CPU recipes use it
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    nhwc.load_state_dict(nchw.state_dict())  # copies into the NHWC tensors: the layout stays
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.parameters() if p.dim() == 4)
    x = torch.randn(2, 3, 96, 128)
    for mode in ("train", "eval"):
        a, b = getattr(nchw, mode)()(x), getattr(nhwc, mode)()(x)
        for key in ("pred_logits", "pred_boxes", "pred_filter"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
    a["pred_logits"].sum().backward()
    b["pred_logits"].sum().backward()
    # Gradients summed in another order (NHWC kernels) differ elementwise where terms cancel; on a CPU without
    # AVX512 a few of the 55296 elements of a backbone weight differed by 1.6x an elementwise tolerance of 1e-3 of
    # the tensor's largest value. The relative error of each whole gradient was at most 6e-4 there; a layout mistake
    # gives errors of order 1.
    for (name, p), q in zip(nchw.named_parameters(), nhwc.parameters()):
        if p.grad is not None:
            error = float((q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
            assert error < 5e-3, f"{name}: relative gradient error {error:.2e}"
