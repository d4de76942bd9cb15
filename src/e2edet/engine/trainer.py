"""The training loop: device/DDP setup, bf16 autocast, logging, evaluation, checkpoints and exact resume."""

from __future__ import annotations

import inspect
import math
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from e2edet.engine.checkpoint import (load_checkpoint, read_weights_header, resolve_weights_file, save_checkpoint,
                                     weights_mismatch)
from e2edet.engine.device import init_distributed
from e2edet.engine.ema import build_ema
from e2edet.engine.evaluator import save_results
from e2edet.engine.logger import MetricsLogger, is_loss_key, lookup, plot_losses
from e2edet.engine.optim import base_lr, build_optimizer, build_scheduler
from e2edet.engine.precision import autocast_enabled, clip_finite_gradients, first_non_finite, to_float32
from e2edet.engine.rng import capture_rng_state, preserve_rng_state, restore_rng_state, seed_everything
from e2edet.engine.signals import StopSignals, TrainingInterrupted
from e2edet.utils import shutdown_workers
from e2edet.utils.dist import get_rank, get_world_size, is_dist, is_main_process


def _to_device(target: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensor values of one target dict to ``device``."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def _hms(seconds: float) -> str:
    """Seconds as ``h:mm:ss``."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_loader`` per a TrainConfig-like ``cfg``.

    Args:
        model: detector (not wrapped); moved to the selected device and wrapped in DDP when ``WORLD_SIZE > 1``
            (the process group is started by :func:`e2edet.engine.device.init_distributed` if not yet running;
            call that first when the loader uses a distributed sampler).
        criterion: ``criterion(outputs, targets, epoch=e, max_epoch=E) -> dict``; keys starting with ``loss`` are
            summed into the training loss, other scalar entries are logged as statistics.
        train_loader: yields ``(images [B, 3, H, W], targets)`` (the collate contract) and has ``len()``; its
            sampler's ``set_epoch(epoch)`` is called at each epoch start if present.
        cfg: object with the TrainConfig fields (epochs, max_iters, optimizer, lr, ..., log_period, eval_period,
            checkpoint_period, checkpoint_every, device, amp, seed, clip_grad_norm; optional cpu_amp, compile, ema,
            ema_decay, ema_tau). ``amp`` autocasts the forward to bf16 on CUDA, ``cpu_amp`` on the CPU.
            ``checkpoint_period`` counts epochs, ``checkpoint_every`` iterations (0 = off); both write
            ``checkpoints/last``, and a run resumed from a mid-epoch checkpoint continues exactly where it stopped
            (the loader's :class:`~e2edet.data.loader.EpochShuffleSampler` skips the samples already seen).
            With ``ema`` an EMA of the weights (:mod:`e2edet.engine.ema`) is updated after every optimizer step; it
            is what evaluation sees, what selects ``best`` and what ``model.safetensors`` of each checkpoint holds
            (the trained weights go to ``state.pt``, so a resume is exact); see :attr:`eval_model`.
        run_dir: output directory (metrics.jsonl, loss.png, eval_epochNNN.json, checkpoints/).
        config_dict: JSON-serialisable full run config, stored in the checkpoint weights' metadata.
        evaluate_fn: ``evaluate_fn(model, epoch) -> dict`` run (on every rank, RNG-isolated, model in eval mode)
            every ``eval_period`` epochs and at the end; ``epoch`` is the number of finished epochs.
        best_metric: dotted key into the evaluation dict whose maximum selects ``checkpoints/best``.
        progress: show a tqdm bar on the main process.
    Raises:
        ValueError: empty loader.
    """

    def __init__(self, model: nn.Module, criterion: Callable[..., dict], train_loader: Any, cfg: Any,
                 run_dir: str | Path, config_dict: dict | None = None,
                 evaluate_fn: Callable[[nn.Module, int], dict] | None = None, best_metric: str = "no_nms.AP",
                 progress: bool = True) -> None:
        self.cfg, self.run_dir, self.loader = cfg, Path(run_dir), train_loader
        self.config_dict, self.evaluate_fn, self.best_metric = config_dict, evaluate_fn, best_metric
        self.progress = progress
        self.device, self._owns_process_group = init_distributed(getattr(cfg, "device", "auto"))
        self.use_amp = autocast_enabled(cfg, self.device)

        self.iters_per_epoch = len(train_loader)
        if self.iters_per_epoch == 0:
            raise ValueError("the training loader is empty (0 batches); check the dataset and batch size")
        if int(cfg.max_iters) > 0:
            self.total_iters = int(cfg.max_iters)
            self.num_epochs = math.ceil(self.total_iters / self.iters_per_epoch)
        else:
            self.num_epochs = int(cfg.epochs)
            self.total_iters = self.num_epochs * self.iters_per_epoch

        self.model = model.to(self.device)
        if isinstance(criterion, nn.Module):
            criterion.to(self.device)
        self.criterion = criterion
        self.ema = build_ema(self.model, float(getattr(cfg, "ema_decay", 0.9998)),
                             float(getattr(cfg, "ema_tau", 2000))) if getattr(cfg, "ema", False) else None
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_iters)
        self.ddp_model: nn.Module = self.model
        if get_world_size() > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(getattr(cfg, "find_unused_parameters", False)))
        if getattr(cfg, "compile", False):  # only the training forward; saving and evaluation use self.model
            self.ddp_model = torch.compile(self.ddp_model)
        self.logger = MetricsLogger(self.run_dir, enabled=is_main_process(),
                                    tensorboard=bool(getattr(cfg, "tensorboard", False)))
        self.epoch = 0  # finished epochs
        self.iteration = 0  # finished iterations
        self.best: float | None = None
        self.last_eval: dict | None = None
        self.last_train: dict | None = None
        self._signals = StopSignals(self._stop_notice)  # installed during fit()
        self._stop_all = False  # a stop signal arrived on some rank (carried by each step's all-reduce)
        self._resumed = False
        self._saved: dict[str, int] = {}  # checkpoint tag -> iteration it was last written at
        self.checkpoint_every = int(getattr(cfg, "checkpoint_every", 0) or 0)

    def close(self) -> None:
        """End the training loader's persistent workers and destroy the process group if this trainer created it
        (call once all distributed work is done)."""
        shutdown_workers(self.loader)
        if self._owns_process_group and is_dist():
            dist.destroy_process_group()
            self._owns_process_group = False

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict[str, Any]:
        """Loop state stored in ``state.pt``: epoch/iteration counters, best metric and RNG states."""
        return {"epoch": self.epoch, "iteration": self.iteration, "total_iters": self.total_iters,
                "num_epochs": self.num_epochs, "iters_per_epoch": self.iters_per_epoch,
                "world_size": get_world_size(), "best_metric": self.best, "best_metric_name": self.best_metric,
                "rng": capture_rng_state(), **({} if self.ema is None else {"ema_updates": int(self.ema.n_averaged)})}

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation sees and checkpoints deploy: the EMA's module with ``train.ema``, else the model
        (unwrapped)."""
        return self.model if self.ema is None else self.ema.module

    def save(self, tag: str) -> None:
        """Write ``checkpoints/<tag>`` on the main process (atomic, see :mod:`e2edet.engine.checkpoint`)."""
        self._saved[tag] = self.iteration
        if is_main_process():
            save_checkpoint(self.run_dir, tag, self.model, self.optimizer, self.scheduler, self.trainer_state(),
                            self.config_dict, ema=self.ema)

    def resume(self, path: str | Path) -> None:
        """Restore model, EMA, optimizer, scheduler, counters, best metric and RNG from a checkpoint or run dir.

        Rank 0 gets the saved RNG state; other ranks are re-seeded from ``(seed, rank, epoch)``.
        Raises:
            ValueError: the checkpoint's model has other classes than ``config_dict`` (``model.class_names``), or
                another schedule, dataset size or number of processes (one line naming ``path``).
            FileNotFoundError, ValueError, RuntimeError: see :func:`e2edet.engine.checkpoint.load_checkpoint`.
        """
        self._check_classes(path)
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, strict=True, ema=self.ema)
        self.epoch, self.iteration = int(state.get("epoch", 0)), int(state.get("iteration", 0))
        saved = {k: int(state.get(k, now)) for k, now in (("total_iters", self.total_iters), ("iters_per_epoch",
                 self.iters_per_epoch), ("world_size", get_world_size()))}
        now = {"total_iters": self.total_iters, "iters_per_epoch": self.iters_per_epoch, "world_size": get_world_size()}
        done_in_epoch = self.iteration - self.epoch * self.iters_per_epoch
        finished = self.iteration == self.total_iters and self.epoch == self.num_epochs
        if saved != now or not (finished or 0 <= done_in_epoch <= self.iters_per_epoch):
            differ = ", ".join(f"{k} {saved[k]} (now {now[k]})" for k in saved if saved[k] != now[k])
            raise ValueError(f"cannot resume from {path}: it stopped at iteration {self.iteration} of a run with "
                             f"{differ or 'another schedule'}; resume with the dataset, batch size, number of "
                             f"processes and schedule it was trained with")
        self.best = state.get("best_metric")
        if self.ema is not None:
            self.ema.n_averaged.fill_(int(state.get("ema_updates", self.iteration)))
        self._resumed = True
        self.logger.truncate_after(self.iteration)
        if get_rank() == 0 and "rng" in state:
            restore_rng_state(state["rng"])
        else:
            seed_everything(int(self.cfg.seed) + 1000 * get_rank() + self.epoch)
        if is_main_process():
            print(f"resumed from {path}: epoch {self.epoch}, iteration {self.iteration}/{self.total_iters}")

    def _check_classes(self, path: str | Path) -> None:
        """Refuse to resume a checkpoint trained on other classes than this run's (``config_dict``), with one line
        naming ``path`` and the fine-tuning alternative, before any tensor is read; carry its stored
        ``test.predict_score`` over into ``config_dict``."""
        file, shapes, saved = read_weights_header(resolve_weights_file(path, prefer=("last", "best")))
        stored = ((saved or {}).get("test") or {}).get("predict_score")
        test = (self.config_dict or {}).get("test")
        if isinstance(test, dict) and stored:  # the run's F1-optimal threshold, until the next evaluation
            test["predict_score"] = stored
        old = ((saved or {}).get("model") or {}).get("class_names")
        new = ((self.config_dict or {}).get("model") or {}).get("class_names")
        if old and new and list(old) != list(new):
            differ = weights_mismatch({k: tuple(v.shape) for k, v in self.model.state_dict().items()}, shapes)
            raise ValueError(f"cannot resume from {path}: its model was trained on {len(old)} classes {list(old)}, "
                             f"this run has {len(new)} {list(new)}" + (f" ({file}: does not match the model: "
                             f"{differ})" if differ else "") + f"; to train on other classes start a new run from "
                             f"those weights with train.weights={path} (alias weights=)")

    # ------------------------------------------------------------------ loop
    def fit(self, resume: str | Path | None = None, stop_epoch: int | None = None) -> dict[str, Any]:
        """Train until ``total_iters`` (or until ``stop_epoch`` finished epochs, for time-sliced jobs).

        Args:
            resume: checkpoint/run dir to continue from (at the iteration it was saved), or None to start fresh
                (RNGs seeded from ``cfg.seed + rank``) unless :meth:`resume` was called already.
            stop_epoch: stop after this many finished epochs and save ``last``; the schedule still spans the whole
                run, so a later ``fit(resume=...)`` continues exactly.
        Returns:
            ``{"epoch", "iteration", "train": last train record, "eval": last evaluation dict or None,
            "best_metric": best value or None, "run_dir": str}``.
        Raises:
            FloatingPointError: a non-finite model output, loss or gradient (names the iteration and what was not
                finite; the weights are not updated, ``checkpoints/last`` stays the last good one).
            TrainingInterrupted: SIGINT/SIGTERM arrived; ``checkpoints/last`` holds the current iteration. A second
                signal while that checkpoint is written raises ``KeyboardInterrupt`` at once.
        """
        if resume is not None:
            self.resume(resume)
        elif not self._resumed:
            seed_everything(int(self.cfg.seed) + get_rank())
        self.model.train()
        with self._signals:
            while self.iteration < self.total_iters and (stop_epoch is None or self.epoch < stop_epoch):
                start = self.iteration - self.epoch * self.iters_per_epoch  # > 0 when resumed mid-epoch
                self._train_epoch(self.epoch, start)
                self._check_stop()
                self.epoch += 1
                self._end_of_epoch(stopping=stop_epoch is not None and self.epoch >= stop_epoch)
                self._check_stop()
        if is_dist():
            dist.barrier()
        return {"epoch": self.epoch, "iteration": self.iteration, "train": self.last_train,
                "eval": self.last_eval, "best_metric": self.best, "run_dir": str(self.run_dir)}

    def _stop_notice(self, signum: int) -> str | None:
        """The line printed on the first stop signal (main process only)."""
        if not is_main_process():
            return None
        return (f"\ne2edet: {signal.Signals(signum).name} received: finishing the current step, then writing "
                f"{self.run_dir / 'checkpoints' / 'last'} (again to abort without saving)")

    def _stop_agreed(self) -> bool:
        """Whether a stop signal arrived on any rank (one all-reduce; called between epochs, where no training
        step carried the flag)."""
        flag = self._signals.requested is not None
        if is_dist():
            t = torch.tensor([float(flag)], device=self.device)
            dist.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag

    def _check_stop(self) -> None:
        """On a pending stop signal: write ``checkpoints/last`` of the current iteration and raise
        :class:`TrainingInterrupted`."""
        if not self._stop_agreed() or self.iteration >= self.total_iters:  # a finished run just ends
            return
        if self._saved.get("last") != self.iteration:
            self.save("last")
        config = self.run_dir / "config.yaml"
        how = f"e2edet train {config} --resume {self.run_dir}" if config.is_file() else f"--resume {self.run_dir}"
        raise TrainingInterrupted(f"interrupted at iteration {self.iteration}/{self.total_iters}; checkpoint "
                                  f"{self.run_dir / 'checkpoints' / 'last'} written; resume with: {how}")

    def _train_epoch(self, epoch: int, start: int = 0) -> None:
        """Run the iterations of 0-based ``epoch`` from its ``start``-th batch (fewer in the last epoch of a
        ``max_iters`` run); a loader without a resumable sampler has its first ``start`` batches drawn and
        dropped."""
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        owners = (self.loader, getattr(self.loader, "sampler", None), batch_sampler,
                  getattr(batch_sampler, "sampler", None))
        skip, batch_size = start, int(getattr(self.loader, "batch_size", 0) or 0)
        for obj in {id(o): o for o in owners if hasattr(o, "set_epoch")}.values():
            if start and batch_size and "start" in inspect.signature(obj.set_epoch).parameters:
                obj.set_epoch(epoch, start=start * batch_size)
                skip = 0
            else:
                obj.set_epoch(epoch)
        num_iters = min(self.iters_per_epoch - start, self.total_iters - self.iteration)
        if num_iters <= 0:
            return
        window: dict[str, float] = {}
        count, epoch_time = 0, 0.0
        log_period = max(1, int(self.cfg.log_period))
        # the bar counts the whole epoch (the last one of a max_iters run may be shorter); a resumed epoch starts
        # at the iterations it had done, so it reads e.g. "epoch 2/3: 4/10" and not "0/6"
        bar = tqdm(total=start + num_iters, initial=start, desc=f"epoch {epoch + 1}/{self.num_epochs}",
                   dynamic_ncols=True, disable=not (self.progress and is_main_process()))
        try:
            end = time.perf_counter()
            batches = iter(self.loader)
            for _ in range(skip):  # a plain loader: draw the batches already trained on
                next(batches)
            for i, (images, targets) in enumerate(batches):
                if i >= num_iters:
                    break
                data_time = time.perf_counter() - end
                lr = base_lr(self.optimizer)  # cfg.lr x schedule (groups may carry lr multipliers)
                values = self.train_step(images, targets, epoch)
                self.iteration += 1
                step_time = time.perf_counter() - end
                end = time.perf_counter()
                epoch_time += step_time
                count += 1
                for k, v in {**values, "time": step_time, "data_time": data_time, "lr": lr}.items():
                    window[k] = window.get(k, 0.0) + v
                eta = epoch_time / (i + 1) * (self.total_iters - self.iteration)
                bar.set_postfix(loss=f"{values['total_loss']:.4f}", lr=f"{lr:.2e}", eta=_hms(eta))
                bar.update()
                if self.iteration % log_period == 0 or i == num_iters - 1:
                    record = {"type": "train", "iteration": self.iteration, "epoch": epoch,
                              **{k: v / count for k, v in window.items()}, "eta_seconds": eta}
                    if self.device.type == "cuda":
                        record["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                    self.logger.log(record)
                    self.last_train = record
                    window, count = {}, 0
                every = self.checkpoint_every
                if every > 0 and self.iteration % every == 0 and i < num_iters - 1:
                    self.save("last")  # mid-epoch; the end of the epoch saves on its own (see _end_of_epoch)
                if self._stop_all:
                    break
        finally:
            bar.close()

    def train_step(self, images: torch.Tensor, targets: list[dict[str, Any]], epoch: int) -> dict[str, float]:
        """One optimisation step on a batch; also usable by benchmarks.

        Returns:
            Loss values and statistics averaged over ranks, as floats, plus ``total_loss``.
        Raises:
            KeyError: the criterion returned no ``loss*`` key.
            FloatingPointError: the summed loss or one of its terms is not finite (before any weight update).
        """
        images = images.to(self.device, non_blocking=True)
        targets = [_to_device(t, self.device) for t in targets]
        sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            outputs = self.ddp_model(images, sizes)
        if self.use_amp:
            outputs = to_float32(outputs)
        try:
            loss_dict = self.criterion(outputs, targets, epoch=epoch, max_epoch=self.num_epochs)
        except RuntimeError as err:  # e.g. a probability-space loss refusing NaN scores: name the real cause
            bad = first_non_finite(outputs)
            if bad is None:
                raise
            raise FloatingPointError(self._non_finite_message(epoch, f"the model output {bad!r} is not finite "
                                                                     f"(the criterion failed: {err})")) from err
        loss_keys = [k for k in loss_dict if is_loss_key(k)]
        if not loss_keys:
            raise KeyError(f"the criterion returned no 'loss*' entry (keys: {sorted(loss_dict)})")
        loss = sum(loss_dict[k] for k in loss_keys)
        stat_keys = [k for k, v in loss_dict.items() if k not in loss_keys and (
            isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1))]
        names = ["total_loss", *loss_keys, *stat_keys]
        pending = float(self._signals.requested is not None)  # rides on the same all-reduce: every rank stops together
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).detach().reshape(())
                               for v in [loss, *(loss_dict[k] for k in loss_keys + stat_keys), pending]])
        if is_dist():
            dist.all_reduce(stacked)
            stacked /= get_world_size()
        *reduced, stop = stacked.tolist()
        self._stop_all = stop > 0
        values = dict(zip(names, reduced))
        bad_losses = [k for k in [*loss_keys, "total_loss"] if not math.isfinite(values[k])]
        if bad_losses:
            shown = ", ".join(f"{k}={values[k]:.4g}" for k in bad_losses[:4])
            more = f" and {len(bad_losses) - 4} more" if len(bad_losses) > 4 else ""
            raise FloatingPointError(self._non_finite_message(epoch, f"non-finite loss {bad_losses[0]} "
                                                                     f"({shown}{more})"))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = self._clip_gradients(float(getattr(self.cfg, "clip_grad_norm", 0.0) or 0.0), epoch)
        values["grad_norm"] = norm
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.scheduler.step()
        return values

    def _clip_gradients(self, clip: float, epoch: int) -> float:
        """:func:`~e2edet.engine.precision.clip_finite_gradients`; a non-finite gradient clears the gradients and
        raises FloatingPointError naming its first parameter."""
        norm, bad = clip_finite_gradients(self.model, clip)
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(self._non_finite_message(epoch, f"non-finite gradient (norm {norm}, first in "
                                                                     f"{bad!r}) of finite losses"))
        return norm

    def _non_finite_message(self, epoch: int, what: str) -> str:
        """One line for a non-finite step: iteration, what was not finite, and the checkpoint that is kept."""
        last = self.run_dir / "checkpoints" / "last"
        kept = f"the last good checkpoint is {last}" if last.is_dir() else "no checkpoint was written yet"
        return (f"training diverged at iteration {self.iteration + 1} (epoch {epoch + 1}): {what}; stopped before "
                f"updating the weights, {kept} (try a lower lr or clip_grad_norm)")

    def _end_of_epoch(self, stopping: bool) -> None:
        """Evaluate, keep ``best``, save ``last`` and redraw ``loss.png`` as the periods ask."""
        done, finished = self.epoch, self.iteration >= self.total_iters
        eval_period, ckpt_period = int(self.cfg.eval_period), int(self.cfg.checkpoint_period)
        if self.evaluate_fn is not None and (finished or (eval_period > 0 and done % eval_period == 0)):
            self._evaluate(done)
        every = self.checkpoint_every
        if finished or stopping or (ckpt_period > 0 and done % ckpt_period == 0) or (
                every > 0 and self.iteration % every == 0):
            self.save("last")
        if is_main_process():
            try:
                plot_losses(self.logger.path, self.run_dir / "loss.png", metric=self.best_metric)
            except Exception as err:  # a picture must never stop a training run
                warnings.warn(f"could not draw {self.run_dir / 'loss.png'}: {err}", stacklevel=2)

    def _evaluate(self, done: int) -> None:
        """Run ``evaluate_fn`` without disturbing the training RNG stream; log it and update ``best``."""
        with preserve_rng_state():
            self.model.eval()
            try:
                result = dict(self.evaluate_fn(self.eval_model, done))
            finally:
                self.model.train()
        self.last_eval = result
        self.logger.log({"type": "eval", "epoch": done, "iteration": self.iteration, **result})
        if is_main_process():
            save_results(result, self.run_dir / f"eval_epoch{done:03d}.json")
        self._store_predict_score(result)
        value = lookup(result, self.best_metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and (self.best is None or value > self.best):
            self.best = float(value)
            self.save("best")

    def _store_predict_score(self, result: Mapping[str, Any]) -> None:
        """Put the F1-optimal score threshold of this evaluation (``diagnostics.<column>.f1_threshold`` of the
        column of ``best_metric``, e.g. ``no_nms`` of ``no_nms.AP`` or ``segm.no_nms.AP``) into the config the next
        checkpoints store, as ``test.predict_score``: ``e2edet predict`` and the pictures then show what the model
        found."""
        parts = self.best_metric.split(".")
        column = next((part for part in parts if part in ("no_nms", "nms")), parts[0])
        threshold = lookup(result, f"diagnostics.{column}.f1_threshold")
        test = (self.config_dict or {}).get("test")
        if isinstance(test, dict) and isinstance(threshold, (int, float)) and 0 < threshold <= 1:
            test["predict_score"] = round(float(threshold), 4)
