"""The shard-local training order (imgcls.data.shard_order.ShardOrderSampler), alone and under accelerate's sharding.

    .venv/bin/python -m pytest -q tests/test_shard_order.py
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from imgcls.data.loaders import make_loader
from imgcls.recipe import DataConfig
from imgcls.data.shard_order import ShardOrderSampler
from imgcls.data.store import keep_batch

COUNTS = [7, 5, 9, 3, 6]  # N = 30


def shard_of(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def test_order_is_a_pure_function_of_seed_and_epoch():
    a = ShardOrderSampler(COUNTS, 1, 5, None, seed=3)
    b = ShardOrderSampler(COUNTS, 1, 5, None, seed=3)
    orders = {}
    for epoch in (0, 1, 2, 0):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        orders.setdefault(epoch, list(a))
        assert list(a) == list(b) == orders[epoch]
        assert sorted(orders[epoch]) == list(range(30))  # M = 30 // 5: every item once
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    other_seed = ShardOrderSampler(COUNTS, 1, 5, None, seed=4)
    assert list(other_seed) != orders[0]


def test_shards_stay_whole_and_both_orders_change_with_the_epoch():
    s = ShardOrderSampler(COUNTS, 1, 5, None, seed=0)
    owner = shard_of(COUNTS)
    shard_orders, row_orders = [], []
    for epoch in range(4):
        seq = s.sequence(epoch)
        runs = [int(k) for k, _ in itertools.groupby(owner[seq])]
        assert sorted(runs) == list(range(5))  # each shard's rows form one run of S
        shard_orders.append(runs)
        row_orders.append([int(i) for i in seq if owner[i] == 2])
    assert len({tuple(o) for o in shard_orders}) > 1
    assert len({tuple(o) for o in row_orders}) == 4


def test_each_epoch_is_a_subset_without_repeats_and_lanes_are_runs_of_the_sequence():
    w, b, m = 2, 3, 4  # L = 12, W*L = 24 of 30: 6 left out
    s = ShardOrderSampler(COUNTS, w, b, m, seed=7)
    for epoch in range(3):
        s.set_epoch(epoch)
        got = list(s)
        assert len(got) == len(s) == w * m * b == 24
        assert len(set(got)) == 24 and set(got) <= set(range(30))
        seq = s.sequence()
        batches = [got[j:j + b] for j in range(0, len(got), b)]
        for r in range(w):
            lane = [i for batch in batches[r::w] for i in batch]
            assert lane == seq[r * m * b:(r + 1) * m * b].tolist()
            assert lane == s.lanes()[r].tolist()


def accelerate_lanes(sampler: ShardOrderSampler, world: int, epoch: int) -> list[list[int]]:
    """What each of `world` processes receives from a DataLoader over the sampler prepared by accelerate."""
    lanes = []
    for rank in range(world):
        loader = DataLoader(list(range(sum(sampler.counts))), batch_size=sampler.per_device_batch,
                            sampler=sampler, drop_last=True)
        prepared = prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False,
                                       split_batches=False)
        prepared.set_epoch(epoch)
        lanes.append([int(i) for batch in prepared for i in batch.tolist()])
    return lanes


def test_under_accelerate_each_process_reads_its_own_shards():
    counts = [6] * 8  # N = 48; b = 3, M = 8: L = 24 = four whole shards a process
    sampler = ShardOrderSampler(counts, 2, 3, 8, seed=1)
    owner = shard_of(counts)
    seen = []
    for epoch in (0, 1):
        lanes = accelerate_lanes(sampler, 2, epoch)
        assert lanes == sampler.lanes(epoch).tolist()
        shards = [set(owner[lane].tolist()) for lane in lanes]
        assert len(shards[0]) == len(shards[1]) == 4 and not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(range(8))
        seen.append(shards[0])
    assert seen[0] != seen[1]  # which shards a process reads changes with the epoch


def test_unaligned_shards_straddle_at_most_one_boundary_between_lanes():
    sampler = ShardOrderSampler(COUNTS, 2, 3, 5, seed=2)  # L = 15 of 30
    owner = shard_of(COUNTS)
    lanes = accelerate_lanes(sampler, 2, 0)
    assert sorted(lanes[0] + lanes[1]) == list(range(30))
    shared = set(owner[lanes[0]].tolist()) & set(owner[lanes[1]].tolist())
    assert len(shared) <= 1
    assert lanes[0][-1] == sampler.sequence(0)[14] and lanes[1][0] == sampler.sequence(0)[15]


class Positions(torch.utils.data.Dataset):
    """The part of a dataset a loader's order shows: the positions it is asked for."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, positions: list[int]) -> list[int]:
        return list(positions)


