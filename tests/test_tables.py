"""Big tables: fp16 table weights (sharded, 1 and 2 gloo ranks, against an fp32 model whose weights
were rounded to fp16), the sharding plan printout, and tables larger than one device split by the
planner (dry runs with a small fake device memory)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.features import Features
from recsys.model import RetrievalTask, TwoTower

NUM_USERS, NUM_ITEMS, DIM = 60, 40, 8
BATCH, NEGS = 32, 8
LR, EPS, TEMP, STD, SEED = 0.1, 1e-8, 0.2, 0.3, 3
GIB = 1024**3
FP16_ULP = 2.0**-10  # fp16 keeps 10 mantissa bits: a rounded value is within this relative step


def global_batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, NUM_USERS, BATCH), rng.integers(0, NUM_ITEMS, BATCH), rng.integers(0, NUM_ITEMS, NEGS)


def export_ids(which: str, lo: int, hi: int):
    """Raw ids of table rows [lo, hi), as hashed ids give them: items: id = row + 5000; users: each
    even row has two ids (row + 1000, row + 100000), odd rows none."""
    rows = np.arange(lo, hi)
    if which == "items":
        return pa.array(rows + 5000), rows
    both = np.repeat(rows[rows % 2 == 0], 2)
    return pa.array(np.where(np.arange(len(both)) % 2 == 0, both + 1000, both + 100000)), both


def fp16_rank(sharding_types, out_dir: str):
    """On each rank: an fp16 and an fp32 sharded model from the same init; the fp16 one's weights,
    memory, forward, one training step, snapshot/restore, checkpoint round trip and export."""
    import torch.distributed as dist

    from recsys.exporter import export_model
    from recsys.parallelize import (describe_plan, destroy_distributed, gather_tables, init_distributed, init_tables,
                                    local_table_bytes, restore_weights, shard_model, snapshot_weights, table_weights)
    from recsys.training.checkpoint import load_checkpoint, save_checkpoint

    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size

    def build(dtype, types):
        task = RetrievalTask(TwoTower(NUM_USERS, NUM_ITEMS, DIM, normalize=True, table_dtype=dtype),
                             temperature=TEMP, mask_accidental_hits=True)
        dmp, optimizer, plan = shard_model(task, info.device, "rowwise_adagrad", LR, EPS, 1e-2, types)
        init_tables(dmp, STD, SEED)
        return dmp, optimizer, plan

    dmp32, _, _ = build("fp32", sharding_types)
    dmp, optimizer, plan = build("fp16", sharding_types)
    out = {"dtypes": sorted({str(w.dtype) for w in table_weights(dmp).values()}),
           "bytes16": local_table_bytes(dmp), "bytes32": local_table_bytes(dmp32), "plan": describe_plan(plan),
           "types": sorted({ps.sharding_type for mp in plan.plan.values() for ps in mp.values()})}
    out["before"] = {k: v.float() for k, v in gather_tables(dmp).items()}

    users, items, negatives = global_batch()
    b, n = BATCH // world, NEGS // world
    batch = Features().batch(users[rank * b:(rank + 1) * b],
                             np.concatenate([items[rank * b:(rank + 1) * b], negatives[rank * n:(rank + 1) * n]]))
    model = dmp.module.model
    with torch.no_grad():  # every rank asks for the same rows: each gets all vectors
        all_rows = Features().batch(np.arange(NUM_USERS), np.arange(NUM_ITEMS))
        out["user_vectors"], out["item_vectors"] = model.user_vectors(all_rows), model.item_vectors(all_rows)
    snapshot = snapshot_weights(dmp)
    loss, _ = dmp(batch)
    loss.backward()
    optimizer.step()
    losses = [None] * world
    dist.all_gather_object(losses, loss.item())
    out["loss"] = float(np.mean(losses))
    out["after"] = {k: v.float() for k, v in gather_tables(dmp).items()}
    out["after_dtypes"] = sorted({str(w.dtype) for w in table_weights(dmp).values()})

    # checkpoint: written under this plan, read into an fp16 model sharded table-wise
    save_checkpoint(Path(out_dir), 1, dmp, optimizer, None, {}, {}, 1)
    other, other_opt, _ = build("fp16", ["table_wise"])
    load_checkpoint(Path(out_dir) / "checkpoints" / "step_000000001", other, other_opt, load_best=False)
    out["reloaded"] = {k: v.float() for k, v in gather_tables(other).items()}

    restore_weights(dmp, snapshot)
    out["restored"] = {k: v.float() for k, v in gather_tables(dmp).items()}
    path = export_model(model, Features(), export_ids, NUM_USERS, NUM_ITEMS, Path(out_dir) / "export", info.device,
                        "test", chunk=7)  # chunks of 7 rows: ids cross many chunk boundaries
    out["export"] = str(path) if path else None
    destroy_distributed()
    return out


def rounded_reference():
    """The unsharded fp32 model with the same init rounded to fp16 (what the fp16 tables hold)."""
    from recsys.parallelize import init_tables

    model = TwoTower(NUM_USERS, NUM_ITEMS, DIM, normalize=True, device=torch.device("cpu"))
    init_tables(model, STD, SEED)
    tables = {name: t.weight for ebc in (model.user_ebc, model.item_ebc) for name, t in ebc.embedding_bags.items()}
    with torch.no_grad():
        for w in tables.values():
            w.copy_(w.half().float())
    return model, tables


@pytest.mark.parametrize("world_size,sharding_types", [(1, []), (2, ["row_wise"])])
def test_fp16_tables_train_and_match_an_fp32_model_rounded_to_fp16(tmp_path, ranks, world_size, sharding_types):
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from recsys.exporter import read_vectors

    outs = ranks(world_size, fp16_rank, sharding_types, str(tmp_path))
    out = outs[0]
    if sharding_types:
        assert out["types"] == sharding_types
    # stored in fp16: half the bytes of the same tables in fp32, on every rank
    assert out["dtypes"] == ["torch.float16"] and out["after_dtypes"] == ["torch.float16"]
    for o in outs:
        assert o["bytes16"] > 0 and 2 * o["bytes16"] == o["bytes32"]
    assert sum(o["bytes16"] for o in outs) == (NUM_USERS + NUM_ITEMS) * DIM * 2

    model, tables = rounded_reference()
    for name, w in tables.items():  # the init is the fp32 init rounded to nearest
        np.testing.assert_array_equal(out["before"][name], w.detach().numpy())

    # forward: the same numbers as fp32 arithmetic on the rounded weights (lookups accumulate in fp32)
    with torch.no_grad():
        all_rows = Features().batch(np.arange(NUM_USERS), np.arange(NUM_ITEMS))
        ref_users, ref_items = model.user_vectors(all_rows), model.item_vectors(all_rows)
    assert out["user_vectors"].dtype == np.float32 and out["item_vectors"].dtype == np.float32
    np.testing.assert_allclose(out["user_vectors"], ref_users.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["item_vectors"], ref_items.numpy(), rtol=1e-6, atol=1e-7)
    users, items, negatives = global_batch()
    loss, _ = RetrievalTask(model, temperature=TEMP, mask_accidental_hits=True)(
        Features().batch(users, np.concatenate([items, negatives])))
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-5)

    # one step: the fp32 RowWiseAdagrad step on the rounded weights, then stored to fp16
    loss.backward()
    RowWiseAdagrad(list(tables.values()), lr=LR, eps=EPS).step()
    for name, w in tables.items():
        ref = w.detach().numpy()
        moved = np.abs(ref - out["before"][name]).sum(1) > 0
        assert moved.any() and (np.abs(out["after"][name] - out["before"][name]).sum(1) > 0)[moved].all()
        np.testing.assert_allclose(out["after"][name], ref, rtol=FP16_ULP, atol=1e-6)
        np.testing.assert_array_equal(out["after"][name], out["after"][name].astype(np.float16).astype(np.float32))
        # the checkpoint (written under one plan, read under table_wise) gives the same fp16 rows back
        np.testing.assert_array_equal(out["reloaded"][name], out["after"][name])
        np.testing.assert_array_equal(out["restored"][name], out["before"][name])

    # export: float32 vectors, the fp16 model's own (the towers' outputs before the step)
    ids, vecs = read_vectors(Path(out["export"]), "users")
    want_ids, rows = export_ids("users", 0, NUM_USERS)
    assert vecs.dtype == np.float32 and ids == want_ids.to_pylist()  # each id once, in row order
    np.testing.assert_array_equal(vecs, out["user_vectors"][rows])
    _, vecs = read_vectors(Path(out["export"]), "items")
    np.testing.assert_array_equal(vecs, out["item_vectors"])

    # the plan printed at start: every table with its sharding type and ranks, the memory of every rank
    assert all(o["plan"] == out["plan"] for o in outs)  # every rank has the planner's placement
    lines = out["plan"].splitlines()
    for table in ("model.user_ebc.user", "model.item_ebc.item"):
        line = next(line for line in lines if line.strip().startswith(table + ":"))
        ranks = "[0, 1]" if sharding_types else "["
        assert " fp16 " in line and f"ranks={ranks}" in line and "kernel=fused" in line
    assert any(re.match(rf"\s+{world_size - 1 if world_size > 1 else 0}\s", line) or
               re.match(rf"\s+0-{world_size - 1}\s", line) for line in lines)


def train_tiny(dtype: str, data_dir: str):
    """A few epochs of the training loop (pipeline, fused RowWiseAdagrad) on the tiny synthetic data;
    returns the final loss and the gathered tables."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from recsys.data.batches import BatchOptions, TrainBatches
    from recsys.data.dataset import Dataset
    from recsys.parallelize import destroy_distributed, gather_tables, init_distributed, init_tables, shard_model

    info = init_distributed("cpu")
    torch.manual_seed(0)
    dataset = Dataset.load(Path(data_dir))
    users, items = dataset.fit_pairs()
    task = RetrievalTask(TwoTower(dataset.num_users, dataset.num_items, 16, normalize=True, table_dtype=dtype),
                         temperature=0.2, mask_accidental_hits=True)
    dmp, optimizer, _ = shard_model(task, info.device, "rowwise_adagrad", 0.3, 1e-8, 1e-3, [], 256)
    init_tables(dmp, 0.1, 0)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, info.device, execute_all_batches=True)
    losses = []
    for epoch in range(4):
        it = iter(TrainBatches(users, items, dataset.num_items, BatchOptions(256, 64, 0, info.rank, info.world_size), epoch))
        total, n = 0.0, 0
        while True:
            try:
                (loss,) = pipeline.progress(it)
            except StopIteration:
                break
            total, n = total + loss.item(), n + 1
        losses.append(total / n)
    tables = {k: v.float() for k, v in gather_tables(dmp).items()}
    destroy_distributed()
    return {"losses": losses, "tables": tables}


