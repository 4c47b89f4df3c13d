"""Tower vectors: the outputs of a (possibly sharded) two-tower model for any rows.

Sharded lookups are collective: every rank makes the same number of calls with the same batch
size (``tower_outputs`` pads short ranks). ``all_vectors`` computes rows 0..N-1 a share per rank
and gathers them (everywhere, or on one rank); ``tower_norms`` samples the norms of the raw
outputs (what the model learnt). Used by the evaluation, the stacking and the export.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import torch

from recsys.data.features import Features
from recsys.distributed import gather_padded, rank_and_world, rank_bounds


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


def all_vectors(tower: Callable[[np.ndarray], torch.Tensor], count: int, dim: int, device: torch.device, chunk: int,
                dst: Optional[int] = None) -> Optional[torch.Tensor]:
    """Vectors of rows 0..count-1, computed a share per rank and gathered (everywhere or on dst)."""
    rank, world = rank_and_world()
    bounds = rank_bounds(count, world)
    sizes = np.diff(bounds).tolist()
    num_calls = -(-max(sizes) // chunk)
    ids = np.arange(bounds[rank], bounds[rank + 1])
    local = tower_outputs(tower, ids, num_calls, chunk, dim, device)
    return gather_padded(local, sizes, dst)


@torch.no_grad()
def tower_norms(model, features: Features, num_users: int, num_items: int, device: torch.device, chunk: int,
                max_rows: int = 100_000) -> Optional[Dict[str, tuple]]:
    """L2 norms of the towers' raw outputs (before any normalisation: what the model learnt; the
    exported vectors of a normalising model all have norm 1), for an evenly spaced sample of at
    most `max_rows` users and items. Collective; returns {"user"|"item": (rows, norms)} on rank 0."""
    rank, world = rank_and_world()
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
