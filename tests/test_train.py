"""The real train() on tiny configs: one process and two ranks agree, files in and out, a two-tower
model with validation and early stopping on 2 ranks checked against numpy, options that do nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from recsys.distributed import rank_bounds
from recsys.exporter import read_vectors

KS = (10, 20, 50)


def check_run_dir(run_dir: Path, world_size: int) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for part in ("test", "popularity"):
        for k in KS:
            for m in ("recall", "ndcg"):
                assert 0.0 <= metrics[part][f"{m}@{k}"] <= 1.0
    assert metrics["train"]["steps"] > 0 and metrics["train"]["interactions_per_s"] > 0
    assert metrics["train"]["world_size"] == world_size
    data = Path(metrics["data"]["path"])
    items = ds.dataset(run_dir / "export" / "items").to_table()
    vocab = pq.read_table(data / "items.parquet")["item_id"]
    assert items.num_rows == metrics["data"]["num_items"] and items["item_id"].to_pylist() == vocab.to_pylist()
    assert items.schema.field("item_id").type == vocab.type  # raw string ids stay strings
    ids, vectors = read_vectors(run_dir / "export", "items")
    assert vectors.shape == (len(ids), 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    users = ds.dataset(run_dir / "export" / "users").to_table()
    assert users.num_rows == metrics["data"]["num_users"]
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["dimension"] == 16 and manifest["normalized"] is True and manifest["config_hash"]
    for name in ("users", "items"):  # a part per rank, the rows of each
        parts = manifest["parts"][name]
        assert parts == [f"{name}/part-{r:05d}.parquet" for r in range(world_size)]
        assert [manifest["files"][p]["rows"] for p in parts] == np.diff(rank_bounds(manifest[f"num_{name}"], world_size)).tolist()
    return metrics


def test_one_process_and_two_ranks_agree(tiny_run, tiny_run_two_ranks):
    m1, m2 = check_run_dir(tiny_run, 1), check_run_dir(tiny_run_two_ranks, 2)
    # Same global batches, negatives and (sharding-independent) initial weights: the 2-rank
    # row-wise run and the 1-rank run train the same model up to float summation order.
    assert m2["train"]["steps"] == m1["train"]["steps"]
    for k in KS:
        assert m2["test"][f"recall@{k}"] == pytest.approx(m1["test"][f"recall@{k}"], abs=0.01)
        assert m2["popularity"][f"recall@{k}"] == pytest.approx(m1["popularity"][f"recall@{k}"], abs=1e-9)
    np.testing.assert_allclose([h["loss"] for h in m2["train"]["history"]],
                               [h["loss"] for h in m1["train"]["history"]], rtol=1e-3)


def test_parquet_input_end_to_end(tmp_path, train_here):
    # A user's log: string user ids, int item ids, a timestamp column under another name.
    rng = np.random.default_rng(0)
    n = 4000
    users = np.array([f"user-{u}" for u in rng.integers(0, 150, n)])
    items = (rng.zipf(1.3, n) % 80) * 1000 + 7
    log = tmp_path / "logs"
    log.mkdir()
    for part in range(2):  # a directory of files
        sl = slice(part * n // 2, (part + 1) * n // 2)
        pq.write_table(pa.table({"uid": users[sl], "sku": items[sl], "ts": np.arange(n)[sl]}), log / f"part-{part}.parquet")
    run_dir = tmp_path / "run"
    metrics = train_here(["data=parquet", f"data.path={log}", "data.user_column=uid", "data.item_column=sku",
                          "data.timestamp_column=ts", "data.split=temporal", f"data.root={tmp_path / 'data'}",
                          "model.embedding_dim=8", "train.epochs=1", "train.batch_size=128", "loss.num_negatives=16",
                          "train.progress=false", "log.plots=false"], run_dir)
    assert metrics == json.loads((run_dir / "metrics.json").read_text())
    dropped = metrics["data"]["dropped"]
    assert metrics["data"]["train_interactions"] + metrics["data"]["test_interactions"] + sum(dropped.values()) == n
    ids, vectors = read_vectors(run_dir / "export", "users")
    assert all(isinstance(i, str) and i.startswith("user-") for i in ids) and vectors.shape[1] == 8
    ids, _ = read_vectors(run_dir / "export", "items")
    assert all(isinstance(i, int) and i % 1000 == 7 for i in ids)


def write_clustered_lightgcn(directory: Path):
    """A LightGCN-format directory with clustered tastes: user u mostly picks items i with i % 5 == u % 5."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    train_lines, test_lines, train_pairs = [], [], set()
    for u in range(240):
        pool = np.array([i for i in range(120) if i % 5 == u % 5])
        picks = list(rng.choice(pool, 14, replace=False)) + list(rng.choice(120, 2, replace=False))
        picks = list(dict.fromkeys(int(i) for i in picks))
        train_lines.append(" ".join(map(str, [u, *picks[:-3]])))
        test_lines.append(" ".join(map(str, [u, *picks[-3:]])))
        train_pairs |= {(u, i) for i in picks[:-3]}
    (directory / "train.txt").write_text("\n".join(train_lines) + "\n")
    (directory / "test.txt").write_text("\n".join(test_lines) + "\n")
    return train_pairs, test_lines


def test_two_tower_on_lightgcn_files_with_validation_two_ranks(tmp_path, two_ranks, train_here):
    train_pairs, test_lines = write_clustered_lightgcn(tmp_path / "lg")
    run_dir = tmp_path / "run"
    two_ranks(train_here, ["data=lightgcn", f"data.path={tmp_path / 'lg'}", "data.valid_fraction=0.2",
                           f"data.root={tmp_path / 'data'}", "model=two_tower", "model.embedding_dim=16",
                           "model.history_max_len=8", "train.epochs=6", "train.patience=2", "train.batch_size=128",
                           "loss.num_negatives=32", "optim.lr=0.1", "eval.ks=[5,20]", "eval.test_every_epoch=true",
                           "train.progress=false", "log.plots=false"], str(run_dir))
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
    user_ids, user_vecs = read_vectors(run_dir / "export", "users")
    item_ids, item_vecs = read_vectors(run_dir / "export", "items")
    scores = user_vecs @ item_vecs.T
    col = {i: c for c, i in enumerate(item_ids)}
    for u, i in train_pairs:
        scores[user_ids.index(u), col[i]] = -np.inf
    recalls = []
    for line in test_lines:
        u, *items = map(int, line.split())
        top = {item_ids[c] for c in np.argsort(-scores[user_ids.index(u)], kind="stable")[:20]}
        recalls.append(len(top & set(items)) / len(items))
    # float32 dot products of the exported vectors vs the evaluator's blocks: ties may order differently
    assert np.mean(recalls) == pytest.approx(m["test"]["recall@20"], abs=2e-3)


def test_options_that_do_nothing_are_logged_once(tmp_path, caplog, train_here, tiny):
    with caplog.at_level(logging.WARNING, logger="recsys"):
        train_here(tiny(tmp_path / "data", "loss=sampled_softmax", "loss.name=bpr", "train.max_steps=2",
                        "model.history_weight=0.9", "log.plots=false", "export.enabled=false",
                        "eval.popularity=false"), tmp_path / "run")
    for option in ("loss.logq_correction=true", "loss.mask_accidental_hits=true", "model.history_weight=0.9"):
        assert caplog.text.count(f"{option} does nothing") == 1, caplog.text
