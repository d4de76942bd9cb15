"""Loader order: reproducible per (seed, epoch), different across epochs; eval order sequential."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from e2edet.data.loader import EpochShuffleSampler, SeededSamples, ShardSampler, build_loader, seed_worker


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
    assert [i for i, _ in sampler] == expected and len(sampler) == 10
    assert list(ShardSampler(10, rank=1, world_size=3)) == [1, 4, 7]
    torch.manual_seed(1234)
    seed_worker(0)
    a = (random.random(), np.random.rand())
    torch.manual_seed(1234)
    seed_worker(0)
    assert (random.random(), np.random.rand()) == a


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 4), (3, 4)])
def test_sharded_order_is_distributed_samplers(n, world):
    for rank in range(world):
        ours = EpochShuffleSampler(n, seed=5, rank=rank, world_size=world)
        theirs = DistributedSampler(_Indexed(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert [i for i, _ in ours] == list(theirs) and len(ours) == len(theirs)


def test_start_skips_the_head_of_the_same_epoch_with_the_same_seeds():
    sampler = EpochShuffleSampler(11, seed=2)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.set_epoch(4, start=6)
    assert list(sampler) == whole[6:] and len(sampler) == 5
    assert len({s for _, s in whole}) == 11  # one seed per position
    sampler.set_epoch(5)
    assert {s for _, s in sampler}.isdisjoint({s for _, s in whole})


class _RandomCrop(Dataset):
    """Each item draws from every global generator, as random transforms do."""

    def __len__(self):
        return 9

    def __getitem__(self, i):
        return torch.rand(3, 4, 4) + random.random() + float(np.random.rand()), {"index": i}


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_depends_on_epoch_and_position_only(workers):
    def epoch_images(loader, epoch, start=0):
        loader.sampler.set_epoch(epoch, start=start)
        return [img for images, _ in loader for img in images]

    base = build_loader(_RandomCrop(), batch_size=3, train=True, workers=0, seed=1, distributed=False)
    other = build_loader(_RandomCrop(), batch_size=3, train=True, workers=workers, seed=1, distributed=False)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    reference = epoch_images(base, 2)
    assert torch.equal(torch.get_rng_state(), state)  # loading in the main process leaves the training stream alone
    torch.manual_seed(99)  # unrelated global state does not matter either
    resumed = epoch_images(other, 2, start=3)
    assert all(torch.equal(a, b) for a, b in zip(reference[3:], resumed, strict=True))
    assert not torch.equal(epoch_images(base, 3)[0], reference[0])


def test_seeded_samples_pass_plain_indices_through():
    wrapped = SeededSamples(_Indexed(4))
    assert wrapped[2][1] == {"index": 2} and len(wrapped) == 4 and wrapped.n == 4
