"""No rank holds the world: the export is written a part per rank (recsys/exporter.py).

A run trained on one rank is exported again from its checkpoint on two ranks: the two-rank
export has two parts per table, and read back (our reader, pyarrow.dataset, DuckDB) it holds the
one-rank export's ids in the same order with the same vectors; its .npy files and manifest agree.
For an MF model, a two-tower model with history bags and hashed ids. A job killed at its end
leaves no export a reader would take, and its rerun completes."""

import hashlib
import json
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from recsys.config import ExportConfig
from recsys.export import export_checkpoint
from recsys.exporter import read_vectors
from recsys.training.checkpoint import MARKER, latest_checkpoint


def write_log(path: Path, seed: int = 0) -> None:
    """An interaction log with string user ids and integer item ids."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 400, 6000)
    items = (rng.zipf(1.3, 6000) % 300) * 11
    pq.write_table(pa.table({"user_id": pa.array([f"u{u}" for u in users]), "item_id": pa.array(items)}), path)


KINDS = {
    "mf": ["model=mf"],
    "two_tower_bags": ["model=two_tower", "model.history_weight=0.5", "model.share_item_table=false"],
    "hash": ["data=parquet", "data.id_mapping=hash", "data.num_users=256", "data.num_items=128", "model=mf"],
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_two_ranks_export_what_one_rank_exports(kind, tmp_path, data_root, tiny, train_here, two_ranks):
    extra = list(KINDS[kind])
    if kind == "hash":
        write_log(tmp_path / "log.parquet")
        extra.append(f"data.path={tmp_path / 'log.parquet'}")
    run_dir = tmp_path / "run"
    train_here(tiny(data_root, *extra, "train.epochs=1", "export.npy=true", "log.plots=false"), run_dir)
    again = tmp_path / "again"
    ckpt = latest_checkpoint(run_dir)
    shutil.copytree(ckpt, again / "checkpoints" / ckpt.name)
    two_ranks(export_checkpoint, again, ExportConfig(npy=True), "cpu")

    one = json.loads((run_dir / "export" / "manifest.json").read_text())
    two = json.loads((again / "export" / "manifest.json").read_text())
    assert one["layout"] == two["layout"] == "parts"
    for name in ("users", "items"):
        assert one["parts"][name] == [f"{name}/part-00000.parquet"]
        assert two["parts"][name] == [f"{name}/part-00000.parquet", f"{name}/part-00001.parquet"]
        assert two[f"num_{name}"] == one[f"num_{name}"] == sum(two["files"][p]["rows"] for p in two["parts"][name])
        ids, vecs = read_vectors(run_dir / "export", name)
        ids2, vecs2 = read_vectors(again / "export", name)
        assert ids2 == ids  # the same raw ids in the same order (the parts in rank order)
        # MF: the same rows looked up; bags: the same float32 sums in another order. Unit vectors,
        # bags of at most ~100 rows: a few float32 ulps of 1 (2^-23 each) at most.
        np.testing.assert_allclose(vecs2, vecs, rtol=0, atol=64 * 2.0**-23)
        if kind == "mf" or kind == "hash":
            np.testing.assert_array_equal(vecs2, vecs)
        # the directory is one table for pyarrow.dataset and DuckDB
        table = ds.dataset(again / "export" / name, format="parquet").to_table()
        id_column = "user_id" if name == "users" else "item_id"
        assert table[id_column].to_pylist() == ids
        np.testing.assert_array_equal(np.stack(table["vector"].to_numpy(zero_copy_only=False)), vecs2)
        pattern = str(again / "export" / name / "*.parquet")
        [(count, distinct)] = duckdb.sql(f"select count(*), count(distinct {id_column}) "
                                         f"from read_parquet('{pattern}')").fetchall()
        assert count == len(ids) and distinct == len(set(ids))
        # the .npy files, streamed from the parts, row for row
        np.testing.assert_array_equal(np.load(again / "export" / f"{name}.npy"), vecs2)
        assert np.load(again / "export" / f"{name}_ids.npy").tolist() == ids
    if kind == "hash":
        assert two["id_mapping"] == "hash" and two["hash"] == one["hash"]
    assert [p.name for p in again.iterdir() if p.name.startswith(".")] == [".export.lock"]  # no staging left


STEPS = 40  # the killed job's training steps (its final checkpoint: step 40)


def train_stopping_in(train_here, where: str, marker: str, overrides, run_dir: str):
    """``train_here(overrides, run_dir)`` on this rank, stopping for good (until killed) in `where`:
    ``closed form``: inside the stacking, its distributed SVD done; ``export``: every part written,
    before rank 0 commits the directory. Writes `marker` when it stops there."""
    import recsys.exporter
    import recsys.stack

    def stop(*args, **kwargs):
        Path(marker).write_text(where)
        while True:
            time.sleep(1)

    if where == "closed form":
        compute = recsys.stack.spectral_vectors
        recsys.stack.spectral_vectors = lambda *a, **k: stop(compute(*a, **k))
    else:
        recsys.exporter.Staging.commit = stop
    return train_here(overrides, run_dir)


@pytest.mark.parametrize("where", ["closed form", "export"])
def test_a_job_killed_at_its_end_leaves_no_half_export_and_the_rerun_completes(where, tmp_path, data_root, tiny,
                                                                               train_here, two_ranks, start_ranks):
    """Killed (SIGKILL, both ranks) inside the stacked closed form or with every part written but
    not committed: no export directory a reader would take, and the rerun (resuming from the final
    checkpoint) stacks and exports."""
    overrides = tiny(data_root, "data.valid_fraction=0.1", "model.stack_spectral_dim=16", "train.epochs=3",
                     f"train.max_steps={STEPS}", "train.sharding_types=[row_wise]", "log.plots=false")
    run_dir, marker = tmp_path / "run", tmp_path / "stopped"
    job = start_ranks(train_stopping_in, 2, train_here, where, str(marker), overrides, str(run_dir))
    deadline = time.time() + 300
    while job.alive() and time.time() < deadline and not marker.exists():
        time.sleep(0.01)
    job.kill()
    assert marker.exists(), "the job did not reach the point where it is killed"
    assert (run_dir / "checkpoints" / f"step_{STEPS:09d}" / MARKER).exists()
    assert not (run_dir / "export").exists() and not (run_dir / "metrics.json").exists()
    staged = list(run_dir.glob(".export.tmp-*/*/part-*.parquet"))
    assert len(staged) == (4 if where == "export" else 0)  # complete parts, never renamed to export/

    two_ranks(train_here, overrides, str(run_dir))  # train.resume=auto: from the final checkpoint
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["checkpoint"]["resumed"]["step"] == STEPS and metrics["stack"]["chosen_weight"] >= 0
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    for name in ("users", "items"):
        assert len(manifest["parts"][name]) == 2
        for part in manifest["parts"][name]:
            assert hashlib.sha256((run_dir / "export" / part).read_bytes()).hexdigest() == manifest["files"][part]["sha256"]
        assert len(read_vectors(run_dir / "export", name)[0]) == manifest[f"num_{name}"]
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".export")] == [".export.lock"]  # staging removed


def export_failing_on_rank_1(run_dir: str):
    """``export_checkpoint`` on this rank, whose reading of the item ids fails on rank 1: the error
    every rank raised, and what the export left beside the run directory's checkpoints."""
    import recsys.data.source as source
    from recsys.distributed import rank_and_world

    read = source.InMemorySource.id_rows

    def id_rows(self, which, lo=0, hi=None):
        if rank_and_world()[0] == 1 and which == "items":
            raise OSError("items.parquet: input/output error")
        return read(self, which, lo, hi)

    source.InMemorySource.id_rows = id_rows
    try:
        export_checkpoint(Path(run_dir), ExportConfig(), "cpu")
    except OSError as e:
        return str(e)
    finally:  # the pool's ranks run other tests' jobs next
        source.InMemorySource.id_rows = read
    return None


def test_an_error_on_one_rank_stops_every_rank_and_leaves_nothing(tmp_path, data_root, tiny, train_here, two_ranks):
    run_dir = tmp_path / "run"
    train_here(tiny(data_root, "train.epochs=1", "export.enabled=false", "log.plots=false"), run_dir)
    assert two_ranks(export_failing_on_rank_1, str(run_dir)) == ["items.parquet: input/output error"] * 2
    assert sorted(p.name for p in run_dir.iterdir() if "export" in p.name) == [".export.lock"]