def test_unshuffled_single_process_is_the_folder_loaders_order():
    n, b = 30, 4
    sampler = ShardOrderSampler(COUNTS, 1, b, None, seed=5, shuffle=False)
    sampler.set_epoch(3)
    assert list(sampler) == list(range(28))
    cfg = DataConfig(source="folder", root="unused", shuffle=False)
    folder_batches = list(make_loader(Positions(n), b, cfg, train=True, seed=5))
    shard_batches = list(DataLoader(Positions(n), batch_size=b, sampler=sampler, drop_last=True,
                                    collate_fn=keep_batch))
    assert shard_batches == folder_batches == [list(range(j, j + b)) for j in range(0, 28, b)]


def test_too_many_micro_batches_is_an_error_naming_the_numbers():
    with pytest.raises(ValueError) as e:
        ShardOrderSampler(COUNTS, 2, 4, 4, seed=0)
    assert str(e.value) == "4 micro-batches of 4 on each of 2 process(es) need 32 items; the shards hold 30"
    with pytest.raises(ValueError, match="need 64 items; the shards hold 30"):
        ShardOrderSampler(COUNTS, 2, 32, None, seed=0)


def test_the_shard_order_and_the_row_orders_are_drawn_from_distinct_streams():
    """SeedSequence([seed, epoch]) is SeedSequence([seed, epoch, 0]) (trailing zeros pad the entropy): with the two
    orders keyed that way, shard 0's rows came in the order of the shards, every epoch."""
    counts = [6] * 6
    s = ShardOrderSampler(counts, 1, 6, None, seed=11)
    owner = shard_of(counts)
    same = 0
    for epoch in range(20):
        seq = s.sequence(epoch)
        shard_order = [int(k) for k, _ in itertools.groupby(owner[seq])]
        rows_of_0 = [int(i) for i in seq if owner[i] == 0]
        same += shard_order == rows_of_0
    assert same == 0


@pytest.mark.parametrize("saved_world,world,done", [(2, 1, 3), (1, 2, 2), (4, 2, 1), (2, 4, 3)])
def test_a_resume_on_another_process_count_reads_the_rest_of_the_epoch_once(saved_world, world, done):
    """Saved by `saved_world` processes after `done` micro-batches of epoch 1, continued on `world`: what the
    new processes read after skipping their first `done` micro-batches is exactly what the old ones had not."""
    counts, global_micro = [6] * 8, 8  # N = 48; 8 items a micro-batch over all processes; M = 5
    old = ShardOrderSampler(counts, saved_world, global_micro // saved_world, 5, seed=3)
    seen = old.lanes(1)[:, :done * old.per_device_batch].reshape(-1).tolist()
    new = ShardOrderSampler(counts, world, global_micro // world, 5, seed=3)
    new.resume_from(1, saved_world, done)
    lanes = accelerate_lanes(new, world, 1)
    assert lanes == new.lanes(1).tolist()
    rest = [i for lane in lanes for i in lane[done * new.per_device_batch:]]
    assert sorted(seen + rest) == sorted(old.lanes(1).reshape(-1).tolist())  # every item of the epoch once
    assert new.lanes(2).tolist() == ShardOrderSampler(counts, world, global_micro // world, 5, seed=3).lanes(2).tolist()
    owner = shard_of(counts)  # each process still reads runs of shards, not all of them
    assert all(len(set(owner[lane[done * new.per_device_batch:]].tolist())) <= 8 // world + 2 for lane in lanes)
