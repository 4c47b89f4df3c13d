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

The SVD is a seeded randomised one (Halko et al., the algorithm of ``torch.svd_lowrank``: a
Gaussian sketch, ``niter`` power iterations, each product re-orthonormalised) computed over all
ranks, so that no rank holds the interaction matrix: each rank holds the rows of its own users
(``rank_bounds`` of the user table, the rows it exports), the products with the item side are
summed over ranks (all-reduce of [items x q] matrices) and the row-distributed sketches are
orthonormalised by TSQR (each rank's QR, then the QR of the stacked small R factors). We write
this ourselves because neither torch nor FAISS has a distributed randomised SVD of a sparse
matrix. The item-side factors (the singular values and right singular vectors: [items x dim])
are then the same on every rank (rank 0's, broadcast), and each rank writes only its own shards
of the tables; the user table is zero. Any number of ranks computes the same subspace (the
singular vectors' signs are fixed: each one's largest entry is positive). It is
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
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from recsys.config import EvalConfig, ModelConfig
from recsys.data.eval_sets import EvalSets
from recsys.data.source import DataSource
from recsys.distributed import (all_gather_objects, all_reduce_sum, broadcast_from_rank0, own_rows,
                                rank_and_world)
from recsys.evaluation.metrics import evaluate_model
from recsys.parallelize import local_blocks, table_weights

logger = logging.getLogger(__name__)
CPU = torch.device("cpu")


def tsqr(y: torch.Tensor) -> torch.Tensor:
    """The Q factor of the QR decomposition of a matrix whose rows are spread over the ranks
    (this rank holds the block `y`): each rank's QR, the QR of the stacked R factors (small:
    at most q x q each, gathered everywhere), each rank's block of Q. Collective."""
    q_local, r_local = torch.linalg.qr(y)
    stacked = all_gather_objects(r_local.numpy())
    q_small, _ = torch.linalg.qr(torch.from_numpy(np.concatenate(stacked)))
    offset = sum(len(r) for r in stacked[: rank_and_world()[0]])
    return q_local @ q_small[offset: offset + len(r_local)]


def normalized_rows(users: np.ndarray, items: np.ndarray, lo: int, hi: int, num_items: int,
                    device: torch.device = CPU) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """This rank's rows [lo, hi) of the degree-normalised interaction matrix (a sparse COO
    tensor, float64) from its users' (user, item) pairs (repeated pairs counted once), the
    item degrees (summed over ranks) and the unique pairs' keys ((user - lo) * num_items + item).
    Collective."""
    if len(users) and (users.min() < lo or users.max() >= hi):
        raise ValueError(f"spectral: pairs of users outside this rank's rows [{lo}, {hi})")
    keys = np.unique((users.astype(np.int64) - lo) * num_items + items)
    u, i = keys // num_items, keys % num_items
    du = np.bincount(u, minlength=hi - lo).astype(np.float64)
    di = all_reduce_sum(torch.from_numpy(np.bincount(i, minlength=num_items).astype(np.float64)), device).numpy()
    values = 1.0 / np.sqrt(du[u] * di[i])
    matrix = torch.sparse_coo_tensor(torch.from_numpy(np.stack([u, i])), torch.from_numpy(values),
                                     (hi - lo, num_items), check_invariants=True).coalesce()
    return matrix, di, keys


def spectral_factors(users: np.ndarray, items: np.ndarray, lo: int, hi: int, num_users: int, num_items: int,
                     rank: int, niter: int = 3, seed: int = 0, device: torch.device = CPU
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(s, V, item degrees, keys): the top-`rank` singular values and right singular vectors of
    the degree-normalised interaction matrix, float64, the same on every rank; each rank gives
    the pairs of its users, rows [lo, hi) (one rank: lo = 0, hi = num_users), and gets the keys
    of its unique pairs (``normalized_rows``). Each singular vector's largest entry is positive.
    Collective (`device`: the process group's)."""
    if rank > min(num_users, num_items):
        raise ValueError(f"model.init=spectral: model.embedding_dim={rank} is larger than the number of users "
                         f"({num_users}) or items ({num_items})")
    a, di, keys = normalized_rows(users, items, lo, hi, num_items, device)
    at = a.t().coalesce()
    # Oversampled (Halko et al.): the top `rank` of q > rank approximate triplets are accurate.
    q = min(rank + max(10, rank // 10), num_users, num_items)
    sketch = torch.randn(num_items, q, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    basis = tsqr(a @ sketch)  # this rank's rows of an orthonormal basis of A's range
    for _ in range(niter):
        item_basis = torch.linalg.qr(broadcast_from_rank0(all_reduce_sum(at @ basis, device), device))[0]
        basis = tsqr(a @ item_basis)
    bt = all_reduce_sum(at @ basis, device)  # (Q^T A)^T, [items x q]
    v, s = torch.empty(num_items, rank, dtype=torch.float64), torch.empty(rank, dtype=torch.float64)
    if rank_and_world()[0] == 0:
        left, values, _ = torch.linalg.svd(bt, full_matrices=False)  # B^T = V S W^T
        left = left[:, :rank]
        signs = torch.sign(left.gather(0, left.abs().argmax(0, keepdim=True)))[0]
        v.copy_(left * torch.where(signs == 0, 1.0, signs))
        s.copy_(values[:rank])
    return broadcast_from_rank0(s, device).numpy(), broadcast_from_rank0(v, device).numpy(), di, keys


def spectral_tables(users: np.ndarray, items: np.ndarray, lo: int, hi: int, num_users: int, num_items: int,
                    dim: int, alpha: float, niter: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device = CPU) -> Tuple[Dict[str, torch.Tensor], np.ndarray]:
    """The item-side initial tables by name (``item``, ``history``: [items x dim], the same on
    every rank) of `dtype` (computed in float64; the ``user`` table is zero), and this rank's
    unique pair keys. Each rank gives the pairs of its users [lo, hi). Collective."""
    t0 = time.perf_counter()
    s, v, di, keys = spectral_factors(users, items, lo, hi, num_users, num_items, dim, niter, seed, device)
    d = np.maximum(di, 1.0)[:, None]
    tables = {
        "item": torch.from_numpy(np.sqrt(d) * v).to(dtype),
        "history": torch.from_numpy(v / np.sqrt(d) * (1.0 + alpha * s**2)).to(dtype),
    }
    logger.info("spectral init: top %d singular values of the normalised %d x %d interaction matrix "
                "(%.4f .. %.4f) in %.1fs", dim, num_users, num_items, s[0], s[-1], time.perf_counter() - t0)
    return tables, keys


@torch.no_grad()
def load_tables(model: torch.nn.Module, full: Dict[str, torch.Tensor], zero: Tuple[str, ...] = ()) -> None:
    """Copy full tables (by table name) into a plain or sharded model's tables (each rank its
    shards); the tables named in `zero` are set to zero (shard by shard: no full table)."""
    weights = table_weights(model)
    missing = sorted(set(weights) - set(full) - set(zero))
    if missing:
        raise ValueError(f"model.init=spectral has no initial values for table(s) {missing}: it needs a two_tower "
                         "model with history_weight > 0, share_item_table=false and no item history")
    for name, weight in weights.items():
        shards = local_blocks(weight)
        if name in zero:
            for tensor, _, _ in shards:
                tensor.zero_()
            continue
        values = full[name]
        if tuple(values.shape) != tuple(weight.size()):
            raise ValueError(f"table {name!r}: initial values of shape {tuple(values.shape)}, "
                             f"the table has {tuple(weight.size())}")
        for tensor, (r0, c0), (nr, nc) in shards:
            tensor.copy_(values[r0 : r0 + nr, c0 : c0 + nc])


def init_spectral(model: torch.nn.Module, data: DataSource, include_valid: bool, mc: ModelConfig, seed: int,
                  device: torch.device) -> None:
    """Fill a (sharded) two-tower's tables with :func:`spectral_tables` of the data's training
    pairs (`include_valid`: with the validation holdout, or its fit part only): each rank reads
    its users' pairs and writes its own shards (`mc`: dimension, alpha, iterations). Collective."""
    lo, hi = own_rows(data.num_users)
    users, items = data.pairs(include_valid, lo, hi)
    tables, _ = spectral_tables(users, items, lo, hi, data.num_users, data.num_items, mc.embedding_dim,
                                mc.spectral_alpha, mc.spectral_niter, seed, device=device)
    load_tables(model, tables, zero=("user",))


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
        init_spectral(dmp, data, True, mc, seed, device)
    return valid