def recall_at(tables, dataset, k: int) -> float:
    """Exact recall@k of cosine scores with training items masked (numpy, all test users)."""
    u = tables["user"] / np.linalg.norm(tables["user"], axis=1, keepdims=True)
    v = tables["item"] / np.linalg.norm(tables["item"], axis=1, keepdims=True)
    scores = u @ v.T
    train, test = dataset.train_csr(), dataset.test_csr()
    rows = np.repeat(np.arange(dataset.num_users), np.diff(train.indptr))
    scores[rows, train.indices] = -np.inf
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    recalls = []
    for user in np.flatnonzero(np.diff(test.indptr)):
        truth = test.indices[test.indptr[user]:test.indptr[user + 1]]
        recalls.append(np.isin(truth, top[user]).sum() / min(k, len(truth)))
    return float(np.mean(recalls))


def test_fp16_training_metrics_are_close_to_fp32(tmp_path, ranks):
    from recsys.config import DataConfig
    from recsys.data.dataset import Dataset
    from recsys.data.prepare import prepare

    data_dir = prepare(DataConfig(root=str(tmp_path / "data"), num_users=500, num_items=200, num_interactions=10_000))
    dataset = Dataset.load(data_dir)
    fp32 = ranks(1, train_tiny, "fp32", str(data_dir))[0]
    fp16 = ranks(1, train_tiny, "fp16", str(data_dir))[0]
    assert fp16["losses"][-1] < fp16["losses"][0] - 0.2  # it learns
    np.testing.assert_allclose(fp16["losses"], fp32["losses"], rtol=0.01)
    r32, r16 = recall_at(fp32["tables"], dataset, 20), recall_at(fp16["tables"], dataset, 20)
    assert r32 > 0.1 and abs(r16 - r32) <= 0.01, (r16, r32)


