"""``DataLoader`` construction with reproducible, epoch-dependent shuffling."""

from __future__ import annotations

import functools
import random
from typing import Iterator

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from e2edet.data.collate import collate

__all__ = ["EpochShuffleSampler", "ShardSampler", "build_loader", "seed_worker"]


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(length)`` drawn from ``seed + epoch``.

    The same ``(seed, epoch)`` always gives the same order; call :meth:`set_epoch` before each epoch
    (the trainer does, as with ``DistributedSampler``) to get a new order.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of epoch ``epoch`` (generator seeded with ``seed + epoch``)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class ShardSampler(Sampler[int]):
    """Sequential indices ``rank, rank + world, ...`` for distributed evaluation (no padding, no repeats)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(int(rank), int(length), int(world_size)))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's ``random`` and NumPy from the worker's torch seed.

    PyTorch seeds each worker's torch generator with ``base_seed + worker_id`` (``base_seed`` drawn from the
    loader's generator); this makes the other generators follow it.
    """
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

    Training: shuffled by :class:`EpochShuffleSampler` (or ``DistributedSampler(shuffle=True, seed=seed)``
    when distributed); the sampler's ``set_epoch(e)`` selects the order of epoch ``e``. Evaluation:
    sequential (each process gets a :class:`ShardSampler` slice when distributed). Both keep the last,
    partial batch, use :func:`~e2edet.data.collate.collate`, seed workers with :func:`seed_worker` from a
    generator seeded with ``seed``, and do not keep workers alive between epochs.

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
    sampler: Sampler[int] | None
    if train:
        sampler = (
            DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
            if distributed else EpochShuffleSampler(len(dataset), seed)
        )
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
        persistent_workers=False,
        drop_last=False,
    )
