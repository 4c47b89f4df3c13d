"""Export with ``data.id_mapping=hash``: every raw id seen in training is exported with the vector of
its hashed row, whether the data were read in memory or streamed, at the end of training and from
the checkpoint (``export.source=checkpoint``); the collision rate is in metrics.json and in the
export manifest.

The reference is independent of the export code: the table weights read straight from the
checkpoint's DCP files (``dcp_to_torch_save``), the rows from ``recsys.data.hashing.hash_rows``, the ids
from the source log, the collision rate by a Python set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from recsys.config import ExportConfig
from recsys.data.hashing import hash_rows
from recsys.export import export_checkpoint
from recsys.exporter import read_vectors
from recsys.training.checkpoint import latest_checkpoint

NUM_USERS, NUM_ITEMS = 64, 60  # table rows: fewer than the distinct ids, so rows are shared


def write_log(path: Path) -> pa.Table:
    """120 sparse integer user ids x 80 string item ids, 40 distinct items per user: every id has
    training rows under either split."""
    rng = np.random.default_rng(0)
    users = 10_000 + 13 * np.arange(120, dtype=np.int64) ** 2
    items = np.array([f"sku-{k}" for k in range(80)])
    u = np.repeat(users, 40)
    i = np.concatenate([rng.choice(80, 40, replace=False) for _ in users])
    table = pa.table({"user_id": pa.array(u), "item_id": pa.array(items[i])})
    pq.write_table(table, path, row_group_size=1000)
    return table


def train_args(tmp_path: Path, log: Path, loader: str) -> list:
    return ["+experiment=tiny", "data=parquet", f"data.path={log}", f"data.root={tmp_path / 'data'}",
            f"data.loader={loader}", "data.row_group_size=500", "data.id_mapping=hash", f"data.num_users={NUM_USERS}",
            f"data.num_items={NUM_ITEMS}", "model=mf", "model.embedding_dim=8", "model.normalize=false",
            "train.max_steps=8", "train.batch_size=128", "loss.num_negatives=16", "train.progress=false",
            "log.plots=false", "export.npy=true"]


def checkpoint_tables(run_dir: Path, tmp_path: Path) -> dict:
    """The user and item table weights of the run's newest checkpoint, read from its DCP files."""
    out = tmp_path / f"{run_dir.name}.pt"
    dcp_to_torch_save(str(latest_checkpoint(run_dir)), str(out))
    model = torch.load(out, weights_only=False)["model"]
    return {which: model[f"model.{which}_ebc.embedding_bags.{which}.weight"].float().numpy()
            for which in ("user", "item")}


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_hash_mode_exports_every_raw_id_with_its_rows_vector(tmp_path, train_here, in_process, loader):
    log = write_log(tmp_path / "log.parquet")
    run_dir = tmp_path / "run"
    metrics = train_here(train_args(tmp_path, tmp_path / "log.parquet", loader), run_dir)
    assert metrics["data"]["loader"] == loader
    prepared = json.loads((Path(metrics["data"]["path"]) / "manifest.json").read_text())
    seed = prepared["config"]["seed"]
    tables = checkpoint_tables(run_dir, tmp_path)
    export_manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert export_manifest["id_mapping"] == "hash"

    for which, column, n in (("user", "user_id", NUM_USERS), ("item", "item_id", NUM_ITEMS)):
        ids, vecs = read_vectors(run_dir / "export", f"{which}s")
        want_ids = sorted(set(log[column].to_pylist()))
        assert sorted(ids) == want_ids and len(ids) == len(want_ids)  # each distinct raw id once
        rows = hash_rows(pa.array(ids, log[column].type), seed, n)
        assert len(set(rows.tolist())) < len(ids)  # rows are shared: the export is per id, not per row
        np.testing.assert_array_equal(vecs, tables[which][rows])
        # the .npy serving files: the same ids and vectors, row for row
        assert np.load(run_dir / "export" / f"{which}s_ids.npy").tolist() == ids
        np.testing.assert_array_equal(np.load(run_dir / "export" / f"{which}s.npy"), vecs)
        # the collision rate: in metrics.json and the export manifest, as a set counts it
        rate = 1 - len(set(rows.tolist())) / len(ids)
        for where in (metrics["data"]["hash"], export_manifest["hash"]):
            assert where[f"{which}s"]["distinct_ids"] == len(ids)
            assert where[f"{which}s"]["collision_rate"] == pytest.approx(rate, abs=1e-12)

    # export.source=checkpoint: the same files from the checkpoint alone
    again = tmp_path / "again"
    ckpt = latest_checkpoint(run_dir)
    shutil.copytree(ckpt, again / "checkpoints" / ckpt.name)
    in_process(export_checkpoint, again, ExportConfig(npy=True))
    for name in ("users", "items"):
        ids, vecs = read_vectors(again / "export", name)
        ref_ids, ref_vecs = read_vectors(run_dir / "export", name)
        assert ids == ref_ids
        np.testing.assert_array_equal(vecs, ref_vecs)
    assert json.loads((again / "export" / "manifest.json").read_text())["hash"] == export_manifest["hash"]
