"""Spectral initialisation of the two-tower tables: a truncated SVD of the normalised interactions.

With ``model.init=spectral`` the item table, the history (context) table and the user table of
a history two-tower model start from the closed-form low-pass graph filter of GF-CF / SVD-GCN
(Shen et al. 2021, Peng et al. 2022) instead of random rows:

    R~ = D_u^-1/2 R D_i^-1/2 ~ U diag(s) V^T          (top ``embedding_dim`` singular triplets)
    item(i)    = d_i^(1/2)  V[i]
    context(i) = d_i^(-1/2) V[i] * (1 + alpha s^2)
    user(u)    = sum over the user's training items i of context(i)    (the history bag)

so score(u, i) = r_u D_i^-1/2 V diag(1 + alpha s^2) V^T D_i^1/2 [i]: the ideal low-pass filter
plus alpha times the (rank-limited) linear filter R~^T R~, with d_i the item's training degree.
It is still a dot-product model: the exported user vectors are the tower's outputs. The user id
table starts at zero (with ``history_weight=1`` it is not used). Training afterwards (epochs > 0)
fine-tunes these tables with the configured loss; ``train.epochs=0`` keeps the closed form.

The SVD is a seeded randomised one (``torch.svd_lowrank`` on the sparse matrix, Halko et al.),
computed once on rank 0 and broadcast, so every rank and every sharding starts identical. It is
computed in float64 and rounded to float32 at the end: the sparse products and LAPACK's
factorisations sum in an order that depends on the number of threads and their scheduling, and
in float32 singular vectors of close singular values then moved by up to 1e-4 between two
computations (measured on 20,000 x 5,000 interactions, 1 vs 2 threads); in float64 the same
differences are ~1e-15 relative, below float32's resolution, so a recomputation (``recsys.export``
or ``recsys.evaluate`` from a checkpoint, another machine) gives the same float32 tables, or
tables one float32 ulp apart in rare elements. It costs 1.6x the float32 time (68 s instead of
43 s for the 1,024 vectors of Gowalla on 2 cores).
"""

from __future__ import annotations

import logging
import time
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recsys.config import EvalConfig, ModelConfig
from recsys.data.eval_sets import EvalSets
from recsys.data.source import DataSource
from recsys.evaluation.metrics import evaluate_model
from recsys.parallelize import table_weights

logger = logging.getLogger(__name__)


