"""Serving export: .npy + id lists and FAISS indexes read back, their recall checked against numpy."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from recsys.config import ExportConfig
from recsys.errors import ConfigError, ExportError
from recsys.exporter import export_run, read_vectors, write_export

NUM_USERS, NUM_ITEMS, DIM, K = 300, 2000, 16, 20


@pytest.fixture(autouse=True)
def small_row_groups(monkeypatch):
    """Parts of many row groups (128 rows each): the index, the recall measurement and the .npy
    files are built a row group at a time, as from a large export."""
    import recsys.exporter

    monkeypatch.setattr(recsys.exporter, "ROW_GROUP_BYTES", 128 * (4 * DIM + 8))


def make_export(run_dir: Path, normalized: bool, string_ids: bool, options=None) -> Path:
    """A run directory whose export holds random vectors, written the way training writes them."""
    rng = np.random.default_rng(0)
    users = rng.normal(size=(NUM_USERS, DIM)).astype(np.float32)
    items = rng.normal(size=(NUM_ITEMS, DIM)).astype(np.float32)
    if normalized:
        users /= np.linalg.norm(users, axis=1, keepdims=True)
        items /= np.linalg.norm(items, axis=1, keepdims=True)
    else:  # dot score: norms matter (a popularity-like spread)
        items *= rng.uniform(0.5, 2.0, size=(NUM_ITEMS, 1)).astype(np.float32)
    if string_ids:
        user_ids = pa.array([f"user-{u}" for u in range(NUM_USERS)])
        item_ids = pa.array([f"sku/{i * 7}" for i in range(NUM_ITEMS)])
    else:
        user_ids = pa.array(np.arange(NUM_USERS, dtype=np.int32) * 3 + 1)
        item_ids = pa.array(np.arange(NUM_ITEMS, dtype=np.int64) * 1000 + 7)
    return write_export(run_dir / "export", user_ids, users, item_ids, items, normalized, "test", options)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_files(export: Path) -> dict:
    """Every file is listed in the manifest with its checksum, and nothing else is there."""
    manifest = json.loads((export / "manifest.json").read_text())
    found = [p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()]
    assert sorted(found) == sorted([*manifest["files"], "manifest.json"])
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(export / name), name
    return manifest


def sampled_rows(seed: int, size: int) -> np.ndarray:
    # the sample documented in the manifest's recall entry
    return np.sort(np.random.default_rng(seed).choice(NUM_USERS, size, replace=False))


@pytest.mark.parametrize("kind,normalized", [("flat", True), ("ivf", True), ("hnsw", True),
                                             ("flat", False), ("ivf", False), ("hnsw", False)])
def test_faiss_index_recall_matches_numpy(tmp_path, kind, normalized):
    export = make_export(tmp_path, normalized, string_ids=False)
    # Deliberately small search parameters: recall well below 1, so the sample and the count matter.
    options = ExportConfig(faiss=kind, ann_k=K, ann_sample_users=200, ann_seed=3, ivf_nprobe=6, hnsw_m=6,
                           hnsw_ef_construction=20, hnsw_ef_search=20)
    export_run(export, options)
    manifest = check_files(export)
    entry = manifest["faiss"]
    assert entry["sha256"] == manifest["files"]["items.faiss"]["sha256"]
    assert entry["metric"] == "inner_product" and entry["type"] == kind and entry["score"] == manifest["score"]

    index = faiss.read_index(str(export / "items.faiss"))
    assert index.ntotal == NUM_ITEMS and index.d == DIM and index.metric_type == faiss.METRIC_INNER_PRODUCT
    if kind == "ivf":
        assert faiss.extract_index_ivf(index).nprobe == entry["params"]["nprobe"]
        assert faiss.extract_index_ivf(index).nlist == entry["params"]["nlist"]
    if kind == "hnsw":
        assert index.hnsw.efSearch == entry["params"]["efSearch"] == options.hnsw_ef_search

    # Independent reference: numpy brute force on the Parquet vectors of the same sampled users.
    _, user_vecs = read_vectors(export, "users")
    item_ids, item_vecs = read_vectors(export, "items")
    rows = sampled_rows(3, 200)
    queries = user_vecs[rows]
    scores = queries.astype(np.float64) @ item_vecs.astype(np.float64).T
    exact = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    distances, labels = index.search(queries, K)
    if kind == "flat":  # exact search: numpy's ids (row i of items.parquet), up to float32 ties
        assert (labels == exact).mean() > 0.999
        np.testing.assert_allclose(np.take_along_axis(scores, labels, 1), np.take_along_axis(scores, exact, 1), atol=1e-6)
        np.testing.assert_allclose(distances, np.take_along_axis(scores, exact, 1), atol=1e-5)
        assert entry["recall"]["value"] == 1.0
    recall = np.mean([len(set(labels[r]) & set(exact[r])) / K for r in range(len(rows))])
    assert entry["recall"]["k"] == K and entry["recall"]["users"] == 200
    assert entry["recall"]["value"] == pytest.approx(recall, abs=1e-3)
    assert recall > 0.5
    t = entry["throughput"]
    assert t["queries_per_s"] > 0 and t["queries_per_s_1_thread"] > 0 and t["batch"] == 200 and t["k"] == K


@pytest.mark.parametrize("string_ids", [False, True])
def test_npy_and_ids_read_back_to_parquet(tmp_path, string_ids):
    export = make_export(tmp_path, normalized=not string_ids, string_ids=string_ids)
    export_run(export, ExportConfig(npy=True))
    manifest = check_files(export)
    assert "faiss" not in manifest
    for name in ("users", "items"):
        table = ds.dataset(export / name).to_table()
        ids, vectors = read_vectors(export, name)
        matrix = np.load(export / f"{name}.npy")  # plain numpy, no pickle
        id_list = np.load(export / f"{name}_ids.npy")
        assert matrix.dtype == np.float32 and matrix.shape == vectors.shape
        np.testing.assert_array_equal(matrix, vectors)
        assert id_list.tolist() == ids
        id_type = table.schema.field(0).type
        if string_ids:
            assert id_list.dtype.kind == "U" and pa.types.is_string(id_type)
        else:
            assert id_list.dtype == id_type.to_pandas_dtype()  # int32 users, int64 items kept
            assert all(isinstance(i, int) for i in id_list.tolist())


def test_rerun_replaces_artefacts_and_keeps_parquet(tmp_path):
    export = make_export(tmp_path, True, False)
    before = {n: sha256(export / n) for n in ("items/part-00000.parquet", "users/part-00000.parquet")}
    export_run(export, ExportConfig(faiss="flat", npy=True, ann_k=K))
    assert (export / "items.faiss").exists()
    export_run(export, ExportConfig(faiss="none", npy=False))
    manifest = check_files(export)  # no stale index or .npy left behind
    assert set(manifest["files"]) == set(before) and "faiss" not in manifest
    assert {n: sha256(export / n) for n in before} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".export.lock"]  # no staging left


def test_bad_exports_are_refused(tmp_path):
    with pytest.raises(ExportError, match="manifest.json: not found"):
        export_run(tmp_path / "nothing" / "export", ExportConfig(faiss="flat"))
    export = make_export(tmp_path, True, False)
    with pytest.raises(ConfigError, match="ivf_nlist=5000 is larger than the number of items"):
        export_run(export, ExportConfig(faiss="ivf", ivf_nlist=5000))
    table = ds.dataset(export / "items").to_table()
    pq.write_table(table.slice(0, 10), export / "items" / "part-00000.parquet")
    with pytest.raises(ExportError, match="part-00000.parquet: sha256 does not match"):
        export_run(export, ExportConfig(faiss="flat"))
    with pytest.raises(ConfigError, match="export.faiss must be one of"):
        ExportConfig(faiss="annoy")


def test_train_applies_the_export_options_and_exports_what_the_command_would(tiny_run, tmp_path):
    """The shared tiny run exported with export.npy=true export.faiss=ivf export.ann_k=10: its files,
    its index's measured recall (in metrics.json too), and the same .npy files as the ones the export
    command (recsys.exporter.export_run) writes from the run's Parquet vectors."""
    export = tiny_run / "export"
    manifest = check_files(export)
    users = ds.dataset(export / "users").to_table()
    assert manifest["faiss"]["recall"]["users"] == min(1000, users.num_rows) and manifest["faiss"]["recall"]["k"] == 10
    assert 0.5 < manifest["faiss"]["recall"]["value"] <= 1.0
    item_ids, item_vecs = read_vectors(export, "items")
    assert np.load(export / "items_ids.npy").tolist() == item_ids
    assert faiss.read_index(str(export / "items.faiss")).ntotal == len(item_ids)
    metrics = json.loads((tiny_run / "metrics.json").read_text())  # the ANN figures are in metrics.json too
    assert metrics["export"]["faiss"] == manifest["faiss"]

    again = tmp_path / "export"
    shutil.copytree(export, again)
    rebuilt = export_run(again, ExportConfig(npy=True, faiss="ivf", ann_k=10))
    for name in ("users.npy", "items.npy", "users_ids.npy", "items_ids.npy", *manifest["parts"]["users"],
                 *manifest["parts"]["items"]):
        assert rebuilt["files"][name] == manifest["files"][name], name  # byte for byte (sha256)
    for key in ("type", "factory", "params", "ntotal", "dimension", "labels"):
        assert rebuilt["faiss"][key] == manifest["faiss"][key], key


