"""Loader order: reproducible per (seed, epoch), different across epochs; eval order sequential."""

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from e2edet.data.loader import EpochShuffleSampler, ShardSampler, build_loader, seed_worker


class _Indexed(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(3, 4 + i % 3, 5), {"index": i}


def _order(loader, epoch=None):
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    return [t["index"] for _, targets in loader for t in targets]


def test_train_order_reproducible_per_epoch():
    ds = _Indexed(40)
    first = build_loader(ds, batch_size=3, train=True, workers=0, seed=7, distributed=False)
    again = build_loader(ds, batch_size=3, train=True, workers=0, seed=7, distributed=False)
    other_seed = build_loader(ds, batch_size=3, train=True, workers=0, seed=8, distributed=False)
    epoch0 = _order(first, 0)
    assert sorted(epoch0) == list(range(40)) and epoch0 != list(range(40))
    assert _order(again, 0) == epoch0
    epoch1 = _order(first, 1)
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(40))
    assert _order(again, 1) == epoch1 and _order(first, 0) == epoch0
    assert _order(other_seed, 0) != epoch0
    assert len(first) == 14  # last partial batch kept (drop_last=False)


def test_eval_order_is_sequential_and_batches_are_padded():
    loader = build_loader(_Indexed(7), batch_size=4, train=False, workers=0, seed=0, distributed=False)
    assert _order(loader) == list(range(7))
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and len(targets) == 4


def test_samplers_and_worker_seeding():
    sampler = EpochShuffleSampler(10, seed=3)
    sampler.set_epoch(2)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert list(sampler) == expected and len(sampler) == 10
    assert list(ShardSampler(10, rank=1, world_size=3)) == [1, 4, 7]
    torch.manual_seed(1234)
    seed_worker(0)
    a = (random.random(), np.random.rand())
    torch.manual_seed(1234)
    seed_worker(0)
    assert (random.random(), np.random.rand()) == a
