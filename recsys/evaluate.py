"""Evaluation: exact full-corpus Recall@K and NDCG@K with each user's training items masked.

Users with test items (a seeded sample of at most ``eval.max_users`` of them) are split across
ranks; each rank scores its users against every item in blocks of users x items bounded by
``eval.score_budget_mb``, masks the users' training items, keeps a running exact top max(K) over
the item blocks and sums the per-user metrics; the sums are all-reduced. Recall@K = hits in the
top K / number of the user's test items; NDCG@K uses binary relevance and the ideal DCG over
min(K, test items) (the LightGCN protocol). Equal scores rank the lower item row first (a total
order, so the metrics do not depend on the block sizes). The popularity baseline goes through the
same code with item score = train count.

The top K of a block is found without sorting the block: the maximum of each group of items is
taken (one vectorised pass), the top groups are found the same way one level up, and only the
items of the groups that can hold a top-K item are ranked (see `_block_top_keys`).

What is masked and what is relevant are `ItemSets`: a CSR over all user rows for in-memory data
(`CSRSets`), or, for streamed data, the sets of the evaluated users only, read in one pass over
the prepared Parquet files (`load_eval_sets`; `load_split_sets` for the test and validation sets
at once) and kept as a CSR of unique pairs or a packed bitmap, whichever is smaller.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from recsys.config import EvalConfig
from recsys.data import CSR, Features, gather_rows_csr
from recsys.loss import rank_and_world

logger = logging.getLogger(__name__)

EVAL_SAMPLE_SEED = 0
"""Seed of the sample of evaluated users (``eval.max_users``): fixed, so that runs with different
training seeds or configurations are evaluated on the same users."""


# ---------------------------------------------------------------------------------------------
# The evaluated users
# ---------------------------------------------------------------------------------------------


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique of an integer array by a sort (numpy 2.4's np.unique is ~50x slower on 1M int64)."""
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def sample_eval_users(users: np.ndarray, max_users: int, seed: int = EVAL_SAMPLE_SEED) -> np.ndarray:
    """The evaluated users: all of `users` (the user rows that have test items) when there are at
    most `max_users` of them or `max_users` is 0, else a uniform sample of `max_users` of them
    without replacement drawn with `seed`. Sorted; the same on every rank and every run."""
    users = _sorted_unique(np.asarray(users, dtype=np.int64))
    if max_users <= 0 or len(users) <= max_users:
        return users
    return np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))


def eval_users(test_counts: np.ndarray, max_users: int, seed: int = EVAL_SAMPLE_SEED) -> np.ndarray:
    """`sample_eval_users` of the rows whose test count (``test_counts[row]``, e.g. a prepared
    streaming dataset's ``test_user_counts.npy``) is positive."""
    return sample_eval_users(np.flatnonzero(np.asarray(test_counts) > 0), max_users, seed)


def rank_bounds(n: int, world: int) -> np.ndarray:
    """Contiguous near-equal shares of range(n): rank r owns [bounds[r], bounds[r + 1])."""
    return np.linspace(0, n, world + 1).round().astype(int)


def local_share(users: np.ndarray) -> Tuple[np.ndarray, int]:
    """This rank's share of the evaluated `users`, and the largest share of any rank."""
    rank, world = rank_and_world()
    bounds = rank_bounds(len(users), world)
    return users[bounds[rank] : bounds[rank + 1]], int(np.diff(bounds).max())


# ---------------------------------------------------------------------------------------------
# Item sets: what is masked (training items) and what is relevant (test items)
# ---------------------------------------------------------------------------------------------


