"""Sharded (gloo ranks) forward and training step against the unsharded single-process model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.data import make_batch
from recsys.loss import sampled_softmax_loss
from recsys.model import RetrievalTask, TwoTower
from tests.dist_utils import run_ranks

NUM_USERS, NUM_ITEMS, DIM = 60, 40, 8
BATCH, NEGS = 32, 8
LR, EPS, TEMP, STD, SEED = 0.1, 1e-8, 0.2, 0.3, 3


def global_batch():
    rng = np.random.default_rng(0)
    users = rng.integers(0, NUM_USERS, BATCH)
    items = rng.integers(0, NUM_ITEMS, BATCH)
    negatives = rng.integers(0, NUM_ITEMS, NEGS)
    return users, items, negatives


def sharded_step(sharding_type: str):
    from recsys.parallelize import destroy_distributed, gather_tables, init_distributed, init_tables, shard_model

    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    torch.manual_seed(0)
    model = TwoTower(NUM_USERS, NUM_ITEMS, DIM, normalize=True)
    task = RetrievalTask(model, TEMP, mask_accidental_hits=True)
    dmp, optimizer, plan = shard_model(task, info.device, "rowwise_adagrad", LR, EPS, 1e-3, [sharding_type])
    init_tables(dmp, STD, SEED)
    before = gather_tables(dmp)
    users, items, negatives = global_batch()
    b, n = BATCH // world, NEGS // world
    batch = make_batch(users[rank * b:(rank + 1) * b], items[rank * b:(rank + 1) * b], negatives[rank * n:(rank + 1) * n])
    loss, _ = dmp(batch)
    loss.backward()
    optimizer.step()
    after = gather_tables(dmp)
    losses = [None] * world
    torch.distributed.all_gather_object(losses, loss.item())
    types = sorted({ps.sharding_type for mp in plan.plan.values() for ps in mp.values()})
    destroy_distributed()
    return {"loss": float(np.mean(losses)), "before": before, "after": after, "types": types}


def reference_step():
    from recsys.parallelize import init_tables
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    model = TwoTower(NUM_USERS, NUM_ITEMS, DIM, normalize=True, device=torch.device("cpu"))
    init_tables(model, STD, SEED)
    before = {k: v.detach().clone() for k, v in
              {"user": model.user_ebc.embedding_bags["user"].weight, "item": model.item_ebc.embedding_bags["item"].weight}.items()}
    opt = RowWiseAdagrad(model.parameters(), lr=LR, eps=EPS)
    users, items, negatives = global_batch()
    batch = make_batch(users, items, negatives)
    u = model.user_vectors(batch.users)
    v = model.item_vectors(batch.items)
    loss = sampled_softmax_loss(u, v, batch.user_ids, batch.item_ids, TEMP, True)
    loss.backward()
    opt.step()
    after = {"user": model.user_ebc.embedding_bags["user"].weight.detach(), "item": model.item_ebc.embedding_bags["item"].weight.detach()}
    return {"loss": loss.item(), "before": before, "after": after}


@pytest.mark.parametrize("world_size,sharding_type", [
    (1, "table_wise"),
    (2, "table_wise"),
    (2, "row_wise"),
    (2, "column_wise"),
    (2, "table_row_wise"),
    (2, "table_column_wise"),
])
def test_sharded_step_matches_unsharded(world_size, sharding_type):
    ref = reference_step()
    out = run_ranks(sharded_step, world_size, sharding_type)[0]
    assert out["types"] == [sharding_type]
    for name in ("user", "item"):
        torch.testing.assert_close(torch.from_numpy(out["before"][name]), ref["before"][name])
    assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for name in ("user", "item"):
        moved = (ref["after"][name] - ref["before"][name]).abs().sum(1) > 0
        assert moved.any()
        torch.testing.assert_close(torch.from_numpy(out["after"][name]), ref["after"][name], rtol=1e-5, atol=1e-6)
