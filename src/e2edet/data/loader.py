"""``DataLoader`` construction with reproducible, epoch-dependent shuffling."""

from __future__ import annotations

import functools
import hashlib
import math
import random
import signal
from typing import Iterator

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.utils.data
from torch.utils.data import DataLoader, Dataset, Sampler

from e2edet.data.collate import collate

__all__ = ["EpochShuffleSampler", "SeededSamples", "ShardSampler", "build_loader", "seed_worker"]


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Per-epoch random order of ``range(length)`` that can start in the middle of an epoch.

    The order of epoch ``e`` is ``torch.randperm(length)`` drawn from a generator seeded with ``seed + e`` (the
    order ``DistributedSampler(shuffle=True, seed=seed, drop_last=False)`` uses: padded by repeating its start
    to a multiple of ``world_size``, then every ``world_size``-th item from ``rank``). Each item is yielded as
    ``(index, sample_seed)``: :class:`SeededSamples` runs the dataset's random transforms from ``sample_seed``,
    which depends only on ``(seed, epoch, position in the epoch)``. A sample's augmentation is therefore the same
    whichever loader worker loads it, and an epoch resumed after ``k`` samples (:meth:`set_epoch` with
    ``start=k``) continues exactly as the uninterrupted epoch would.

    Args:
        length: dataset length.
        seed: run seed.
        rank, world_size: this process's shard (default: not distributed).
    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``.
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochShuffleSampler: rank {rank} outside [0, {world_size})")
        self.length, self.seed = int(length), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the order of epoch ``epoch`` and skip its first ``start`` items of this rank (for resuming)."""
        self.epoch, self.start = int(epoch), max(0, int(start))

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        total = math.ceil(self.length / self.world_size) * self.world_size if self.length else 0
        while len(order) < total:  # pad like DistributedSampler(drop_last=False)
            order += order[: total - len(order)]
        return order[self.rank::self.world_size]

    def sample_seed(self, position: int) -> int:
        """Seed of the ``position``-th item (0-based, this rank's order) of the current epoch (63-bit)."""
        key = f"{self.seed}:{self.epoch}:{self.rank}:{self.world_size}:{position}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        return iter([(order[i], self.sample_seed(i)) for i in range(self.start, len(order))])

    def __len__(self) -> int:
        per_rank = math.ceil(self.length / self.world_size) if self.length else 0
        return max(0, per_rank - self.start)


class SeededSamples(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` runs its random transforms from ``seed``.

    The global generators (torch CPU, Python ``random``, NumPy) are seeded with ``seed`` for the duration of the
    load and restored afterwards, so loading in the main process (``workers=0``) never disturbs the training
    stream, and loading in a worker gives the same sample as in the main process. A plain ``int`` index is
    passed through unchanged (no seeding).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        if name == "dataset":  # not yet set (unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ShardSampler(Sampler[int]):
    """Sequential indices ``rank, rank + world, ...`` for distributed evaluation (no padding, no repeats)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(int(rank), int(length), int(world_size)))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's ``random`` and NumPy from the worker's torch seed; ignore SIGINT.

    PyTorch seeds each worker's torch generator with ``base_seed + worker_id`` (``base_seed`` drawn from the
    loader's generator); this makes the other generators follow it (training samples are seeded one by one by
    :class:`SeededSamples` anyway). SIGINT is ignored in workers: a Ctrl-C in the terminal reaches the whole
    process group, and the main process decides what to do (the trainer saves a checkpoint and stops). SIGTERM
    gets its default action back (not the trainer's handler, which a forked worker inherits): the loader and
    ``multiprocessing`` end workers with SIGTERM, and a worker that ignored it would hang the exit.
    """
    if torch.utils.data.get_worker_info() is not None:  # only in a loader worker process
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handler; the loader ends workers with it
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    distributed: bool | None = None,
    size_divisibility: int = 32,
) -> DataLoader:
    """Build the training or evaluation loader for a detection dataset.

    Training: shuffled by :class:`EpochShuffleSampler` (sharded by rank when distributed, in
    ``DistributedSampler``'s order), with every sample's random transforms seeded from ``(seed, epoch,
    position)`` through :class:`SeededSamples`; the sampler's ``set_epoch(e, start=k)`` selects the order of
    epoch ``e`` and skips its first ``k`` samples (exact mid-epoch resume with any number of workers). Evaluation:
    sequential (each process gets a :class:`ShardSampler` slice when distributed). Both keep the last,
    partial batch, use :func:`~e2edet.data.collate.collate` and seed workers with :func:`seed_worker` from a
    generator seeded with ``seed``. Training workers persist across epochs (starting them again at every epoch
    start cost seconds per epoch on short CPU epochs); the sampler runs in the main process and every sample is
    seeded on its own, so the batches are the same as with fresh workers. Evaluation workers end with each pass.

    Args:
        dataset: map-style dataset of ``(image, target)`` samples.
        batch_size: images per batch (per process).
        train: training (shuffled) or evaluation (sequential) order.
        workers: loader worker processes (0 = load in the main process).
        seed: shuffling and worker seed.
        distributed: shard across processes; ``None`` = whether ``torch.distributed`` is initialised.
        size_divisibility: padding multiple for :func:`~e2edet.data.collate.collate`.

    Returns:
        The ``DataLoader``; yields ``(images float32 [B, 3, Hp, Wp], list of B target dicts)``.

    Raises:
        ValueError: ``batch_size < 1`` or ``workers < 0``.
    """
    if batch_size < 1 or workers < 0:
        raise ValueError(f"build_loader: need batch_size >= 1 and workers >= 0, got {batch_size}, {workers}")
    if distributed is None:
        distributed = torch_dist.is_available() and torch_dist.is_initialized()
    sampler: Sampler | None
    if train:
        rank, world = (torch_dist.get_rank(), torch_dist.get_world_size()) if distributed else (0, 1)
        sampler = EpochShuffleSampler(len(dataset), seed, rank=rank, world_size=world)
        dataset = SeededSamples(dataset)
    elif distributed:
        sampler = ShardSampler(len(dataset), torch_dist.get_rank(), torch_dist.get_world_size())
    else:
        sampler = None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=functools.partial(collate, size_divisibility=size_divisibility),
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=train and workers > 0,
        drop_last=False,
    )