def spectral_factors(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, rank: int,
                     niter: int = 3, seed: int = 0):
    """(s, V, item degrees): the top-`rank` singular values and right singular vectors of the
    degree-normalised interaction matrix of the (user, item) pairs (repeated pairs counted once),
    float64 (see the module docstring)."""
    if rank > min(num_users, num_items):
        raise ValueError(f"model.init=spectral: model.embedding_dim={rank} is larger than the number of users "
                         f"({num_users}) or items ({num_items})")
    keys = np.unique(users.astype(np.int64) * num_items + items)
    u, i = keys // num_items, keys % num_items
    du = np.bincount(u, minlength=num_users).astype(np.float64)
    di = np.bincount(i, minlength=num_items).astype(np.float64)
    values = 1.0 / np.sqrt(du[u] * di[i])
    matrix = torch.sparse_coo_tensor(torch.from_numpy(np.stack([u, i])), torch.from_numpy(values),
                                     (num_users, num_items), check_invariants=True).coalesce()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        # Oversampled (Halko et al.): the top `rank` of q > rank approximate triplets are accurate.
        q = min(rank + max(10, rank // 10), num_users, num_items)
        _, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
    finally:
        torch.random.set_rng_state(state)
    return s[:rank].numpy(), v[:, :rank].numpy(), di


def spectral_tables(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, dim: int,
                    alpha: float, niter: int = 3, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Full initial tables by name (``item``, ``history``, ``user``), of `dtype` (computed in float64)."""
    t0 = time.perf_counter()
    s, v, di = spectral_factors(users, items, num_users, num_items, dim, niter, seed)
    d = np.maximum(di, 1.0)[:, None]
    tables = {
        "item": torch.from_numpy(np.sqrt(d) * v).to(dtype),
        "history": torch.from_numpy(v / np.sqrt(d) * (1.0 + alpha * s**2)).to(dtype),
        "user": torch.zeros(num_users, dim, dtype=dtype),
    }
    logger.info("spectral init: top %d singular values of the normalised %d x %d interaction matrix "
                "(%.4f .. %.4f) in %.1fs", dim, num_users, num_items, s[0], s[-1], time.perf_counter() - t0)
    return tables


@torch.no_grad()
def load_tables(model: torch.nn.Module, full: Dict[str, torch.Tensor]) -> None:
    """Copy full tables (by table name) into a plain or sharded model's tables (each rank its shards)."""
    weights = table_weights(model)
    missing = sorted(set(weights) - set(full))
    if missing:
        raise ValueError(f"model.init=spectral has no initial values for table(s) {missing}: it needs a two_tower "
                         "model with history_weight > 0, share_item_table=false and no item history")
    for name, weight in weights.items():
        values = full[name]
        if tuple(values.shape) != tuple(weight.size()):
            raise ValueError(f"table {name!r}: initial values of shape {tuple(values.shape)}, "
                             f"the table has {tuple(weight.size())}")
        if isinstance(weight, ShardedTensor):
            for shard in weight.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(values[r0 : r0 + nr, c0 : c0 + nc])
        else:
            weight.copy_(values)


def init_spectral(model: torch.nn.Module, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int,
                  mc: ModelConfig, seed: int, device: torch.device) -> None:
    """Fill a (sharded) two-tower's tables with :func:`spectral_tables` of the (user, item) pairs,
    computed on rank 0 and broadcast (`mc`: the model config: dimension, alpha, iterations)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tables = None
    if rank == 0:
        tables = spectral_tables(users, items, num_users, num_items, mc.embedding_dim, mc.spectral_alpha,
                                 mc.spectral_niter, seed)
    shapes = {"item": (num_items, mc.embedding_dim), "history": (num_items, mc.embedding_dim),
              "user": (num_users, mc.embedding_dim)}
    load_tables(model, broadcast_tables(tables, shapes, device=device))


def broadcast_tables(tables: Dict[str, torch.Tensor] | None, names_shapes: Dict[str, tuple], src: int = 0,
                     device: torch.device | None = None) -> Dict[str, torch.Tensor]:
    """Rank `src`'s tables on every rank (a no-op without a multi-rank process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tables
    out = {}
    for name, shape in sorted(names_shapes.items()):
        t = tables[name].to(device) if dist.get_rank() == src else torch.empty(shape, device=device)
        dist.broadcast(t, src=src)
        out[name] = t.cpu()
    return out


def closed_form_end(dmp: torch.nn.Module, model: torch.nn.Module, data: DataSource, sets: EvalSets, mc: ModelConfig,
                    seed: int, device: torch.device, eval_cfg: EvalConfig) -> Optional[Dict[str, float]]:
    """``model.init=spectral`` with no training epoch: the closed form is the model. Its validation
    metrics are of the tables computed from the fit part (returned; None without a validation
    split); with ``model.spectral_refit`` the tables are then recomputed from the whole training
    split, for the test and the export. Collective."""
    if sets.valid is None:
        return None
    valid = evaluate_model(model, sets.valid, eval_cfg.valid_ks, device, eval_cfg)
    logger.info("closed-form tables: valid %s %.4f", eval_cfg.select_metric, valid[eval_cfg.select_metric])
    if mc.spectral_refit:
        logger.info("recomputing the spectral tables from the whole training split for the test")
        init_spectral(dmp, *data.pairs(), data.num_users, data.num_items, mc, seed, device)
    return valid
