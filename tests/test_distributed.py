"""Sharded (gloo ranks) forward and training step against the unsharded single-process model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.data.dataset import CSR
from recsys.data.features import Features
from recsys.model import RetrievalTask, TwoTower

NUM_USERS, NUM_ITEMS, DIM = 60, 40, 8
BATCH, NEGS = 32, 8
LR, EPS, TEMP, STD, SEED = 0.1, 1e-8, 0.2, 0.3, 3


# model variants: matrix factorisation; history bag in the item table; in its own table + projection
VARIANTS = {
    "mf": {},
    "history_shared": {"history_weight": 0.5, "share_item_table": True},
    "history_table_projection": {"history_weight": 0.3, "share_item_table": False, "projection": True},
    "both_histories": {"history_weight": 0.8, "share_item_table": True, "item_history_weight": 0.5},
}


def global_batch():
    rng = np.random.default_rng(0)
    users = rng.integers(0, NUM_USERS, BATCH)
    items = rng.integers(0, NUM_ITEMS, BATCH)
    negatives = rng.integers(0, NUM_ITEMS, NEGS)
    return users, items, negatives


def features(variant: str) -> Features:
    kw = VARIANTS[variant]
    if not kw:
        return Features()
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 6, NUM_USERS)  # some users with an empty history
    indices = rng.integers(0, NUM_ITEMS, lengths.sum())
    item_history = None
    if kw.get("item_history_weight"):
        item_lengths = rng.integers(0, 5, NUM_ITEMS)
        item_history = CSR(np.concatenate([[0], np.cumsum(item_lengths)]), rng.integers(0, NUM_USERS, item_lengths.sum()))
    return Features(CSR(np.concatenate([[0], np.cumsum(lengths)]), indices), kw["share_item_table"],
                    item_history=item_history)


def table_params(model):
    return {name: t.weight for ebc in (model.user_ebc, model.item_ebc) for name, t in ebc.embedding_bags.items()}


def sharded_step(sharding_type: str, variant: str):
    from recsys.parallelize import destroy_distributed, gather_tables, init_distributed, init_tables, shard_model

    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    torch.manual_seed(0)
    model = TwoTower(NUM_USERS, NUM_ITEMS, DIM, normalize=True, **VARIANTS[variant])
    task = RetrievalTask(model, temperature=TEMP, mask_accidental_hits=True)
    dmp, optimizer, plan = shard_model(task, info.device, "rowwise_adagrad", LR, EPS, 1e-2, [sharding_type])
    init_tables(dmp, STD, SEED)
    dmp.module.model.reset_dense_parameters()
    before = gather_tables(dmp)
    users, items, negatives = global_batch()
    b, n = BATCH // world, NEGS // world
    batch = features(variant).batch(users[rank * b:(rank + 1) * b],
                                    np.concatenate([items[rank * b:(rank + 1) * b], negatives[rank * n:(rank + 1) * n]]))
    loss, _ = dmp(batch)
    loss.backward()
    optimizer.step()
    after = gather_tables(dmp)
    losses = [None] * world
    torch.distributed.all_gather_object(losses, loss.item())
    types = sorted({ps.sharding_type for mp in plan.plan.values() for ps in mp.values()})
    projection = dmp.module.model.projection
    projection = None if projection is None else projection.weight.detach().clone()
    destroy_distributed()
    return {"loss": float(np.mean(losses)), "before": before, "after": after, "types": types, "projection": projection}


def reference_step(variant: str):
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from recsys.parallelize import init_tables

    model = TwoTower(NUM_USERS, NUM_ITEMS, DIM, normalize=True, device=torch.device("cpu"), **VARIANTS[variant])
    init_tables(model, STD, SEED)
    model.reset_dense_parameters()
    before = {k: v.detach().clone() for k, v in table_params(model).items()}
    opt = RowWiseAdagrad(list(table_params(model).values()), lr=LR, eps=EPS)
    dense = torch.optim.Adam(model.projection.parameters(), lr=1e-2) if model.projection is not None else None
    users, items, negatives = global_batch()
    batch = features(variant).batch(users, np.concatenate([items, negatives]))
    loss, _ = RetrievalTask(model, temperature=TEMP, mask_accidental_hits=True)(batch)
    loss.backward()
    opt.step()
    if dense:
        dense.step()
    after = {k: v.detach() for k, v in table_params(model).items()}
    projection = None if model.projection is None else model.projection.weight.detach()
    return {"loss": loss.item(), "before": before, "after": after, "projection": projection}


@pytest.mark.parametrize("world_size,sharding_type,variant", [
    (1, "table_wise", "mf"),
    (2, "table_wise", "mf"),
    (2, "row_wise", "mf"),
    (2, "column_wise", "mf"),
    (2, "table_row_wise", "mf"),
    (2, "table_column_wise", "mf"),
    (2, "row_wise", "history_shared"),
    (2, "table_wise", "history_shared"),
    (2, "column_wise", "history_table_projection"),
    (2, "row_wise", "both_histories"),
])
def test_sharded_step_matches_unsharded(ranks, world_size, sharding_type, variant):
    ref = reference_step(variant)
    out = ranks(world_size, sharded_step, sharding_type, variant)[0]
    assert out["types"] == [sharding_type]
    assert sorted(out["before"]) == sorted(ref["before"])
    for name in ref["before"]:
        torch.testing.assert_close(torch.from_numpy(out["before"][name]), ref["before"][name])
    assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    if ref["projection"] is not None:
        assert not torch.equal(ref["projection"], torch.eye(DIM))
        torch.testing.assert_close(torch.from_numpy(out["projection"]), ref["projection"], rtol=1e-5, atol=1e-6)
    for name in ref["before"]:
        moved = (ref["after"][name] - ref["before"][name]).abs().sum(1) > 0
        assert moved.any()
        torch.testing.assert_close(torch.from_numpy(out["after"][name]), ref["after"][name], rtol=1e-5, atol=1e-6)


def gather_on_this_rank(sizes):
    """gather_padded of this rank's block (rows 100 * rank + 0, 1, ...), everywhere and on rank 0."""
    from recsys.distributed import gather_padded
    from recsys.parallelize import destroy_distributed, init_distributed

    info = init_distributed("cpu")
    block = (torch.arange(sizes[info.rank] * 2, dtype=torch.float32).reshape(-1, 2) + 100 * info.rank)
    out = {"everywhere": gather_padded(block, sizes), "rank0": gather_padded(block, sizes, dst=0)}
    destroy_distributed()
    return out


@pytest.mark.parametrize("sizes", [[3, 5], [5, 3], [0, 4], [4, 0], [4, 4]])
def test_gather_padded_concatenates_uneven_blocks(ranks, sizes):
    want = np.concatenate([np.arange(n * 2, dtype=np.float32).reshape(-1, 2) + 100 * r for r, n in enumerate(sizes)])
    out = ranks(2, gather_on_this_rank, sizes)
    for rank, got in enumerate(out):
        np.testing.assert_array_equal(got["everywhere"], want)
        assert (got["rank0"] is None) == (rank == 1)
    np.testing.assert_array_equal(out[0]["rank0"], want)
