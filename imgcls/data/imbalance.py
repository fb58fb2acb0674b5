"""Class imbalance: loss weights per class (`train.class_weights`) and a class-balanced train order
(`data.sampler = "balanced"`).

    labels = split_labels(plan.splits.train)                 # class index of each train position
    weights = class_weights(labels, class_names)             # n / (classes * count_c), sklearn's "balanced"
    loss = F.cross_entropy(logits, targets, weight=weights)  # class indices or soft (mixup/cutmix) targets
    sampler = BalancedSampler(labels, seed)                  # DataLoader(..., sampler=sampler); set_epoch(e)

The balanced order draws len(split) positions per epoch, with replacement, each with probability proportional to
1 / count(its class), so every class is drawn about equally often. The sampler yields draw keys, not positions:
key = position + N x (how often this position was drawn before in the epoch), so the first draw of an image is
its position and each repeat gets its own augmentation (keyed on the key); `Images` reads position = key mod N. The draw is a pure function of (seed, epoch)
(numpy's `SeedSequence([seed, epoch])`): the same on every process, after a resume, with any number of workers.
Accelerate's prepared loader hands the sampler its epoch (`loader.set_epoch(epoch)`), and with several processes
gives process r the batches r, r+W, ... of that one sequence.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from imgcls.data.split import Split
from imgcls.errors import DataError


def split_labels(split: Split) -> np.ndarray:
    """int64 [len(split)]: the class of each position of the split (the dataset's positions)."""
    return np.asarray(split.labels, dtype=np.int64)[np.asarray(split.indices, dtype=np.int64)]


def class_weights(labels: Sequence[int] | np.ndarray, class_names: Sequence[str]) -> torch.Tensor:
    """float32 [classes]: n_samples / (n_classes * count_c), as sklearn's `compute_class_weight("balanced")`.
    A class without a train image has no such weight: that is an error naming it."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(class_names))
    missing = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise DataError(f"train.class_weights = \"balanced\": class(es) {missing} have no image in the train split, "
                        f"so their weight n / (classes x count) is undefined; add train images of them or set "
                        f"train.class_weights = \"none\"")
    return torch.from_numpy(len(labels) / (len(class_names) * counts.astype(np.float64))).float()


def describe_weights(weights: torch.Tensor, class_names: Sequence[str]) -> str:
    """"a 0.556, b 5" : one line for the log."""
    return ", ".join(f"{name} {w:.4g}" for name, w in zip(class_names, weights.tolist()))


class BalancedSampler(Sampler[int]):
    """Positions 0..N-1 of a split drawn N times per epoch with replacement, with probability proportional to
    1 / count(class of the position)."""

    def __init__(self, labels: Sequence[int] | np.ndarray, seed: int):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ValueError("data.sampler = \"balanced\": the train split is empty")
        per_sample = 1.0 / np.bincount(labels)[labels]
        self.p = per_sample / per_sample.sum()
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.p)

    def sequence(self, epoch: int | None = None) -> np.ndarray:
        """int64 [N]: the positions of an epoch (this sampler's epoch by default), in order."""
        epoch = self.epoch if epoch is None else epoch
        entropy = [int(self.seed) % 2**64, int(epoch) % 2**64]  # SeedSequence takes non-negative integers
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        return rng.choice(len(self.p), size=len(self.p), replace=True, p=self.p).astype(np.int64)

    def keys(self, epoch: int | None = None) -> np.ndarray:
        """int64 [N]: `sequence`'s draws as keys, position + N x (earlier draws of that position this epoch)."""
        drawn = self.sequence(epoch)
        order = np.argsort(drawn, kind="stable")
        first = np.searchsorted(drawn[order], drawn[order], side="left")  # where each position's run starts
        repeat = np.empty_like(drawn)
        repeat[order] = np.arange(len(drawn)) - first
        return drawn + len(self.p) * repeat

    def __iter__(self) -> Iterator[int]:
        yield from self.keys().tolist()