class CSRSets:
    """Per-user item sets as a CSR: row ``i`` of `csr` holds the items of user row ``users[i]``
    (`users` sorted; None: row i is user row i, e.g. ``Dataset.test_csr()``). Items are kept as
    given (a repeated pair counts twice in `counts`, as in the in-memory data)."""

    def __init__(self, csr: CSR, num_items: int, users: Optional[np.ndarray] = None) -> None:
        self.csr = csr
        self.num_items = num_items
        self.users = users

    def _slots(self, users: np.ndarray) -> np.ndarray:
        if self.users is None:
            return users
        return _slots_of(self.users, users)

    def counts(self, users: np.ndarray) -> np.ndarray:
        """Items per user (0 for a user without items)."""
        slots = self._slots(users)
        return (self.csr.indptr[slots + 1] - self.csr.indptr[slots]).astype(np.int64)

    def users_with_items(self) -> np.ndarray:
        """The user rows with at least one item, sorted."""
        rows = np.flatnonzero(self.csr.counts() > 0)
        return rows if self.users is None else self.users[rows]

    def pairs(self, users: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(position in `users`, item) of the users' items, items ascending per user (as stored)."""
        lengths, items = gather_rows_csr(self.csr, self._slots(users))
        return np.repeat(np.arange(len(users)), lengths), items.astype(np.int64, copy=False)

    def nbytes(self) -> int:
        return int(self.csr.indptr.nbytes + self.csr.indices.nbytes)


class BitmapSets:
    """Per-user item sets as a packed bitmap: bit ``item`` (little-endian within each byte) of row
    ``i`` of `bits` (``len(users) x ceil(num_items / 8)`` bytes) is set when user row
    ``users[i]`` has the item. Used for dense sets, where it is smaller than a CSR."""

    def __init__(self, bits: np.ndarray, num_items: int, users: np.ndarray) -> None:
        self.bits = bits
        self.num_items = num_items
        self.users = users
        self._counts = np.bitwise_count(bits).sum(axis=1, dtype=np.int64) if len(bits) else np.zeros(0, np.int64)

    def counts(self, users: np.ndarray) -> np.ndarray:
        return self._counts[_slots_of(self.users, users)]

    def users_with_items(self) -> np.ndarray:
        return self.users[self._counts > 0]

    def dense(self, users: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Boolean ``len(users) x (stop - start)``: which of items start..stop-1 each user has."""
        rows = self.bits[_slots_of(self.users, users), start // 8 : -(-stop // 8)]
        unpacked = np.unpackbits(rows, axis=1, bitorder="little")
        offset = start % 8
        return unpacked[:, offset : offset + stop - start].view(bool)

    def pairs(self, users: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        pos, items = np.nonzero(self.dense(users, 0, self.num_items))
        return pos, items.astype(np.int64)

    def nbytes(self) -> int:
        return int(self.bits.nbytes)


ItemSets = Union[CSRSets, BitmapSets]
"""The interface `ranking_metric_sums` uses: ``counts(users)``, ``pairs(users)``,
``users_with_items()`` (plus ``dense`` for bitmaps, to mask without listing pairs)."""


def _slots_of(covered: np.ndarray, users: np.ndarray) -> np.ndarray:
    slots = np.searchsorted(covered, users)
    if len(users) and (slots.max() >= len(covered) or not np.array_equal(covered[slots], users)):
        missing = users[(slots >= len(covered)) | (covered[np.minimum(slots, len(covered) - 1)] != users)]
        raise ValueError(f"item sets: {len(missing)} user rows are not covered by these sets (the first: "
                         f"{int(missing[0])}); build them for the evaluated users")
    return slots


def as_item_sets(sets: Union[CSR, CSRSets, BitmapSets], num_items: int) -> ItemSets:
    """A CSR over all user rows (the in-memory data) as item sets; item sets unchanged."""
    return CSRSets(sets, num_items) if isinstance(sets, CSR) else sets


class _SetBuilder:
    """Unique (slot, item) pairs of some users, collected batch by batch in memory bounded by the
    final sets: a sorted array of unique keys (slot * num_items + item) merged with the pending
    ones whenever they outnumber it, switched to a packed bitmap as soon as the CSR it would
    make is larger than the bitmap (then each pair just sets its bit)."""

    def __init__(self, users: np.ndarray, num_items: int) -> None:
        self.users, self.num_items = users, num_items
        self.row_bytes = -(-num_items // 8)
        self.bitmap_bytes = len(users) * self.row_bytes
        self.unique = np.zeros(0, dtype=np.int64)
        self.pending: List[np.ndarray] = []
        self.num_pending = 0
        self.bits: Optional[np.ndarray] = None
        self.rows = 0

    def _csr_bytes(self, pairs: int) -> int:
        return pairs * (4 if self.num_items < 2**31 else 8) + 8 * (len(self.users) + 1)

    def add(self, slots: np.ndarray, items: np.ndarray) -> None:
        self.rows += len(slots)
        if self.bits is not None:
            np.bitwise_or.at(self.bits.reshape(-1), slots * self.row_bytes + (items >> 3),
                             np.left_shift(1, items & 7).astype(np.uint8))
            return
        self.pending.append(slots * self.num_items + items)
        self.num_pending += len(slots)
        if self.num_pending > max(len(self.unique), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        self.unique = _sorted_unique(np.concatenate([self.unique, *self.pending]))
        self.pending, self.num_pending = [], 0
        if self._csr_bytes(len(self.unique)) > self.bitmap_bytes:
            keys, self.unique = self.unique, np.zeros(0, dtype=np.int64)
            self.bits = np.zeros((len(self.users), self.row_bytes), dtype=np.uint8)
            slots, items = np.divmod(keys, self.num_items)
            np.bitwise_or.at(self.bits.reshape(-1), slots * self.row_bytes + (items >> 3),
                             np.left_shift(1, items & 7).astype(np.uint8))

    def finish(self) -> ItemSets:
        if self.bits is None:
            self._merge()
        if self.bits is not None:
            return BitmapSets(self.bits, self.num_items, self.users)
        slots, items = np.divmod(self.unique, self.num_items)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(slots, minlength=len(self.users)))]).astype(np.int64)
        dtype = np.int32 if self.num_items < 2**31 else np.int64
        return CSRSets(CSR(indptr, items.astype(dtype)), self.num_items, self.users)


def load_eval_sets(prepared_dir, users: np.ndarray, split: str = "test",
                   progress: Optional[bool] = None) -> Tuple[ItemSets, ItemSets]:
    """(masked, relevant) item sets of `users` from a streaming prepared dataset, for
    `ranking_metric_sums`: ``split="test"``: every training row (``train/``, validation rows
    included) and the ``test/`` rows; ``split="valid"``: the training rows not held out for
    validation and the held-out ones (``valid`` column of ``train/``). ``load_split_sets`` of
    one split."""
    return load_split_sets(prepared_dir, {split: users}, progress)[split]


def load_split_sets(prepared_dir, users: Dict[str, np.ndarray],
                    progress: Optional[bool] = None) -> Dict[str, Tuple[ItemSets, ItemSets]]:
    """``load_eval_sets`` of several splits at once: `users` maps ``test`` and / or ``valid`` to
    their evaluated users; each split gets its (masked, relevant) item sets.

    Reads each Parquet row group once (one pass over ``train/`` for all the splits, one over
    ``test/`` for the test split), keeps the rows of each split's users (a boolean lookup by user
    row) and removes repeated pairs. Each set is a CSR of unique pairs or a packed bitmap,
    whichever is smaller: memory is bounded by the users' distinct pairs (and by users x items
    bits), not by the number of interactions. Under torchrun, pass this rank's `local_share` of
    the evaluated users. A progress bar per pass unless `progress` is False (None: on a terminal)."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from recsys.readers import DataError

    root = Path(prepared_dir)
    if not (root / "manifest.json").is_file():
        raise DataError(f"{root}: no manifest.json (not a complete prepared dataset)")
    manifest = json.loads((root / "manifest.json").read_text())
    num_users, num_items = int(manifest["counts"]["num_users"]), int(manifest["counts"]["num_items"])
    splits = {}  # split -> (its users, sorted; which user rows are wanted; mask builder; relevant builder)
    for split, wanted_users in users.items():
        if split not in ("test", "valid"):
            raise ValueError(f"load_eval_sets: split must be test or valid, got {split!r}")
        wanted_users = _sorted_unique(np.asarray(wanted_users, dtype=np.int64))
        if len(wanted_users) and (wanted_users[0] < 0 or wanted_users[-1] >= num_users):
            raise ValueError(f"load_eval_sets: user rows must be in [0, {num_users}), got "
                             f"{wanted_users[0]}..{wanted_users[-1]}")
        wanted = np.zeros(num_users, dtype=bool)
        wanted[wanted_users] = True
        splits[split] = (wanted_users, wanted, _SetBuilder(wanted_users, num_items),
                         _SetBuilder(wanted_users, num_items))
    sources = [("train", ["user", "item"] + (["valid"] if "valid" in splits else []))]
    if "test" in splits:
        sources.append(("test", ["user", "item"]))
    for part, columns in sources:
        files = sorted((root / part).glob("*.parquet"))
        if not files:
            raise DataError(f"{root / part}: no Parquet files (is {root} a streaming prepared dataset?)")
        meta = [pq.ParquetFile(f) for f in files]
        with tqdm(total=sum(m.metadata.num_rows for m in meta), unit=" rows", unit_scale=True,
                  desc=f"eval sets: {part}", disable=None if progress is None else not progress) as bar:
            for path, pf in zip(files, meta):
                missing = [c for c in columns if c not in pf.schema_arrow.names]
                if missing:
                    raise DataError(f"{path}: column {missing[0]!r} is missing (has {pf.schema_arrow.names})")
                for group in range(pf.num_row_groups):
                    table = pf.read_row_group(group, columns=columns)
                    u = table["user"].to_numpy().astype(np.int64, copy=False)
                    i = table["item"].to_numpy().astype(np.int64, copy=False)
                    for name, values, limit in (("user", u, num_users), ("item", i, num_items)):
                        if len(values) and (values.min() < 0 or values.max() >= limit):
                            raise DataError(f"{path}, row group {group}: column {name!r} has rows outside "
                                            f"[0, {limit}) (manifest counts)")
                    for split, (wanted_users, wanted, mask, relevant) in splits.items():
                        if part == "test" and split != "test":
                            continue
                        keep = wanted[u]
                        slots = np.searchsorted(wanted_users, u[keep])
                        if part == "test":
                            relevant.add(slots, i[keep])
                        elif split == "valid":
                            held = table["valid"].to_numpy(zero_copy_only=False)[keep]
                            mask.add(slots[~held], i[keep][~held])
                            relevant.add(slots[held], i[keep][held])
                        else:
                            mask.add(slots, i[keep])
                    bar.update(len(u))
    out = {}
    for split, (wanted_users, _, mask, relevant) in splits.items():
        out[split] = mask.finish(), relevant.finish()
        for name, builder, sets in (("masked", mask, out[split][0]), ("relevant", relevant, out[split][1])):
            logger.info("eval sets (%s, %d users): %s: %d rows of these users, %d unique pairs, kept as %s (%.1f MB)",
                        split, len(wanted_users), name, builder.rows, int(sets.counts(wanted_users).sum()),
                        type(sets).__name__, sets.nbytes() / 2**20)
    return out