# ---------------------------------------------------------------------------------------------
# The planner: every table printed, tables larger than one device split over ranks
# ---------------------------------------------------------------------------------------------


def meta_task(num_users, num_items, dim, dtype="fp32", **kw):
    from recsys.parallelize import fuse_table_optimizer

    task = RetrievalTask(TwoTower(num_users, num_items, dim, normalize=True, table_dtype=dtype, **kw))
    fuse_table_optimizer(task, "rowwise_adagrad", 0.1, 1e-8)
    return task


def test_plan_printout_lists_every_table_and_every_rank():
    from recsys.plan import dry_run

    task = meta_task(100_000, 20_000, 32, history_weight=0.5, share_item_table=False, item_history_weight=0.3)
    result = dry_run(task, 6, "cpu", [], 128, 2)
    text = result.plan_text
    names = {"model.user_ebc.user", "model.user_ebc.history", "model.item_ebc.item", "model.item_ebc.item_history"}
    assert {t.name for t in result.tables} == names
    for t in result.tables:
        line = next(line for line in text.splitlines() if line.strip().startswith(t.name + ":"))
        assert f": {t.sharding_type} kernel={t.compute_kernel} ranks={t.ranks}" in line
        assert f"{t.rows:,} x {t.dim} fp32" in line
    # the per-rank table covers ranks 0..5 (groups of consecutive equal ranks), totals add up
    rows = [line.split() for line in text.splitlines()[text.splitlines().index(next(
        line for line in text.splitlines() if line.strip().startswith("ranks"))) + 1:]]
    covered = []
    for row in rows[:-1]:
        first, _, last = row[0].partition("-")
        covered += list(range(int(first), int(last or first) + 1))
    assert covered == list(range(6))
    assert rows[-1][0] == "total" and int(rows[-1][1]) == sum(len(t.shards) for t in result.tables)


