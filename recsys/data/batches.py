"""Training batches of the in-memory loader, and the options every loader takes.

``BatchOptions`` says how an epoch is cut into batches on this rank (the same for both loaders:
``TrainBatches`` here, ``recsys.data.loader.StreamBatches`` for streamed datasets).
``built_ahead`` builds any loader's batches ahead of the step in a background thread.
``TrainBatches``: all ranks draw the same seeded permutation of the interactions (and the same
uniform negatives) and each takes its slice of every global batch, so the step-t global batch
does not depend on the world size.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

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
    negative_rows: Optional[np.ndarray] = None
    """The item rows uniform negatives are drawn from (``DataSource.negative_rows``: those with
    training interactions, when some rows have none); None: every row."""

    def draw_negatives(self, rng: np.random.Generator, num_items: int, size: int) -> np.ndarray:
        """`size` uniform negatives: rows of [0, num_items), or of `negative_rows`."""
        if self.negative_rows is None:
            return rng.integers(0, num_items, size=size)
        return self.negative_rows[rng.integers(0, len(self.negative_rows), size=size)]

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
            negatives = o.draw_negatives(neg_rng, self.num_items, n * o.world_size)[o.rank * n : (o.rank + 1) * n]
            batch = self.features.batch(self.users[idx], np.concatenate([self.items[idx], negatives]), bag_rng)
            yield batch.pin_memory() if o.pin_memory else batch


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def built_ahead(batches: Iterable[Batch], depth: int, device: Optional[torch.device] = None) -> Iterator[Batch]:
    """The batches of `batches`, built up to `depth` ahead in a background thread (0: in this one).

    Batch building is numpy and KJT construction (and pinning, on CUDA): done in the training
    thread it delays every step by that much; done here it overlaps the step, which waits on the
    GPU with the GIL released. A thread, not loader processes: batches (KJTs, pinned tensors) stay
    in this process, and the streaming loader's reading already runs in worker processes.
    ``iter(batches)`` is called here, in the calling thread (the streaming loader starts its worker
    processes there). An error in the thread is raised here; closing this generator early stops it.
    `device`: the thread's CUDA device (pinned memory is allocated in the current device's context)."""
    source = iter(batches)
    if depth <= 0:
        yield from source
        return
    ready: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            for batch in source:
                if not put(batch):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - raised again in the consuming thread
            put(_Failed(e))

    thread = threading.Thread(target=produce, name="recsys-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)  # it sees `stop` within 50 ms unless its source is stuck (a daemon then)
