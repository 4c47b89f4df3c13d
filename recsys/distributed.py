"""Ranks without TorchRec: who am I, which share is mine, and small collectives on plain tensors.

The lowest layer that knows about ranks: the data layer (each rank's share of the evaluated
users), the evaluation and the export use these. Creating the process group, the planner and
the sharded model live in ``recsys.parallelize``. Every function works without a process group
(one rank) as with one.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_bounds(n: int, world: int) -> np.ndarray:
    """Contiguous near-equal shares of range(n): rank r owns [bounds[r], bounds[r + 1])."""
    return np.linspace(0, n, world + 1).round().astype(int)


def own_rows(num_rows: int) -> Tuple[int, int]:
    """This rank's rows [lo, hi) of a table of `num_rows` rows (``rank_bounds``): the rows it
    exports and, of the user table, the users whose pairs and evaluation it handles."""
    rank, world = rank_and_world()
    bounds = rank_bounds(num_rows, world)
    return int(bounds[rank]), int(bounds[rank + 1])


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of CPU tensor `t` over ranks, on the CPU (the collective runs on the process
    group's `device`: NCCL needs CUDA tensors); `t` itself on one rank."""
    if rank_and_world()[1] == 1:
        return t
    x = t.to(device)
    dist.all_reduce(x)
    return x.cpu()


def broadcast_from_rank0(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rank 0's CPU tensor `t` on every rank (the same bits everywhere), on the CPU."""
    if rank_and_world()[1] == 1:
        return t
    x = t.to(device)
    dist.broadcast(x, src=0)
    return x.cpu()


def owned_share(rows: np.ndarray, num_rows: int, rank: Optional[int] = None,
                world: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """The sorted `rows` that fall in this rank's part of a table of `num_rows` rows (``rank_bounds``:
    the rows a rank owns: its users' training pairs, evaluation and export), and the largest
    count of any rank (for collective calls of equal number). No communication: every rank
    knows `rows`."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    cuts = np.searchsorted(rows, rank_bounds(num_rows, world))
    return rows[cuts[rank] : cuts[rank + 1]], int(np.diff(cuts).max())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (picklable) on every rank; `obj` itself without a multi-rank group."""
    if rank_and_world()[1] == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def from_rank0(fn, *errors: type) -> Any:
    """``fn()`` run on rank 0 only, its result (or the error of one of `errors` it raised) on every
    rank: rank 0 does the work (preparing data, deciding where to resume) and the others wait for
    it in the broadcast; an expected error is raised on every rank, so they all stop the same way."""
    value, error = None, None
    if rank_and_world()[0] == 0:
        try:
            value = fn()
        except errors as e:
            error = e
    value, error = broadcast_object((value, error))
    if error is not None:
        raise error
    return value


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_padded(x: torch.Tensor, sizes: List[int], dst: Optional[int] = None) -> Optional[torch.Tensor]:
    """Concatenate rank-local row blocks of different sizes on every rank (or on `dst` only).

    Everywhere: one ``all_gather_into_tensor`` into the result's own buffer, each rank's block then
    moved down over the padding in place, so that the result is the one copy held (plus one block)."""
    world = len(sizes)
    if world == 1:
        return x
    longest = max(sizes)
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    if dst is None:
        out = torch.empty(world * longest, *x.shape[1:], dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, padded)
        offset = 0
        for r, n in enumerate(sizes):
            if offset != r * longest:
                out[offset : offset + n] = out[r * longest : r * longest + n].clone()
            offset += n
        return out[:offset]
    parts = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == dst else None
    dist.gather(padded, parts, dst=dst)
    if parts is None:
        return None
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
