"""Real CPU trainings on BCCD images as separate processes: killed (SIGKILL) mid-epoch or interrupted (SIGINT)
with two loader workers, then resumed, end bit-identical to an uninterrupted run; run folders are never reused."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e2edet.cli import main
from e2edet.engine.run_dir import lock_run_dir
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow

ITERS_PER_EPOCH = 3  # 6 BCCD train images, batch 2
TOTAL = 9


def _args(bccd_subset: Path, out: Path) -> list[str]:
    over = [o for o in TINY if not o.startswith("workers=")]
    # saves at iterations 4 and 8 (mid-epoch) and 9 (the end): whichever the kill follows, it is mid-epoch
    return ["defcn_mnv2_cpu", f"data={bccd_subset}", "epochs=3", "workers=2", "train.checkpoint_every=4",
            "train.checkpoint_period=0", "train.eval_period=0", f"output={out}", "--pictures", "0", *over]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "e2edet", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 300.0) -> None:
    state = run / "checkpoints" / "last" / "state.pt"
    deadline = time.monotonic() + timeout
    while not state.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before its first checkpoint:\n"
                                 f"{proc.stderr.read()}")
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.02)


def _iteration(run: Path) -> int:
    state = torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=True)
    return int(state["trainer_state"]["iteration"])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def _resume(run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "e2edet", "train", str(run / "config.yaml"), "--resume", str(run),
                           "--pictures", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight(bccd_subset, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Weights of the uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    proc = _start(_args(bccd_subset, out))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert _iteration(out / "defcn_mnv2_cpu") == TOTAL
    return _weights(out / "defcn_mnv2_cpu")


def test_sigkill_mid_epoch_then_resume_is_bit_identical(bccd_subset, tmp_path, straight):
    run = tmp_path / "defcn_mnv2_cpu"
    proc = _start(_args(bccd_subset, tmp_path))
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = _iteration(run)
    assert 0 < killed_at < TOTAL and killed_at % ITERS_PER_EPOCH != 0  # in the middle of an epoch
    done = _resume(run)
    assert done.returncode == 0, done.stderr
    assert f"iteration {killed_at}/{TOTAL}" in done.stdout
    _assert_identical(straight, _weights(run))


def test_sigint_writes_the_current_iteration_exits_130_and_resumes_exactly(bccd_subset, tmp_path, straight):
    run = tmp_path / "defcn_mnv2_cpu"
    proc = _start(_args(bccd_subset, tmp_path))
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    stopped_at = _iteration(run)
    assert last.startswith(f"e2edet: interrupted at iteration {stopped_at}/{TOTAL}")
    assert f"resume with: e2edet train {run / 'config.yaml'} --resume {run}" in last
    assert "Traceback" not in err
    done = _resume(run)
    assert done.returncode == 0, done.stderr
    _assert_identical(straight, _weights(run))


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_second_train_never_touches_the_first_run(bccd_subset, tmp_path, capsys):
    args = ["train", "defcn_mnv2_cpu", f"data={bccd_subset}", "iters=1", f"output={tmp_path}", "--pictures", "1",
            *TINY]
    assert main(args) == 0
    first = tmp_path / "defcn_mnv2_cpu"
    before = _tree_digest(first)
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last/model.safetensors"} <= set(before)
    assert main([*args, "seed=3"]) == 0
    assert _tree_digest(first) == before
    second = tmp_path / "defcn_mnv2_cpu-2"
    assert (second / "checkpoints" / "last" / "model.safetensors").is_file()
    assert f"run folder {second}" in capsys.readouterr().out
    # --exist-ok reuses the folder, replacing the old run's outputs (nothing of the two runs is mixed)
    (first / "eval_epoch007.json").write_text("{}")
    assert main([*args, "--exist-ok", "seed=4"]) == 0
    assert not (first / "eval_epoch007.json").exists()
    assert not (first / "predictions").exists() or len(list((first / "predictions").iterdir())) <= 2
    metrics = (first / "metrics.jsonl").read_text().splitlines()
    assert sum('"type": "train"' in line for line in metrics) == 1
    assert not (tmp_path / "defcn_mnv2_cpu-3").exists()


def test_a_folder_in_use_is_refused_and_left_alone(bccd_subset, tmp_path, capsys):
    run = tmp_path / "defcn_mnv2_cpu"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"type": "train", "iteration": 1}\n')
    with lock_run_dir(run):  # as a training in progress holds it
        code = main(["train", "defcn_mnv2_cpu", f"data={bccd_subset}", "iters=1", f"output={tmp_path}",
                     "--exist-ok", *TINY])
        resumed = main(["train", "defcn_mnv2_cpu", f"data={bccd_subset}", "--resume", str(run), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and resumed == 2
    assert len(err) == 2 and all(f"run folder {run} is in use by another training" in line for line in err)
    assert (run / "metrics.jsonl").is_file() and (run / "checkpoints").is_dir()


def test_exist_ok_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, capsys):
    run = tmp_path / "defcn_mnv2_cpu"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    assert main(["train", "defcn_mnv2_cpu", f"data={tmp_path}/no/such/data", f"output={tmp_path}", "--exist-ok"]) == 2
    assert (run / "metrics.jsonl").is_file()
    # a failed start into a fresh numbered folder leaves no empty folder behind
    assert main(["train", "defcn_mnv2_cpu", f"data={tmp_path}/no/such/data", f"output={tmp_path}"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["defcn_mnv2_cpu"]
    capsys.readouterr()