@pytest.mark.parametrize("dtype,sharding_types", [("fp32", []), ("fp32", ["row_wise"]), ("fp16", ["row_wise"])])
def test_a_table_larger_than_one_device_is_split_over_ranks(dtype, sharding_types):
    from recsys.plan import PlanError, dry_run

    hbm, ddr = int(0.5 * GIB), int(0.1 * GIB)  # host memory too small to offload the table to (UVM)
    users = 4_000_000 if dtype == "fp32" else 8_000_000  # 488 MiB of weights either way
    result = dry_run(meta_task(users, 100_000, 32, dtype), 4, "cuda", sharding_types, 256, 2, hbm_cap=hbm,
                     ddr_cap=ddr)
    user = next(t for t in result.tables if t.name == "model.user_ebc.user")
    weights = users * 32 * (2 if dtype == "fp16" else 4)
    assert weights > result.usable_hbm_per_rank  # no single device can hold it
    assert user.sharding_type in ("row_wise", "table_row_wise") and len(user.ranks) >= 2
    if sharding_types:
        assert user.sharding_type == "row_wise" and user.ranks == [0, 1, 2, 3]
    assert user.compute_kernel == "fused"  # in HBM, not offloaded to host memory
    assert sum(s.rows for s in user.shards) == users
    for rank in result.ranks:
        assert rank.hbm_bytes <= result.usable_hbm_per_rank and rank.ddr_bytes == 0
    # what the planner counts: the weights (2 or 4 bytes each) + RowWiseAdagrad's state, one value per row
    # (TorchRec counts it in the weights' type; FBGEMM keeps it in fp32: 2 bytes per row more with fp16)
    state = users * (2 if dtype == "fp16" else 4)
    assert weights + state <= sum(s.hbm_bytes for s in user.shards) <= 1.05 * (weights + state)
    assert f"{users:,} x 32 {dtype}" in result.plan_text
    # one device cannot hold it: a one-line error; with enough host memory it is offloaded there
    # (UVM: rows in host memory, read by the GPU)
    with pytest.raises(PlanError, match="on 1 cuda rank"):
        dry_run(meta_task(users, 100_000, 32, dtype), 1, "cuda", sharding_types, 256, 1, hbm_cap=hbm, ddr_cap=ddr)
    result = dry_run(meta_task(users, 100_000, 32, dtype), 1, "cuda", sharding_types, 256, 1, hbm_cap=hbm,
                     ddr_cap=GIB)
    user = next(t for t in result.tables if t.name == "model.user_ebc.user")
    # plain UVM, no HBM cache: in-place writes (init, spectral, restoring the best epoch) reach every row
    assert user.compute_kernel == "fused_uvm" and result.ranks[0].ddr_bytes >= weights


def test_cpu_table_larger_than_one_rank_goes_row_wise():
    from recsys.plan import dry_run

    ddr = GIB
    result = dry_run(meta_task(10_000_000, 100_000, 64), 4, "cpu", [], 256, 4, ddr_cap=ddr)
    user = next(t for t in result.tables if t.name == "model.user_ebc.user")
    assert user.rows * user.dim * 4 > result.usable_ddr_per_rank
    assert user.sharding_type == "row_wise" and user.ranks == [0, 1, 2, 3]
    assert all(r.ddr_bytes <= result.usable_ddr_per_rank and r.hbm_bytes == 0 for r in result.ranks)


def test_build_task_and_the_big_tables_experiment_use_fp16(config):
    from recsys.model import build_task
    from recsys.parallelize import table_weights

    cfg = config(["+experiment=big_tables"])
    assert cfg.model.table_dtype == "fp16" and "row_wise" in cfg.train.sharding_types
    task = build_task(cfg.model, cfg.loss, 100, 50)
    assert {str(w.dtype) for w in table_weights(task).values()} == {"torch.float16"}
