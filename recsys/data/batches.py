"""Training batches of the in-memory loader, and the options every loader takes.

``BatchOptions`` says how an epoch is cut into batches on this rank (the same for both loaders:
``TrainBatches`` here, ``recsys.data.loader.StreamBatches`` for streamed datasets).
``TrainBatches``: all ranks draw the same seeded permutation of the interactions (and the same
uniform negatives) and each takes its slice of every global batch, so the step-t global batch
does not depend on the world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from recsys.data.features import Batch, Features


@dataclass(frozen=True)
class BatchOptions:
    """How one rank cuts an epoch into batches. The world size divides `global_batch` and
    `num_negatives` (``recsys.config.check_world_size`` refuses other configurations)."""

    global_batch: int
    """Interactions per step over all ranks (``train.batch_size``)."""
    num_negatives: int
    """Uniform negatives per step over all ranks (``loss.num_negatives``)."""
    seed: int
    """The run's seed: the epoch's order and negatives are drawn from (seed, epoch)."""
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    """Streamed datasets: loader worker processes (``data.num_workers``; 0: read in this process)."""
    shuffle_buffer: int = 1_000_000
    """Streamed datasets: rows of each worker's shuffle buffer (``data.shuffle_buffer``)."""
    pin_memory: bool = False
    """Pin each batch for the pipeline's non-blocking copy (CUDA only)."""

    def __post_init__(self) -> None:  # a programming error: the run's config is refused earlier
        if self.global_batch % self.world_size or self.num_negatives % self.world_size:
            raise ValueError(f"BatchOptions: {self.world_size} ranks do not divide the batch ({self.global_batch}) "
                             f"and the negatives ({self.num_negatives}) evenly")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def local_negatives(self) -> int:
        return self.num_negatives // self.world_size


class TrainBatches:
    """Shuffled training batches of one epoch for one rank.

    All ranks draw the same seeded permutation of the interactions (and the same uniform
    negatives) and each takes its slice of every global batch, so every rank yields the same
    number of batches and the step-t global batch does not depend on the world size. The last
    ``num_interactions % global_batch`` interactions of each epoch's permutation (a different set
    every epoch) are not used.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, num_items: int, options: BatchOptions, epoch: int,
                 max_batches: Optional[int] = None, features: Optional[Features] = None) -> None:
        self.users, self.items, self.num_items = users, items, num_items
        self.options, self.epoch = options, epoch
        self.features = features or Features()
        n = len(users) // options.global_batch
        self.num_batches = n if max_batches is None else min(n, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        o = self.options
        perm = np.random.default_rng([o.seed, self.epoch]).permutation(len(self.users))
        neg_rng = np.random.default_rng([o.seed, self.epoch, 1])
        bag_rng = np.random.default_rng([o.seed, self.epoch, 2, o.rank])
        b, n = o.local_batch, o.local_negatives
        for step in range(self.num_batches):
            start = step * o.global_batch + o.rank * b
            idx = perm[start : start + b]
            negatives = neg_rng.integers(0, self.num_items, size=n * o.world_size)[o.rank * n : (o.rank + 1) * n]
            batch = self.features.batch(self.users[idx], np.concatenate([self.items[idx], negatives]), bag_rng)
            yield batch.pin_memory() if o.pin_memory else batch
