"""The metric kernel: exact full-corpus Recall@K and NDCG@K with each user's training items masked.

Each rank scores its users against every item in blocks of users x items bounded by
``eval.score_budget_mb``, masks the users' training items, keeps a running exact top max(K) over
the item blocks and sums the per-user metrics; ``reduce_means`` all-reduces the sums. Recall@K =
hits in the top K / number of the user's test items; NDCG@K uses binary relevance and the ideal
DCG over min(K, test items) (the LightGCN protocol). Equal scores rank the lower item row first
(a total order, so the metrics do not depend on the block sizes). The popularity baseline goes
through the same code with item score = train count.

The top K of a block is found without sorting the block: the maximum of each group of items is
taken (one vectorised pass), the top groups are found the same way one level up, and only the
items of the groups that can hold a top-K item are ranked (see `_block_top_keys`). Written here
rather than taken from a library: ``torch.topk`` per block of users (the previous evaluator) took
twice the time and numpy's argpartition over the block five times on Gowalla-size data
(benchmarks/results/eval.md).

What is masked and what is relevant are ``recsys.data.eval_sets.ItemSets`` (or CSRs over all
user rows, for in-memory data).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from recsys.data.dataset import CSR
from recsys.data.eval_sets import BitmapSets, CSRSets, ItemSets, _slots_of, as_item_sets

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
    missing: Optional[np.ndarray] = None,
) -> Dict[str, float]:
    """Sums over `users` of recall@K and ndcg@K, and their count (key ``users``). With `missing`
    (per user of `users`: test interactions whose item has no vector, never found), also
    ``all_recall@K`` / ``all_ndcg@K``: the same hits over the user's test interactions including
    those (recall's denominator and NDCG's ideal count them).

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
    extra = None if missing is None else np.asarray(missing, dtype=np.float64)
    per_user = np.zeros((len(users), (2 if extra is None else 4) * len(ks)))  # recall@k, ndcg@k[, all_ of both]

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
        if extra is not None:
            n_all = n_test + torch.from_numpy(extra[first : first + c]).to(device)
            for k in ks:
                out.append(rel[:, :k].sum(1) / n_all)
            for k in ks:
                out.append((rel[:, :k] * discount[:k]).sum(1) / ideal[(torch.clamp(n_all, max=k) - 1).long()])
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
    if extra is not None:
        sums.update({f"all_recall@{k}": float(totals[2 * len(ks) + i]) for i, k in enumerate(ks)})
        sums.update({f"all_ndcg@{k}": float(totals[3 * len(ks) + i]) for i, k in enumerate(ks)})
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
    out = {k: total[k] / max(n, 1.0) for k in sorted(total, key=lambda s: (s.split("@")[0], int(s.split("@")[1])))}
    out["users"] = int(n)
    return out
