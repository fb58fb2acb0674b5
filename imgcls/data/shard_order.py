"""`ShardOrderSampler`: a training order over sharded data in which each process reads its own run of shards.

    sampler = ShardOrderSampler(shard_counts(split), world_size=W, per_device_batch=b,
                                micro_batches_per_epoch=M, seed=seed, shuffle=True)
    loader = DataLoader(dataset, batch_size=b, sampler=sampler, drop_last=True, ...)
    loader = accelerator.prepare(loader)     # BatchSamplerShard, split_batches=False
    loader.set_epoch(epoch)                  # before iterating each epoch (the protocol accelerate calls)

The epoch's sequence S. Shuffled, S visits the shards in an order drawn from (seed, epoch) and, inside each
shard, its items in an order drawn from (seed, epoch, shard); both come from numpy's `SeedSequence` (in two
domains, so that no shard's row order is the shard order), so S is a
pure function of (seed, epoch): the same on every process, after a resume, with any number of workers.
Unshuffled, S = 0, 1, ..., N-1: the order of a folder loader without shuffle.

Lanes. With W processes, b items per micro-batch and M micro-batches per process per epoch, each process
consumes L = M*b items; lane r is S[r*L:(r+1)*L], one contiguous run of S, so a run of whole shards (a shard
that straddles two lanes is read by both; the N - W*L items at the end of S are left out this epoch, as
drop_last leaves out a last short batch). The sampler yields, for t in 0..M-1 and r in 0..W-1, lane r's
micro-batch t (b items). A DataLoader with batch_size b cuts that into batches 0, 1, 2, ..., and accelerate's
BatchSamplerShard (split_batches=False) gives process r the batches r, r+W, r+2W, ...: exactly lane r, in
order. So a process reads about N/W items' worth of shards per epoch instead of every shard, and each shard it
reads is consumed front to back while it is in the reader's memory (`shards.KEEP_SHARDS`); with n > 1
DataLoader workers, batches go to the workers in turn, so each worker reads every shard of the lane. len() is
W*M*b. Accelerate's loader calls `set_epoch` with its own count of finished iterations before each one: call
`loader.set_epoch(epoch)` first (after a resume too).

The indices are positions of the dataset; `shards.shard_counts(split)` gives the per-shard counts of a split's
positions (for a split that holds every item of its shards, positions are the items).

Mixing is limited to what keeps reads local: the order of the shards and the order inside each shard change
every epoch, but a micro-batch draws from the one or two shards its lane is in at that point. Shards written
from a class-folder tree follow the folder order, which is sorted by class, so their batches hold few classes.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

SHARD_ORDER, ROW_ORDER = 0, 1  # the two domains of random numbers


class ShardOrderSampler(Sampler[int]):
    def __init__(self, counts: Sequence[int], world_size: int, per_device_batch: int,
                 micro_batches_per_epoch: int | None, seed: int, shuffle: bool = True):
        """`counts[k]`: items of shard k (positions start[k]..start[k]+counts[k]-1, in shard order).
        `micro_batches_per_epoch` None: as many as fit, N // (world_size * per_device_batch)."""
        self.counts = [int(c) for c in counts]
        self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        n = int(self.starts[-1])
        if world_size < 1 or per_device_batch < 1:
            raise ValueError(f"world_size ({world_size}) and per_device_batch ({per_device_batch}) must be >= 1")
        if micro_batches_per_epoch is None:
            micro_batches_per_epoch = n // (world_size * per_device_batch)
        if micro_batches_per_epoch < 1 or world_size * micro_batches_per_epoch * per_device_batch > n:
            raise ValueError(f"{micro_batches_per_epoch} micro-batches of {per_device_batch} on each of {world_size} "
                             f"process(es) need {world_size * max(micro_batches_per_epoch, 1) * per_device_batch} "
                             f"items; the shards hold {n}")
        self.world_size, self.per_device_batch = world_size, per_device_batch
        self.micro_batches = micro_batches_per_epoch
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.resumed: tuple[int, int, int] | None = None  # (epoch, saved world size, micro-batches done)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.world_size * self.micro_batches * self.per_device_batch

    def _rng(self, domain: int, *parts: int) -> np.random.Generator:
        """A generator of (seed, parts) in its own domain (spawn_key): SeedSequence pads entropy with zeros, so
        [seed, epoch] and [seed, epoch, 0] alone would be one stream, and shard 0's rows would follow the shards."""
        entropy = [int(p) % 2**64 for p in (self.seed, *parts)]  # SeedSequence takes non-negative integers
        return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(domain,)))

    def sequence(self, epoch: int | None = None) -> np.ndarray:
        """S of an epoch (this sampler's epoch by default): every position once, int64 [N]."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.starts[-1], dtype=np.int64)
        shards = self._rng(SHARD_ORDER, epoch).permutation(len(self.counts))
        runs = [self.starts[k] + self._rng(ROW_ORDER, epoch, k).permutation(self.counts[k]) for k in shards]
        return np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)

    def resume_from(self, epoch: int, saved_world_size: int, micro_batches_done: int) -> None:
        """The run goes on from a checkpoint that `saved_world_size` processes wrote after `micro_batches_done`
        micro-batches of `epoch` (the global batch, so M, is the same). With another process count, that epoch's
        lanes are laid out anew: what the saved lanes had read comes first (the trainer skips those micro-batches
        without reading them), then the rest of each saved lane, in order, cut into this run's lanes. So the epoch
        still reads every item once, as the folder path does; later epochs are as ever."""
        if saved_world_size != self.world_size and micro_batches_done:
            if (self.world_size * self.per_device_batch) % saved_world_size:
                raise ValueError(f"a micro-batch of {self.world_size * self.per_device_batch} items does not divide "
                                 f"over the {saved_world_size} processes that saved the run")
            self.resumed = (epoch, saved_world_size, micro_batches_done)

    def lanes(self, epoch: int | None = None) -> np.ndarray:
        """int64 [W, M*b]: lane r is what process r reads this epoch, in order."""
        epoch = self.epoch if epoch is None else epoch
        w, m, b = self.world_size, self.micro_batches, self.per_device_batch
        sequence = self.sequence(epoch)[:w * m * b]
        if self.resumed is None or self.resumed[0] != epoch:
            return sequence.reshape(w, m * b)
        _, saved_w, done = self.resumed
        saved = sequence.reshape(saved_w, m * (w * b // saved_w))
        cut = done * (w * b // saved_w)
        read, rest = saved[:, :cut].reshape(w, done * b), saved[:, cut:].reshape(w, (m - done) * b)
        return np.concatenate([read, rest], axis=1)

    def __iter__(self) -> Iterator[int]:
        w, m, b = self.world_size, self.micro_batches, self.per_device_batch
        # [W, M, b] -> [M, W, b]: micro-batch t of lane 0, of lane 1, ..., then micro-batch t+1
        yield from self.lanes().reshape(w, m, b).transpose(1, 0, 2).reshape(-1).tolist()

    def lane_shards(self, epoch: int | None = None) -> list[list[int]]:
        """For each lane (process), the shards it reads in an epoch, in the order it reads them; the epoch's
        sequence is drawn once."""
        shard_of = np.searchsorted(self.starts, self.lanes(epoch), side="right") - 1
        return [list(dict.fromkeys(lane.tolist())) for lane in shard_of]
