"""The real entry point on a tiny config: one process, two gloo ranks under torchrun, a sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.export import read_vectors
from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
KS = (10, 20, 50)


def run(args, tmp_path, env_extra=None, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tiny(tmp_path, run_dir):
    return ["+experiment=tiny", f"data.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}", "train.progress=false"]


def check_run_dir(run_dir: Path, world_size: int) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for part in ("test", "popularity"):
        for k in KS:
            for m in ("recall", "ndcg"):
                assert 0.0 <= metrics[part][f"{m}@{k}"] <= 1.0
    assert metrics["train"]["steps"] > 0 and metrics["train"]["interactions_per_s"] > 0
    assert metrics["train"]["world_size"] == world_size
    assert (run_dir / ".hydra" / "config.yaml").exists()
    data = Path(metrics["data"]["path"])
    items = pq.read_table(run_dir / "export" / "items.parquet")
    vocab = pq.read_table(data / "items.parquet")["item_id"]
    assert items.num_rows == metrics["data"]["num_items"] and items["item_id"].to_pylist() == vocab.to_pylist()
    assert items.schema.field("item_id").type == vocab.type  # raw string ids stay strings
    ids, vectors = read_vectors(run_dir / "export" / "items.parquet")
    assert vectors.shape == (len(ids), 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    users = pq.read_table(run_dir / "export" / "users.parquet")
    assert users.num_rows == metrics["data"]["num_users"]
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["dimension"] == 16 and manifest["normalized"] is True and manifest["config_hash"]
    return metrics


def test_one_process_and_two_ranks_agree(tmp_path):
    one = tmp_path / "one"
    run([sys.executable, "-m", "recsys.train", *tiny(tmp_path, one)], tmp_path)
    m1 = check_run_dir(one, 1)

    two = tmp_path / "two"
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "recsys.train", *tiny(tmp_path, two), "train.sharding_types=[row_wise]"], tmp_path)
    m2 = check_run_dir(two, 2)
    assert "recall@20" in out.stdout and "popularity" in out.stdout
    # Same global batches, negatives and (sharding-independent) initial weights: the 2-rank
    # row-wise run and the 1-rank run train the same model up to float summation order.
    assert m2["train"]["steps"] == m1["train"]["steps"]
    for k in KS:
        assert m2["test"][f"recall@{k}"] == pytest.approx(m1["test"][f"recall@{k}"], abs=0.01)
        assert m2["popularity"][f"recall@{k}"] == pytest.approx(m1["popularity"][f"recall@{k}"], abs=1e-9)
    np.testing.assert_allclose([h["loss"] for h in m2["train"]["history"]],
                               [h["loss"] for h in m1["train"]["history"]], rtol=1e-3)


def test_cfg_job_prints_config_and_bad_config_exits_cleanly(tmp_path):
    out = run([sys.executable, "-m", "recsys.train", "--cfg", "job", "model.embedding_dim=32"], tmp_path)
    assert "embedding_dim: 32" in out.stdout and "batch_size:" in out.stdout
    bad = run([sys.executable, "-m", "recsys.train", *tiny(tmp_path, tmp_path / "bad"), "eval.ks=[10,5000]"],
              tmp_path, check=False)
    assert bad.returncode != 0 and "larger than the number of items" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_multirun_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    run([sys.executable, "-m", "recsys.train", "-m", "+experiment=tiny", f"data.root={tmp_path / 'data'}",
         "train.progress=false", "train.max_steps=5", "export.enabled=false", "model.embedding_dim=8,16",
         f"hydra.sweep.dir={sweep}"], tmp_path)
    dims = []
    for sub in ("0", "1"):
        metrics = json.loads((sweep / sub / "metrics.json").read_text())
        assert metrics["train"]["steps"] == 5
        dims.append((sweep / sub / ".hydra" / "overrides.yaml").read_text())
    assert "model.embedding_dim=8" in dims[0] and "model.embedding_dim=16" in dims[1]


def test_parquet_input_end_to_end(tmp_path):
    # A user's log: string user ids, int item ids, a timestamp column under another name.
    rng = np.random.default_rng(0)
    n = 4000
    users = np.array([f"user-{u}" for u in rng.integers(0, 150, n)])
    items = (rng.zipf(1.3, n) % 80) * 1000 + 7
    import pyarrow as pa

    log = tmp_path / "logs"
    log.mkdir()
    for part in range(2):  # a directory of files
        sl = slice(part * n // 2, (part + 1) * n // 2)
        pq.write_table(pa.table({"uid": users[sl], "sku": items[sl], "ts": np.arange(n)[sl]}), log / f"part-{part}.parquet")
    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "recsys.train", "data=parquet", f"data.path={log}", "data.user_column=uid",
         "data.item_column=sku", "data.timestamp_column=ts", "data.split=temporal", f"data.root={tmp_path / 'data'}",
         "model.embedding_dim=8", "train.epochs=1", "train.batch_size=128", "loss.num_negatives=16",
         "train.progress=false", f"hydra.run.dir={run_dir}"], tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    dropped = metrics["data"]["dropped"]
    assert metrics["data"]["train_interactions"] + metrics["data"]["test_interactions"] + sum(dropped.values()) == n
    ids, vectors = read_vectors(run_dir / "export" / "users.parquet")
    assert all(isinstance(i, str) and i.startswith("user-") for i in ids) and vectors.shape[1] == 8
    ids, _ = read_vectors(run_dir / "export" / "items.parquet")
    assert all(isinstance(i, int) and i % 1000 == 7 for i in ids)


def test_two_tower_on_lightgcn_files_with_validation_two_ranks(tmp_path):
    # A LightGCN-format directory with clustered tastes: user u mostly picks items i with i % 5 == u % 5.
    rng = np.random.default_rng(0)
    lg = tmp_path / "lg"
    lg.mkdir()
    train_lines, test_lines, train_pairs = [], [], set()
    for u in range(240):
        pool = np.array([i for i in range(120) if i % 5 == u % 5])
        picks = list(rng.choice(pool, 14, replace=False)) + list(rng.choice(120, 2, replace=False))
        picks = list(dict.fromkeys(int(i) for i in picks))
        train_lines.append(" ".join(map(str, [u, *picks[:-3]])))
        test_lines.append(" ".join(map(str, [u, *picks[-3:]])))
        train_pairs |= {(u, i) for i in picks[:-3]}
    (lg / "train.txt").write_text("\n".join(train_lines) + "\n")
    (lg / "test.txt").write_text("\n".join(test_lines) + "\n")

    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "recsys.train", "data=lightgcn", f"data.path={lg}", "data.valid_fraction=0.2",
         f"data.root={tmp_path / 'data'}", "model=two_tower", "model.embedding_dim=16", "model.history_max_len=8",
         "train.epochs=6", "train.patience=2", "train.batch_size=128", "loss.num_negatives=32", "optim.lr=0.1",
         "eval.ks=[5,20]", "eval.test_every_epoch=true", "train.progress=false", f"hydra.run.dir={run_dir}"], tmp_path)
    m = json.loads((run_dir / "metrics.json").read_text())
    hist = m["train"]["history"]
    valid = [h["valid"]["recall@20"] for h in hist]
    # the epoch is selected on the validation split, and its weights are the ones tested and exported
    assert m["selected_epoch"] == int(np.argmax(valid)) and m["valid"] == hist[m["selected_epoch"]]["valid"]
    for key in ("recall@5", "recall@20", "ndcg@20"):
        assert m["test"][key] == pytest.approx(hist[m["selected_epoch"]]["test"][key], abs=1e-9)
    assert m["test"]["recall@20"] > 1.5 * m["popularity"]["recall@20"]
    assert m["data"]["valid_interactions"] > 0

    # The exported vectors alone give the score: brute-force numpy Recall@20 from the export files.
    user_ids, user_vecs = read_vectors(run_dir / "export" / "users.parquet")
    item_ids, item_vecs = read_vectors(run_dir / "export" / "items.parquet")
    scores = user_vecs @ item_vecs.T
    col = {i: c for c, i in enumerate(item_ids)}
    for u, i in train_pairs:
        scores[user_ids.index(u), col[i]] = -np.inf
    recalls = []
    for line in test_lines:
        u, *items = map(int, line.split())
        top = {item_ids[c] for c in np.argsort(-scores[user_ids.index(u)], kind="stable")[:20]}
        recalls.append(len(top & set(items)) / len(items))
    assert np.mean(recalls) == pytest.approx(m["test"]["recall@20"], abs=2e-3)
