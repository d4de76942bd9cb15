"""``train.cpu_amp``: bf16 autocast of the training forward on the CPU (``amp`` alone covers CUDA only)."""

import pytest
import torch

from e2edet.engine import precision
from e2edet.engine.precision import cpu_has_bf16
from tests.test_engine_trainer import BoxCriterion, make_cfg, make_trainer


class DtypeRecordingCriterion(BoxCriterion):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __call__(self, outputs, targets, epoch=0, max_epoch=1):
        self.dtypes.append(outputs["pred_boxes"].dtype)
        return super().__call__(outputs, targets, epoch, max_epoch)


def _conv_dtypes(trainer):
    seen = []
    trainer.model.conv1.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("cpu_amp", [False, True])
def test_cpu_amp_runs_the_forward_in_bf16_and_the_loss_in_float32(tmp_path, monkeypatch, cpu_amp):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    criterion = DtypeRecordingCriterion()
    trainer = make_trainer(tmp_path, make_cfg(epochs=1, amp=True, cpu_amp=cpu_amp), criterion=criterion)
    conv_dtypes = _conv_dtypes(trainer)
    result = trainer.fit()
    assert trainer.use_amp is cpu_amp  # amp=True alone does not autocast on the CPU
    assert set(conv_dtypes) == {torch.bfloat16 if cpu_amp else torch.float32}
    assert set(criterion.dtypes) == {torch.float32}  # outputs are cast back before the criterion
    assert result["iteration"] == 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())


def test_cpu_amp_warns_on_a_cpu_without_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="train.cpu_amp: this CPU has neither AVX512-BF16 nor AMX"):
        make_trainer(tmp_path, make_cfg(epochs=1, cpu_amp=True))


def test_cpu_has_bf16_follows_the_torch_probes(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert cpu_has_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_has_bf16() is True