def test_exports_of_the_single_file_layout_are_still_read(tmp_path):
    """Runs exported before the parts: users.parquet / items.parquet and a manifest listing them."""
    export = tmp_path / "old" / "export"
    export.mkdir(parents=True)
    rng = np.random.default_rng(1)
    tables = {}
    for name, id_name, n in (("users", "user_id", 30), ("items", "item_id", 50)):
        vecs = rng.normal(size=(n, 4)).astype(np.float32)
        ids = pa.array(np.arange(n, dtype=np.int64) * 3)
        flat = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), 4)
        pq.write_table(pa.table({id_name: ids, "vector": flat}), export / f"{name}.parquet")
        tables[name] = (ids.to_pylist(), vecs)
    files = {f"{n}.parquet": {"rows": len(tables[n][0]), "sha256": sha256(export / f"{n}.parquet")} for n in tables}
    (export / "manifest.json").write_text(json.dumps({"dimension": 4, "num_users": 30, "num_items": 50,
                                                      "normalized": False, "score": "dot", "files": files}))
    for name, (ids, vecs) in tables.items():
        got_ids, got = read_vectors(export, name)
        assert got_ids == ids and np.array_equal(got, vecs)
    manifest = export_run(export, ExportConfig(npy=True, faiss="flat", ann_k=5, ann_sample_users=10))
    assert set(manifest["files"]) == {"users.parquet", "items.parquet", "users.npy", "items.npy", "users_ids.npy",
                                      "items_ids.npy", "items.faiss"}
    np.testing.assert_array_equal(np.load(export / "items.npy"), tables["items"][1])
    assert manifest["faiss"]["recall"]["value"] == 1.0
