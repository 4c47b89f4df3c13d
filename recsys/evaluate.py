"""Evaluation: exact full-corpus Recall@K and NDCG@K with each user's training items masked.

Users with test items are split across ranks; each rank scores its users against every item
by chunked matrix products, masks the users' training items, takes the top max(K) and sums the
per-user metrics; the sums are all-reduced. Recall@K = hits in the top K / number of the user's
test items; NDCG@K uses binary relevance and the ideal DCG over min(K, test items) (the LightGCN
protocol). The popularity baseline goes through the same code with item score = train count.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from recsys.data import CSR, Features, gather_rows_csr
from recsys.loss import rank_and_world


def _pairs(csr: CSR, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in `rows`, item) pairs of the given users, vectorised."""
    lengths, items = gather_rows_csr(csr, rows)
    return np.repeat(np.arange(len(rows)), lengths), items


@torch.no_grad()
def ranking_metric_sums(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    users: np.ndarray,
    train: CSR,
    test: CSR,
    ks: Sequence[int],
    user_chunk: int = 1024,
) -> Dict[str, float]:
    """Sums over `users` of recall@K and ndcg@K, and their count (key ``users``).

    `user_vecs[i]` is the vector of user row `users[i]`; `item_vecs` holds every item."""
    num_items = item_vecs.shape[0]
    kmax = max(ks)
    if kmax > num_items:
        raise ValueError(f"eval.ks: K={kmax} is larger than the number of items ({num_items})")
    device = item_vecs.device
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, device=device, dtype=torch.float64))
    ideal = torch.cumsum(discount, 0)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for start in range(0, len(users), user_chunk):
        rows = users[start : start + user_chunk]
        c = len(rows)
        scores = user_vecs[start : start + c].to(device) @ item_vecs.T
        pos, items = _pairs(train, rows)
        scores[torch.from_numpy(pos).to(device), torch.from_numpy(items).to(device)] = float("-inf")
        top = torch.topk(scores, kmax, dim=1).indices
        # Relevance of the top K by binary search among the chunk's sorted (user, item) test keys:
        # memory c x K, not c x num_items.
        pos, items = _pairs(test, rows)
        keys = torch.from_numpy(pos * num_items + items).to(device)  # sorted: CSR rows hold sorted items
        query = torch.arange(c, device=device)[:, None] * num_items + top
        found = torch.searchsorted(keys, query).clamp_(max=max(len(keys) - 1, 0))
        rel = (keys[found] == query).double() if len(keys) else torch.zeros(c, kmax, dtype=torch.float64, device=device)
        n_test = torch.from_numpy(test.indptr[rows + 1] - test.indptr[rows]).to(device).double()
        if bool((n_test == 0).any()):
            raise ValueError("ranking_metric_sums: every evaluated user needs at least one test item")
        for k in ks:
            hits = rel[:, :k].sum(1)
            sums[f"recall@{k}"] += float((hits / n_test).sum())
            dcg = (rel[:, :k] * discount[:k]).sum(1)
            idcg = ideal[(torch.clamp(n_test, max=k) - 1).long()]
            sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
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


def rank_bounds(n: int, world: int) -> np.ndarray:
    """Contiguous near-equal shares of range(n): rank r owns [bounds[r], bounds[r + 1])."""
    return np.linspace(0, n, world + 1).round().astype(int)


def local_eval_users(test: CSR) -> tuple[np.ndarray, int]:
    """This rank's share of the users that have test items, and the largest share of any rank."""
    rank, world = rank_and_world()
    users = np.flatnonzero(test.counts() > 0)
    bounds = rank_bounds(len(users), world)
    return users[bounds[rank] : bounds[rank + 1]], int(np.diff(bounds).max())


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


@torch.no_grad()
def evaluate_model(
    model,
    features: Features,
    num_items: int,
    train: CSR,
    test: CSR,
    ks: Sequence[int],
    device: torch.device,
    user_chunk: int = 1024,
) -> Dict[str, float]:
    """Recall/NDCG of a two-tower model (plain or sharded) over the users that have test items.

    `features` builds the model's inputs (the users' history bags when the model has them);
    `train` holds the interactions to mask."""
    dim = model.embedding_dim
    item_vecs = all_vectors(item_tower(model, features, device), num_items, dim, device, user_chunk)
    local, max_local = local_eval_users(test)
    user_vecs = tower_outputs(user_tower(model, features, device), local, -(-max_local // user_chunk),
                              user_chunk, dim, device)
    sums = ranking_metric_sums(user_vecs, item_vecs, local, train, test, ks, user_chunk)
    return reduce_means(sums, device)


def evaluate_popularity(
    item_counts: np.ndarray, train: CSR, test: CSR, ks: Sequence[int], device: torch.device, user_chunk: int = 1024,
) -> Dict[str, float]:
    """The most-popular-items baseline (training counts, training items masked), same evaluator."""
    local, _ = local_eval_users(test)
    item_vecs = torch.from_numpy(item_counts.astype(np.float32))[:, None].to(device)
    user_vecs = torch.ones(len(local), 1, device=device)
    return reduce_means(ranking_metric_sums(user_vecs, item_vecs, local, train, test, ks, user_chunk), device)


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
    validation and popularity as the run had them). Rank 0 writes ``<run_dir>/<out_name>``
    atomically. Collective under torchrun; one process otherwise."""
    from pathlib import Path

    from recsys.checkpoint import load_trained
    from recsys.data import write_json_atomic
    from recsys.train import make_features

    t0 = time.perf_counter()
    run = load_trained(Path(path), device)
    cfg, dataset, model, dev = run.cfg, run.dataset, run.model, run.device
    full = make_features(cfg, dataset, model, True)
    out: Dict = {"checkpoint": str(run.path), "step": run.meta["step"], "run_hash": run.meta.get("run_hash")}
    out["test"] = evaluate_model(model, full, dataset.num_items, dataset.train_csr(), dataset.test_csr(), cfg.eval.ks,
                                 dev, cfg.eval.user_chunk)
    if dataset.has_valid:
        ks = sorted(set(cfg.eval.ks) | {cfg.eval.select_k})
        out["valid"] = evaluate_model(model, make_features(cfg, dataset, model, False), dataset.num_items,
                                      dataset.train_csr(include_valid=False), dataset.valid_csr(), ks, dev,
                                      cfg.eval.user_chunk)
    if cfg.eval.popularity:
        out["popularity"] = evaluate_popularity(dataset.item_counts(), dataset.train_csr(), dataset.test_csr(),
                                                cfg.eval.ks, dev, cfg.eval.user_chunk)
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    if rank_and_world()[0] == 0:
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
