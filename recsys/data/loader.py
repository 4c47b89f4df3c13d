"""The streaming loader: training batches read from the prepared Parquet row groups, never the whole log.

A streamed dataset (``loader: stream`` in its manifest) holds its training rows as Parquet row
groups, listed in ``train/pieces.json`` with their number of fit rows (rows not held out for
validation). One epoch of one rank:

1. The pieces are permuted with ``rng(seed, epoch)`` (the same permutation on every rank).
2. The fit rows of the permuted pieces, laid end to end, are cut into ``world`` contiguous
   ranges of ``M = steps * local_batch`` rows, ``steps = total_fit // global_batch``: every rank
   gets the same number of batches whatever the file and row-group sizes (no rank waits for
   another at the end of an epoch), the shares are disjoint, and the remainder
   (``total_fit - steps * global_batch`` rows, fewer than one global batch) is unused this
   epoch; it is a different set every epoch since the order changes.
3. A rank's range is split among its ``W`` loader workers as contiguous runs of whole batches:
   chunks of ``chunk`` (16) consecutive steps are dealt to the workers in turn (chunk ``c`` to
   worker ``c % W``: the DataLoader's in-order round robin collects them in step order), and each
   worker reads the rows of its own batches.
4. Each worker reads its rows one row group at a time (sliced at its range's boundaries) into a
   shuffle buffer of ``max(shuffle_buffer, local_batch)`` rows; each batch is a random draw of
   positions (``rng(seed, epoch, rank, worker)``) swap-removed from the full buffer, vectorised.
5. The worker appends each step's uniform negatives (``rng(seed, epoch, step)`` draws
   ``num_negatives`` for the whole world, the rank takes its slice, as ``TrainBatches`` does) and
   sends a chunk's (users, items) as numpy arrays (by value through a pipe: far cheaper per batch
   than tensors in shared memory). The training process builds each step's model inputs
   (``Features.batch``: KeyedJaggedTensors) and, on CUDA only, pins them; the train pipeline
   copies them to the device with ``non_blocking=True``. Workers are torch ``DataLoader``
   workers (forked, one set per epoch).

The batch order is reproducible from ``(seed, epoch)`` **for a given world size and number of
workers** (``data.num_workers``; 0 and 1 give the same batches): both change how the rows are
shared out and shuffled. ``skip`` (resume) replays the first ``skip`` steps' shuffle draws
without building them, so the batches yielded are exactly the tail of the full epoch.
Memory per worker: the shuffle buffer plus one row group.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recsys.data.batches import BatchOptions
from recsys.data.features import Batch, Features

logger = logging.getLogger(__name__)

PIECES = "train/pieces.json"
# RNG stream tags (the first two words of every seed are (seed, epoch)): kept distinct so that
# no two streams of one epoch coincide.
_NEGATIVES, _BUFFER = 1, 3


@dataclass(frozen=True)
class Pieces:
    """The training row groups of a streamed dataset, in file order (``train/pieces.json``)."""

    files: Tuple[str, ...]
    """Absolute path of each piece's file."""
    row_groups: np.ndarray
    """Row group index of each piece within its file."""
    rows: np.ndarray
    fit_rows: np.ndarray
    """Rows the model trains on (``valid == False``) in each piece."""
    has_valid: bool
    """Whether the files have a ``valid`` column (rows held out for model selection)."""

    @staticmethod
    def read(data_dir: Path) -> "Pieces":
        data_dir = Path(data_dir)
        listing = json.loads((data_dir / PIECES).read_text())
        if not listing:
            raise ValueError(f"{data_dir / PIECES}: no training row groups")

        def where(name: str) -> str:  # relative to the prepared directory (or to train/)
            path = data_dir / name
            return str(path if path.exists() else data_dir / "train" / name)

        files = tuple(where(p["file"]) for p in listing)
        has_valid = "valid" in pq.read_schema(files[0]).names
        return Pieces(files, np.array([p["row_group"] for p in listing], dtype=np.int64),
                      np.array([p["rows"] for p in listing], dtype=np.int64),
                      np.array([p["fit_rows"] for p in listing], dtype=np.int64), has_valid)

    @property
    def total_fit(self) -> int:
        return int(self.fit_rows.sum())

    def __len__(self) -> int:
        return len(self.files)