# ---------------------------------------------------------------------------------------------
# Exact top K of a score block
# ---------------------------------------------------------------------------------------------

_LOW = 0xFFFFFFFF
_DIRECT = 16
"""A level of group maxima is added while more than _DIRECT x K values remain to be ranked."""
_GROUP = 8
"""Items per group at each level."""
_FAST_BLOCK_BYTES = 32 << 20
"""Score blocks are kept near this size (when the budget and user_chunk allow): larger ones fall
out of the CPU cache and are slower (measured on Gowalla-size data, benchmarks/eval.py)."""


def _keys(values: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (score descending, item ascending): the float32 score's bits made
    monotone in the high 32 bits, the complement of the item in the low ones (-0.0 is 0.0)."""
    bits = (values + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (_LOW - items)


def _items_of(keys: torch.Tensor) -> torch.Tensor:
    return _LOW - (keys & _LOW)


def _plan(width: int, k: int) -> Tuple[List[int], int]:
    """Group sizes per level for a block of `width` items, and the padded width (a multiple of
    their product, so that every level divides exactly)."""
    groups, n = [], width
    while n > _DIRECT * k:
        groups.append(_GROUP)
        n = -(-n // _GROUP)
    return groups, n * math.prod(groups)


def _superset(vals: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of `vals` (``c x m`` indices, m >= k) that hold, in every row, each value >= the
    row's k-th largest (ties at the boundary are all kept; m = k when there are none)."""
    top = torch.topk(vals, k, dim=1, sorted=False)
    m = int((vals >= top.values.amin(1, keepdim=True)).sum(1).max())
    return top.indices if m == k else torch.topk(vals, m, dim=1, sorted=False).indices


def _block_top_keys(scores_t: torch.Tensor, width: int, start: int, groups: List[int], k: int) -> torch.Tensor:
    """Sorted keys (`_keys`) of the exact top min(k, width) items of a block.

    `scores_t` is the block transposed (``padded width x users``; rows from `width` on are
    padding at -inf, never selected as they rank after every real item); its items are start,
    start + 1, ... Level l + 1 holds the maxima of groups of level l (group j: rows j, j + L,
    j + 2L, ...; one vectorised pass over contiguous slabs). From the top level down, only the
    groups whose maximum is >= the k-th largest maximum are kept: the k-th largest maximum is <=
    the k-th largest score, so every item ranked in the top k is in a kept group, whatever the
    ties (the k top groups hold k distinct items at least that large). When ties keep more than
    a quarter of a level (e.g. users with fewer than k unmasked items: their -inf scores tie),
    the block is ranked whole instead, a few users at a time (`_direct_top_keys`)."""
    n, c = scores_t.shape
    device = scores_t.device
    if not groups:
        return _direct_top_keys(scores_t, width, start, k)
    levels = [scores_t]
    for g in groups:
        levels.append(levels[-1].view(g, levels[-1].shape[0] // g, c).amax(0))
    columns = torch.arange(c, device=device)[:, None]
    idx = _superset(levels[-1].T.contiguous(), k)
    for level in range(len(groups) - 1, -1, -1):
        g = groups[level]
        rows = levels[level].shape[0] // g
        if idx.shape[1] * 4 > rows:
            return _direct_top_keys(scores_t, width, start, k)
        members = (idx[:, :, None] + rows * torch.arange(g, device=device)).view(c, -1)
        vals = levels[level].view(-1).take(members * c + columns)
        sel = _superset(vals, k)
        idx = members.gather(1, sel)
    keys = _keys(vals.gather(1, sel), idx + start)
    return torch.topk(keys, min(k, width), dim=1).values


def _direct_top_keys(scores_t: torch.Tensor, width: int, start: int, k: int) -> torch.Tensor:
    """`_block_top_keys` by ranking every item's key, for groups of users whose int64 keys take
    at most half the block's memory."""
    n, c = scores_t.shape
    items = torch.arange(start, start + n, device=scores_t.device)
    step = max(1, c // 4)
    return torch.cat([torch.topk(_keys(scores_t[:, first : first + step].T, items.expand(min(step, c - first), n)),
                             min(k, width), dim=1).values for first in range(0, c, step)])


def _mask(scores_t: torch.Tensor, sets: ItemSets, users: np.ndarray, pairs, start: int, width: int) -> None:
    """Set the scores of the users' items in [start, start + width) to -inf (in place)."""
    c = scores_t.shape[1]
    if isinstance(sets, BitmapSets):
        dense = torch.from_numpy(sets.dense(users, start, start + width)).to(scores_t.device)
        scores_t[:width].masked_fill_(dense.T, float("-inf"))
        return
    pos, items = pairs
    if start > 0 or width < sets.num_items:
        inside = (items >= start) & (items < start + width)
        pos, items = pos[inside], items[inside]
    flat = torch.from_numpy((items - start) * c + pos).to(scores_t.device)
    scores_t.view(-1).index_fill_(0, flat, float("-inf"))


def _relevant(sets: ItemSets, users: np.ndarray, top: torch.Tensor) -> torch.Tensor:
    """float64 ``c x K``: 1 where ``top[i, j]`` is one of user ``users[i]``'s items."""
    c, kmax = top.shape
    device = top.device
    if isinstance(sets, BitmapSets):
        bits = torch.from_numpy(sets.bits[_slots_of(sets.users, users)]).to(device)
        byte = bits.gather(1, top >> 3).to(torch.int64)
        return ((byte >> (top & 7)) & 1).double()
    pos, items = sets.pairs(users)
    keys = torch.from_numpy(np.sort(pos * sets.num_items + items)).to(device)
    if len(keys) == 0:
        return torch.zeros(c, kmax, dtype=torch.float64, device=device)
    query = torch.arange(c, device=device)[:, None] * sets.num_items + top
    found = torch.searchsorted(keys, query).clamp_(max=len(keys) - 1)
    return (keys[found] == query).double()


def block_shape(num_items: int, user_chunk: int, item_chunk: int = 0, score_budget_mb: int = 256,
                cache_bytes: Optional[int] = _FAST_BLOCK_BYTES) -> Tuple[int, int]:
    """(users, items) per score block: items = `item_chunk`, or (0) all of them when a block of
    min(user_chunk, 64) users x all items fits in the budget, else as many as fit beside that many
    users; users = at most `user_chunk`, as many as fit in the budget, and (on CPU) no more than a
    block of about `cache_bytes` needs (but at least 64), rounded down to a multiple of 64."""
    budget = score_budget_mb << 20
    min_rows = min(user_chunk, 64)
    if item_chunk > 0:
        width = min(item_chunk, num_items)
    elif min_rows * num_items * 4 <= budget:
        width = num_items
    else:
        width = max(1, budget // (4 * min_rows))
    width = min(width, num_items)
    rows = max(1, min(user_chunk, budget // (4 * width)))
    if cache_bytes is not None:
        rows = max(1, min(rows, max(64, cache_bytes // (4 * width))))
    return (rows // 64 * 64 if rows > 64 else rows), width  # whole SIMD/GEMM tiles: measurably faster


def _num_workers(device: torch.device, num_blocks: int) -> int:
    """Threads scoring blocks side by side: on CPU, one per intra-op thread (each running its ops
    single-threaded: no per-op barriers, which stall when the cores are shared); on GPU one."""
    return max(1, min(torch.get_num_threads(), num_blocks)) if device.type == "cpu" else 1


@torch.no_grad()
def ranking_metric_sums(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    users: np.ndarray,
    train: Union[CSR, ItemSets],
    test: Union[CSR, ItemSets],
    ks: Sequence[int],
    user_chunk: int = 1024,
    item_chunk: int = 0,
    score_budget_mb: int = 256,
) -> Dict[str, float]:
    """Sums over `users` of recall@K and ndcg@K, and their count (key ``users``).

    `user_vecs[i]` is the vector of user row `users[i]`; `item_vecs` holds every item. `train`
    (masked) and `test` (relevant) are CSRs over all user rows or `ItemSets` covering `users`.
    Scores are computed in float32 blocks of `block_shape` users x items, the budget shared by
    the worker threads (`_num_workers`). The per-user metrics are summed in user order at the
    end: the sums do not depend on the block sizes or on the number of threads."""
    num_items = item_vecs.shape[0]
    kmax = max(ks)
    if kmax > num_items:
        raise ValueError(f"eval.ks: K={kmax} is larger than the number of items ({num_items})")
    train, test = as_item_sets(train, num_items), as_item_sets(test, num_items)
    users = np.asarray(users, dtype=np.int64)
    n_test_all = test.counts(users)
    if (n_test_all == 0).any():
        raise ValueError("ranking_metric_sums: every evaluated user needs at least one test item")
    device = item_vecs.device
    item_vecs = item_vecs.float()
    workers = _num_workers(device, -(-len(users) // min(user_chunk, max(len(users), 1))))
    rows, width = block_shape(num_items, user_chunk, item_chunk, max(1, score_budget_mb // workers),
                              _FAST_BLOCK_BYTES if device.type == "cpu" else None)
    plans = {w: _plan(w, kmax) for w in {width, num_items - (num_items - 1) // width * width}}
    buffer_size = max(p for _, p in plans.values()) * min(rows, max(len(users), 1))
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, device=device, dtype=torch.float64))
    ideal = torch.cumsum(discount, 0)
    per_user = np.zeros((len(users), 2 * len(ks)))  # recall@k for each k, then ndcg@k

    def score_block(first: int, buffer: torch.Tensor) -> None:
        chunk = users[first : first + rows]
        c = len(chunk)
        vecs = user_vecs[first : first + c].to(device).float()
        pairs = train.pairs(chunk) if isinstance(train, CSRSets) else None
        best = None  # running top K over the item blocks (keys: score, then item)
        for start in range(0, num_items, width):
            w = min(width, num_items - start)
            groups, padded = plans[w]
            scores_t = buffer[: padded * c].view(padded, c)
            torch.mm(item_vecs[start : start + w], vecs.T, out=scores_t[:w])
            scores_t[w:] = float("-inf")
            _mask(scores_t, train, chunk, pairs, start, w)
            keys = _block_top_keys(scores_t, w, start, groups, kmax)
            if best is not None:
                keys = torch.topk(torch.cat([best, keys], 1), min(kmax, best.shape[1] + keys.shape[1]), dim=1).values
            best = keys
        rel = _relevant(test, chunk, _items_of(best))
        n_test = torch.from_numpy(n_test_all[first : first + c]).to(device).double()
        out = []
        for k in ks:
            out.append(rel[:, :k].sum(1) / n_test)
        for k in ks:
            idcg = ideal[(torch.clamp(n_test, max=k) - 1).long()]
            out.append((rel[:, :k] * discount[:k]).sum(1) / idcg)
        per_user[first : first + c] = torch.stack(out, 1).cpu().numpy()

    firsts = iter(range(0, len(users), rows))
    lock = threading.Lock()

    def work() -> None:
        with torch.no_grad():
            buffer = torch.empty(buffer_size, device=device)
            while True:
                with lock:
                    first = next(firsts, None)
                if first is None:
                    return
                score_block(first, buffer)

    if workers == 1:
        work()
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                for future in [pool.submit(work) for _ in range(workers)]:
                    future.result()
        finally:
            torch.set_num_threads(threads)
    totals = per_user.sum(0)
    sums = {f"recall@{k}": float(totals[i]) for i, k in enumerate(ks)}
    sums.update({f"ndcg@{k}": float(totals[len(ks) + i]) for i, k in enumerate(ks)})
    sums["users"] = float(len(users))
    return sums


def reduce_means(sums: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """All-reduce metric sums over ranks and divide by the number of users."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    total = dict(zip(keys, t.tolist()))
    n = total.pop("users")
    out = {k: total[k] / n for k in sorted(total, key=lambda s: (s.split("@")[0], int(s.split("@")[1])))}
    out["users"] = int(n)
    return out


@torch.no_grad()
def tower_outputs(
    tower: Callable[[np.ndarray], torch.Tensor],
    ids: np.ndarray,
    num_calls: int,
    chunk: int,
    dim: int,
    device: torch.device,
) -> torch.Tensor:
    """Vectors of `ids` from a (possibly sharded) tower, in `num_calls` equal-sized calls.

    ``tower(rows)`` returns the vectors of an array of rows. Sharded lookups are collective:
    every rank makes the same number of calls with the same batch size (short ranks pad with
    row 0 and drop the padding)."""
    out = torch.empty(len(ids), dim, device=device)
    for call in range(num_calls):
        part = ids[call * chunk : (call + 1) * chunk]
        padded = np.zeros(chunk, dtype=np.int64)
        padded[: len(part)] = part
        vecs = tower(padded)
        out[call * chunk : call * chunk + len(part)] = vecs[: len(part)]
    return out


def user_tower(model, features: Features, device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    """rows -> user vectors of a (possibly sharded) TwoTower."""
    empty = np.zeros(0, dtype=np.int64)
    return lambda rows: model.user_vectors(features.batch(rows, empty).to(device))


def item_tower(model, features: Features, device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    """rows -> item vectors of a (possibly sharded) TwoTower."""
    empty = np.zeros(0, dtype=np.int64)
    return lambda rows: model.item_vectors(features.batch(empty, rows).to(device))


def gather_padded(x: torch.Tensor, sizes: List[int], dst: int | None = None) -> torch.Tensor | None:
    """Concatenate rank-local row blocks of different sizes on every rank (or on `dst` only)."""
    world = len(sizes)
    if world == 1:
        return x
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    if dst is None:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == dst else None
        dist.gather(padded, parts, dst=dst)
        if parts is None:
            return None
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def all_vectors(tower: Callable[[np.ndarray], torch.Tensor], count: int, dim: int, device: torch.device, chunk: int,
                dst: int | None = None) -> torch.Tensor | None:
    """Vectors of rows 0..count-1, computed a share per rank and gathered (everywhere or on dst)."""
    rank, world = rank_and_world()
    bounds = rank_bounds(count, world)
    sizes = np.diff(bounds).tolist()
    num_calls = -(-max(sizes) // chunk)
    ids = np.arange(bounds[rank], bounds[rank + 1])
    local = tower_outputs(tower, ids, num_calls, chunk, dim, device)
    return gather_padded(local, sizes, dst)


def eval_options(eval_cfg: EvalConfig) -> Dict[str, int]:
    """The keywords of `evaluate_model` / `evaluate_popularity` from an EvalConfig: the sample size
    (``max_users``, used when no `users` are given) and the block sizes."""
    return {"max_users": eval_cfg.max_users, "item_chunk": eval_cfg.item_chunk,
            "score_budget_mb": eval_cfg.score_budget_mb}


def _evaluated(test: ItemSets, users: Optional[np.ndarray], max_users: int) -> Tuple[np.ndarray, int]:
    """This rank's share of the evaluated users and the largest share (see `evaluate_model`)."""
    if users is None:
        users = sample_eval_users(test.users_with_items(), max_users)
    return local_share(np.asarray(users, dtype=np.int64))


@torch.no_grad()
def evaluate_model(
    model,
    features: Features,
    num_items: int,
    train: Union[CSR, ItemSets],
    test: Union[CSR, ItemSets],
    ks: Sequence[int],
    device: torch.device,
    user_chunk: int = 1024,
    *,
    users: Optional[np.ndarray] = None,
    max_users: int = 0,
    item_chunk: int = 0,
    score_budget_mb: int = 256,
) -> Dict[str, float]:
    """Recall/NDCG of a two-tower model (plain or sharded), averaged over the evaluated users.

    `features` builds the model's inputs (the users' history bags when the model has them);
    `train` holds the interactions to mask, `test` the relevant ones: CSRs over all user rows
    (in-memory data) or `ItemSets` (`load_eval_sets`) covering at least this rank's share.
    The evaluated users are `users` (sorted, the same on every rank), or, when None,
    `sample_eval_users` of the users with test items in `test` and `max_users` (which needs sets
    covering every user). Each rank evaluates its `local_share` of them. Collective."""
    dim = model.embedding_dim
    train, test = as_item_sets(train, num_items), as_item_sets(test, num_items)
    item_vecs = all_vectors(item_tower(model, features, device), num_items, dim, device, user_chunk)
    local, max_local = _evaluated(test, users, max_users)
    user_vecs = tower_outputs(user_tower(model, features, device), local, -(-max_local // user_chunk),
                              user_chunk, dim, device)
    sums = ranking_metric_sums(user_vecs, item_vecs, local, train, test, ks, user_chunk, item_chunk, score_budget_mb)
    return reduce_means(sums, device)


def evaluate_popularity(
    item_counts: np.ndarray,
    train: Union[CSR, ItemSets],
    test: Union[CSR, ItemSets],
    ks: Sequence[int],
    device: torch.device,
    user_chunk: int = 1024,
    *,
    users: Optional[np.ndarray] = None,
    max_users: int = 0,
    item_chunk: int = 0,
    score_budget_mb: int = 256,
) -> Dict[str, float]:
    """The most-popular-items baseline (training counts, training items masked), same evaluator
    and users as `evaluate_model`."""
    num_items = len(item_counts)
    train, test = as_item_sets(train, num_items), as_item_sets(test, num_items)
    local, _ = _evaluated(test, users, max_users)
    item_vecs = torch.from_numpy(np.asarray(item_counts, dtype=np.float32))[:, None].to(device)
    user_vecs = torch.ones(len(local), 1, device=device)
    sums = ranking_metric_sums(user_vecs, item_vecs, local, train, test, ks, user_chunk, item_chunk, score_budget_mb)
    return reduce_means(sums, device)


@torch.no_grad()
def tower_norms(model, features: Features, num_users: int, num_items: int, device: torch.device, chunk: int,
                rank: int, world: int, max_rows: int = 100_000) -> Optional[Dict[str, tuple]]:
    """L2 norms of the towers' raw outputs (before any normalisation: what the model learnt; the
    exported vectors of a normalising model all have norm 1), for an evenly spaced sample of at
    most `max_rows` users and items. Collective; returns {"user"|"item": (rows, norms)} on rank 0."""
    normalize, model.normalize = model.normalize, False
    out = {}
    try:
        for name, count, tower in (("user", num_users, user_tower(model, features, device)),
                                   ("item", num_items, item_tower(model, features, device))):
            rows = np.unique(np.linspace(0, count - 1, min(count, max_rows)).round().astype(np.int64))
            bounds = rank_bounds(len(rows), world)
            sizes = np.diff(bounds).tolist()
            local = tower_outputs(tower, rows[bounds[rank]:bounds[rank + 1]], -(-max(sizes) // chunk), chunk,
                                  model.embedding_dim, device)
            norms = gather_padded(local.norm(dim=1, keepdim=True), sizes, dst=0)
            if rank == 0:
                out[name] = (rows, norms[:, 0].double().cpu().numpy())
    finally:
        model.normalize = normalize
    return out if rank == 0 else None


# ---------------------------------------------------------------------------------------------
# python -m recsys.evaluate RUN_DIR: the metrics of a run's newest checkpoint, without training
# ---------------------------------------------------------------------------------------------


def evaluate_run(path, device: str = "auto", out_name: str = "eval.json") -> Dict:
    """Load a run's newest complete checkpoint (``path``: the run, or one checkpoint directory), with
    the config the checkpoint recorded, and evaluate it as training does at its end (test, and
    validation and popularity as the run had them; stacked with the spectral closed form when the
    run was, ``recsys.stack``) with the evaluation sets of its data source
    (``recsys.sources.open_data``: the dataset in memory, or the streamed one).
    Rank 0 writes ``<run_dir>/<out_name>`` atomically. Collective under torchrun; one process otherwise."""
    from pathlib import Path

    from recsys.checkpoint import load_trained
    from recsys.data import write_json_atomic

    t0 = time.perf_counter()
    run = load_trained(Path(path), device)
    cfg, data, model, dev = run.cfg, run.data, run.model, run.device
    rank, world = rank_and_world()
    data.setup(cfg, model, rank, world, dev)  # as training: model inputs, masks and test / validation sets
    out: Dict = {"checkpoint": str(run.path), "step": run.meta["step"], "run_hash": run.meta.get("run_hash")}
    options = eval_options(cfg.eval)
    if cfg.model.stack_spectral_dim:  # as training: the spectral closed form stacked, its weight chosen again
        from recsys.stack import stack_options, stack_spectral

        model, out["stack"] = stack_spectral(model, data, stack_options(cfg), dev)
        if "chosen_valid" in out["stack"]:
            out["valid"] = out["stack"]["chosen_valid"]
    out["test"] = evaluate_model(model, data.full_features, data.num_items, data.train_mask, data.test_csr, cfg.eval.ks,
                                 dev, cfg.eval.user_chunk, users=data.test_users, **options)
    if data.valid_csr is not None and "valid" not in out:
        ks = sorted(set(cfg.eval.ks) | {cfg.eval.select_k})
        out["valid"] = evaluate_model(model, data.fit_features, data.num_items, data.fit_mask, data.valid_csr, ks, dev,
                                      cfg.eval.user_chunk, users=data.valid_users, **options)
    if cfg.eval.popularity:
        out["popularity"] = evaluate_popularity(data.item_counts(), data.train_mask, data.test_csr, cfg.eval.ks, dev,
                                                cfg.eval.user_chunk, users=data.test_users, **options)
    out.update(data.eval_info)
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    if rank == 0:
        run_dir = run.path.parent.parent
        write_json_atomic(out, run_dir / out_name)
        out["path"] = str(run_dir / out_name)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import logging
    import sys
    import warnings

    from recsys.config import ConfigError
    from recsys.data import DataError
    # Run as ``python -m recsys.evaluate`` this file is ``__main__``, a second copy of the module:
    # evaluate with the copy the package imports, whose set classes are those ``load_eval_sets`` builds.
    from recsys.evaluate import evaluate_run
    from recsys.parallelize import destroy_distributed

    parser = argparse.ArgumentParser(prog="python -m recsys.evaluate",
                                     description="Metrics of a training run from its newest complete checkpoint "
                                                 "(written to RUN_DIR/eval.json).")
    parser.add_argument("run_dir", help="the run directory (or one checkpoint directory in it)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    for message in (".*deprecating ShardedTensor.*", ".*is_fx_tracing.*", ".*all_gather_into_tensor.*"):
        warnings.filterwarnings("ignore", message=message)
    try:
        out = evaluate_run(args.run_dir, args.device)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    if "path" in out:
        rows = [("model", out["test"])] + ([("popularity", out["popularity"])] if "popularity" in out else [])
        keys = sorted((k for k in out["test"] if k != "users"),  # as recsys.train prints them: by K, recall first
                      key=lambda k: (int(k.split("@")[1]), k.split("@")[0] != "recall"))
        print(f"{'':<12}" + "".join(f"{k:>12}" for k in keys))
        for name, m in rows:
            print(f"{name:<12}" + "".join(f"{m[k]:>12.4f}" for k in keys))
        print(f"checkpoint {out['checkpoint']} (step {out['step']}); {out['test']['users']} test users; "
              f"metrics: {out['path']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