def steps_per_epoch(pieces: Pieces, global_batch: int) -> int:
    """Batches per epoch on every rank (the same for any world size dividing the global batch)."""
    return pieces.total_fit // global_batch


@dataclass(frozen=True)
class Segment:
    """Fit rows [start, stop) of piece ``piece`` (an index into ``Pieces``)."""

    piece: int
    start: int
    stop: int


def worker_count(steps: int, num_workers: int, chunk: int, worker: int) -> int:
    """How many of the first `steps` steps of an epoch one worker makes: chunks of `chunk`
    consecutive steps are dealt to the workers in turn (chunk c to worker c % W), the order in
    which the DataLoader collects them. The worker's k-th batch is step ``worker_step(k, ...)``."""
    rounds, rest = divmod(steps, num_workers * chunk)
    return rounds * chunk + min(max(rest - worker * chunk, 0), chunk)


def worker_step(k: int, num_workers: int, chunk: int, worker: int) -> int:
    """The epoch step of a worker's k-th batch (see ``worker_count``)."""
    return (k // chunk) * num_workers * chunk + worker * chunk + k % chunk


def worker_rows(steps: int, num_workers: int, chunk: int, worker: int, local_batch: int) -> Tuple[int, int]:
    """(first, stop) of one worker's rows within its rank's range: a contiguous run of whole
    batches, the workers' runs in worker order."""
    first = sum(worker_count(steps, num_workers, chunk, w) for w in range(worker)) * local_batch
    return first, first + worker_count(steps, num_workers, chunk, worker) * local_batch


def worker_segments(pieces: Pieces, order: np.ndarray, rank: int, local_batch: int, steps: int,
                    run: Tuple[int, int]) -> List[Segment]:
    """The pieces' fit rows read by one worker of one rank, in order, for the piece order ``order``.

    The rank owns fit rows [rank * M, (rank + 1) * M) of the permuted pieces laid end to end
    (M = steps * local_batch); the worker owns rows ``run`` of them (``worker_rows``)."""
    first, last = rank * steps * local_batch + run[0], rank * steps * local_batch + run[1]
    ends = np.cumsum(pieces.fit_rows[order])
    starts = ends - pieces.fit_rows[order]
    out = []
    for j in range(int(np.searchsorted(ends, first, side="right")), len(order)):
        if starts[j] >= last:
            break
        a, b = max(first, int(starts[j])), min(last, int(ends[j]))
        if b > a:
            out.append(Segment(int(order[j]), a - int(starts[j]), b - int(starts[j])))
    return out


def piece_order(num_pieces: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's read order of the pieces (the same on every rank)."""
    return np.random.default_rng([seed, epoch]).permutation(num_pieces)


def step_negatives(seed: int, epoch: int, step: int, num_items: int, num_negatives: int, rank: int,
                   world_size: int, negative_rows: Optional[np.ndarray] = None) -> np.ndarray:
    """This rank's share of the step's uniform negatives (drawn for the whole world) from the rows
    [0, num_items), or from `negative_rows`."""
    n = num_negatives // world_size
    rng = np.random.default_rng([seed, epoch, _NEGATIVES, step])
    if negative_rows is None:
        drawn = rng.integers(0, num_items, size=num_negatives)
    else:
        drawn = negative_rows[rng.integers(0, len(negative_rows), size=num_negatives)]
    return drawn[rank * n : (rank + 1) * n]


class ShuffleBuffer:
    """A bounded shuffle: rows go in as arrays; each batch is a random draw of positions from the
    full buffer, the holes filled by the buffer's last rows (swap-remove), vectorised.

    ``capacity == batch`` with no rng: the rows come out in the order they went in."""

    def __init__(self, capacity: int, batch: int, rng: Optional[np.random.Generator]) -> None:
        self.capacity, self.batch, self.rng = max(capacity, batch), batch, rng
        self.users = np.empty(self.capacity, dtype=np.int64)
        self.items = np.empty(self.capacity, dtype=np.int64)
        self.size = 0

    def put(self, users: np.ndarray, items: np.ndarray) -> int:
        """Copy as many of the rows as fit; returns how many."""
        take = min(len(users), self.capacity - self.size)
        self.users[self.size : self.size + take] = users[:take]
        self.items[self.size : self.size + take] = items[:take]
        self.size += take
        return take

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def draw(self, keep: bool = True) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """Remove one batch of rows (the buffer holds at least one); returns them when ``keep``."""
        n, b = self.size, self.batch
        if self.rng is None or n == b:
            pos = np.arange(b) if self.rng is None else self.rng.permutation(b)
        else:
            pos = self.rng.choice(n, size=b, replace=False)
        out = (self.users[pos], self.items[pos]) if keep else None  # fancy indexing copies
        tail = n - b
        in_tail = np.zeros(b, dtype=bool)
        in_tail[pos[pos >= tail] - tail] = True
        holes = pos[pos < tail]
        src = tail + np.flatnonzero(~in_tail)
        self.users[holes] = self.users[src]
        self.items[holes] = self.items[src]
        self.size = tail
        return out


class _EpochStream(IterableDataset):
    """One rank's batches of one epoch, the share of the worker running it (see the module doc).

    Yields chunks ``(first step, users [k, local_batch], items [k, local_batch + negatives])``
    of consecutive steps as numpy arrays: sent by value through the worker's pipe, which costs
    far less per batch than a tensor in shared memory."""

    def __init__(self, pieces: Pieces, num_items: int, local_batch: int, num_negatives: int, rank: int,
                 world_size: int, seed: int, epoch: int, num_workers: int, shuffle_buffer: int, skip: int,
                 stop: int, steps: int, chunk: int, negative_rows: Optional[np.ndarray] = None) -> None:
        super().__init__()
        self.negative_rows = negative_rows
        self.pieces, self.num_items, self.local_batch = pieces, num_items, local_batch
        self.num_negatives, self.rank, self.world_size = num_negatives, rank, world_size
        self.seed, self.epoch, self.num_workers, self.shuffle_buffer = seed, epoch, num_workers, shuffle_buffer
        self.skip, self.stop, self.steps, self.chunk = skip, stop, steps, chunk

    def logical_worker(self) -> int:
        """The DataLoader asks worker 0 first: it plays the worker that owns step ``skip``."""
        info = get_worker_info()
        return ((info.id if info is not None else 0) + self.skip // self.chunk) % self.num_workers

    def __iter__(self) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        w, W, b, chunk = self.logical_worker(), self.num_workers, self.local_batch, self.chunk
        segments = worker_segments(self.pieces, piece_order(len(self.pieces), self.seed, self.epoch), self.rank, b,
                                   self.steps, worker_rows(self.steps, W, chunk, w, b))
        rng = np.random.default_rng([self.seed, self.epoch, _BUFFER, self.rank, w]) if self.shuffle_buffer else None
        buffer = ShuffleBuffer(self.shuffle_buffer, b, rng)
        wanted = worker_count(self.stop, W, chunk, w)  # the worker's batches before step `stop`
        out_users, out_items, out_steps = [], [], []
        k = 0  # batches drawn so far

        def draw() -> None:
            nonlocal k
            step = worker_step(k, W, chunk, w)
            rows = buffer.draw(keep=step >= self.skip)  # before skip: the draw is replayed, nothing built
            k += 1
            if rows is not None:
                negatives = step_negatives(self.seed, self.epoch, step, self.num_items, self.num_negatives,
                                           self.rank, self.world_size, self.negative_rows)
                out_steps.append(step)
                out_users.append(rows[0])
                out_items.append(np.concatenate([rows[1], negatives]))

        def flush() -> Optional[Tuple[int, np.ndarray, np.ndarray]]:
            """The steps built so far, once they end one of the worker's chunks (or its last step)."""
            if out_steps and (k == wanted or k % chunk == 0):
                done = (out_steps[0], np.stack(out_users), np.stack(out_items))
                out_users.clear(), out_items.clear(), out_steps.clear()
                return done
            return None

        reader = _RowGroupReader(self.pieces)
        for seg in segments:
            if k >= wanted:
                break
            users, items = reader.fit_rows(seg)
            pos = 0
            while pos < len(users) and k < wanted:
                pos += buffer.put(users[pos:], items[pos:])
                if buffer.full:
                    draw()
                    done = flush()
                    if done is not None:
                        yield done
        while k < wanted:
            draw()
            done = flush()
            if done is not None:
                yield done


class _RowGroupReader:
    """Reads one piece's fit rows (``user``, ``item`` as int64 numpy), keeping the last file open."""

    def __init__(self, pieces: Pieces) -> None:
        self.pieces = pieces
        self.path: Optional[str] = None
        self.file: Optional[pq.ParquetFile] = None

    def fit_rows(self, seg: Segment) -> Tuple[np.ndarray, np.ndarray]:
        path = self.pieces.files[seg.piece]
        if path != self.path:
            self.file, self.path = pq.ParquetFile(path, memory_map=False), path
        columns = ["user", "item", "valid"] if self.pieces.has_valid else ["user", "item"]
        table = self.file.read_row_group(int(self.pieces.row_groups[seg.piece]), columns=columns)
        users = table["user"].to_numpy()
        items = table["item"].to_numpy()
        if self.pieces.has_valid:
            fit = ~table["valid"].to_numpy(zero_copy_only=False)
            users, items = users[fit], items[fit]
        expected = int(self.pieces.fit_rows[seg.piece])
        if len(users) != expected:
            raise ValueError(f"{path}: row group {self.pieces.row_groups[seg.piece]} has {len(users)} fit rows, "
                             f"{PIECES} says {expected} (the prepared dataset changed?)")
        return users[seg.start : seg.stop], items[seg.start : seg.stop]


# Workers are forked on Linux (started in milliseconds; they only read Parquet and use numpy), even
# in a process that was itself spawned (where the inherited default would start a fresh interpreter
# importing torch and torchrec for every worker of every epoch: seconds each).
_WORKER_START = "fork" if sys.platform.startswith("linux") else None


def _identity(chunk):
    return chunk


class StreamBatches:
    """Shuffled training batches of one epoch for one rank, streamed from a prepared dataset.

    Yields ``len(self)`` batches: steps [skip, min(steps, max_batches)) of the epoch, where
    ``steps = total_fit // global_batch`` is the same on every rank. ``unused`` counts the fit
    rows no rank reads this epoch (fewer than one global batch). Workers send ``chunk``
    consecutive steps at a time; this process builds each step's ``Batch`` (``features``) and,
    with ``pin_memory`` (CUDA only), pins it for the pipeline's non-blocking copy."""

    def __init__(self, pieces: Pieces, num_items: int, options: BatchOptions, epoch: int, skip: int = 0,
                 max_batches: Optional[int] = None, features: Optional[Features] = None, chunk: int = 16) -> None:
        o = options
        self.steps = steps_per_epoch(pieces, o.global_batch)
        self.unused = pieces.total_fit - self.steps * o.global_batch
        stop = self.steps if max_batches is None else min(self.steps, max_batches)
        self.skip = min(skip, stop)
        self.num_batches = stop - self.skip
        self.num_workers, self.pin_memory = o.num_workers, o.pin_memory
        self.features = features or Features()
        self.dataset = _EpochStream(pieces, num_items, o.local_batch, o.num_negatives, o.rank, o.world_size, o.seed,
                                    epoch, max(o.num_workers, 1), o.shuffle_buffer, self.skip, stop, self.steps, chunk,
                                    o.negative_rows)

    def __len__(self) -> int:
        return self.num_batches

    def chunks(self) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """The workers' output in step order: (first step, users [k, B], items [k, B + negatives])."""
        if self.num_batches == 0:
            return iter(())
        if self.num_workers == 0:
            return iter(self.dataset)
        return iter(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                               persistent_workers=False, prefetch_factor=4, in_order=True,
                               multiprocessing_context=_WORKER_START))

    def __iter__(self) -> Iterator[Batch]:
        return self._batches(self.chunks())  # the workers start here, in the calling thread

    def _batches(self, chunks: Iterator[Tuple[int, np.ndarray, np.ndarray]]) -> Iterator[Batch]:
        expected = self.skip
        for first, users, items in chunks:
            if first != expected:  # the interleave must give the steps in order
                raise RuntimeError(f"loader: got step {first}, expected step {expected}")
            expected += len(users)
            for u, i in zip(users, items):
                batch = self.features.batch(u, i)
                yield batch.pin_memory() if self.pin_memory else batch
