"""Export: every user and item vector with its raw id, and the artefacts that serve them.

    <run_dir>/export/items.parquet      item_id (raw id, original type), vector (fixed_size_list<float32>[D])
    <run_dir>/export/users.parquet      user_id, vector
                                        (data.id_mapping=hash: every raw id seen in training, each
                                        with its hashed row's vector: colliding ids share a vector)
    <run_dir>/export/items.npy          float32 [num_items, D]; row i = row i of items.parquet  (export.npy=true)
    <run_dir>/export/items_ids.npy      the raw ids of those rows: the id's integer type or unicode
                                        strings, np.load() without pickle            (export.npy=true)
    <run_dir>/export/users.npy, users_ids.npy                                        (export.npy=true)
    <run_dir>/export/items.faiss        FAISS index of the item vectors, inner-product metric: faiss
                                        label i is row i of items.parquet            (export.faiss=flat|ivf|hnsw)
    <run_dir>/export/manifest.json      dimension, counts, normalised, score, config hash, id mapping
                                        (and hash collision figures), the sha256 of every file, and
                                        the index's measured recall and throughput

The end of a run (``recsys.finish``) writes the directory: the towers' outputs over the full
(unsharded) tables, computed on every rank and gathered on rank 0, which writes it (serving
artefacts included, as configured in ``export``) under a temporary name and renames it
(``export_data``). ``export_run`` rebuilds the serving artefacts of an exported directory from
its Parquet files, checksums verified (``python -m recsys.export``, ``recsys/export.py``).

The index's metric is the model's score: inner product, for ``dot`` and for ``cosine`` (whose
exported vectors are unit-norm; checked, and renormalised for the index if they are not). Its
recall@K is measured against exact search (float64 brute force) with the vectors of a seeded
sample of users as queries, and its throughput with the same queries as one batch, with FAISS's
default number of threads and with one thread; both go into ``manifest["faiss"]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.atomic import write_json_atomic
from recsys.config import ConfigError, ExportConfig
from recsys.data.source import DataSource
from recsys.distributed import rank_and_world
from recsys.errors import ExportError
from recsys.evaluation.vectors import all_vectors, item_tower, user_tower

__all__ = ["ExportError"]  # raised when an export directory cannot be read back (defined in recsys.errors)

logger = logging.getLogger("recsys.export")


def vectors_table(id_name: str, ids: pa.Array, vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table({id_name: ids, "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Put the finished temporary directory in place of ``out_dir``."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _staged_dir(out_dir: Path):
    """Yield a temporary directory beside ``out_dir`` to fill; on success it replaces ``out_dir``,
    on any failure it is removed (``out_dir`` is left as it was)."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_export(out_dir: Path, user_ids: pa.Array, user_vecs: np.ndarray, item_ids: pa.Array,
                 item_vecs: np.ndarray, normalized: bool, config_hash: str,
                 options: Optional[ExportConfig] = None, extra: Optional[Dict] = None) -> Path:
    """Write the export directory atomically (temporary directory, then rename).

    ``options``: the serving artefacts (``.npy``, FAISS index) to add; None: Parquet only.
    ``extra``: more manifest entries (``id_mapping`` and the ``hash`` collision figures)."""
    out_dir = Path(out_dir)
    with _staged_dir(out_dir) as tmp:
        files = {}
        for name, id_name, ids, vecs in (("users", "user_id", user_ids, user_vecs), ("items", "item_id", item_ids, item_vecs)):
            if len(ids) != len(vecs):
                raise ValueError(f"{name}: {len(ids)} ids but {len(vecs)} vectors")
            pq.write_table(vectors_table(id_name, ids, vecs), tmp / f"{name}.parquet")
            files[f"{name}.parquet"] = {"rows": len(ids), "sha256": _sha256(tmp / f"{name}.parquet")}
        manifest = {
            "dimension": int(item_vecs.shape[1]),
            "num_users": len(user_ids),
            "num_items": len(item_ids),
            "normalized": normalized,
            "score": "cosine" if normalized else "dot",
            "config_hash": config_hash,
            **(extra or {}),
            "files": files,
        }
        if options is not None:
            _add_serving(tmp, manifest, user_ids, np.asarray(user_vecs, np.float32), item_ids,
                         np.asarray(item_vecs, np.float32), options)
        write_json_atomic(manifest, tmp / "manifest.json")
    return out_dir


def export_model(model, features, user_ids: pa.Array, item_ids: pa.Array, out_dir: Path,
                 device, config_hash: str, chunk: int = 4096,
                 options: Optional[ExportConfig] = None, user_rows: Optional[np.ndarray] = None,
                 item_rows: Optional[np.ndarray] = None, extra: Optional[Dict] = None) -> Optional[Path]:
    """Compute all vectors of a (sharded) two-tower model and write them on rank 0.

    ``user_ids[k]`` is the raw id of table row ``user_rows[k]`` (``recsys.data.dataset.id_rows``; None: of
    row k). With ``data.id_mapping=hash`` several ids share a row (each gets its row's vector) and
    a row may have no id (not exported). User vectors are the user tower's outputs (with each
    user's history bag from ``features``); ``options`` adds the serving artefacts and ``extra``
    manifest entries (see ``write_export``). Collective."""
    dim = model.embedding_dim
    out = []
    with torch.no_grad():
        for tower, ids, rows in ((user_tower(model, features, device), user_ids, user_rows),
                                 (item_tower(model, features, device), item_ids, item_rows)):
            # the rows 0..count-1 (every rank computes its share, rank 0 gathers), then each id's row
            count = len(ids) if rows is None else (int(rows.max()) + 1 if len(rows) else 0)
            vecs = all_vectors(tower, count, dim, device, chunk, dst=0)
            if vecs is not None and rows is not None:
                vecs = vecs[torch.from_numpy(np.array(rows, dtype=np.int64)).to(vecs.device)]  # a copy: Arrow's buffer is read-only
            out.append(vecs)
    path = None
    if rank_and_world()[0] == 0:
        # float32 whatever the tables' storage type (fp16 tables give fp32 lookups already)
        users, items = (v.float().cpu().numpy() for v in out)
        path = write_export(out_dir, user_ids, users, item_ids, items, model.normalize, config_hash, options, extra)
    return path


def export_data(model, features, data: DataSource, out_dir: Path, device, config_hash: str,
                options: Optional[ExportConfig] = None) -> Optional[Path]:
    """``export_model`` of a data source (``recsys.data.source``):
    every raw id of its ``id_rows`` (vocab / identity: one per table row; hash: each id seen in
    training) with its row's vector; the manifest records the id mapping and, for hash, the
    prepared dataset's collision figures. Collective."""
    manifest = data.manifest
    (user_ids, user_rows), (item_ids, item_rows) = data.id_rows("users"), data.id_rows("items")
    extra = {"id_mapping": manifest.get("id_mapping", "vocab")}
    if extra["id_mapping"] != "hash":  # row k is id k: no gather
        user_rows = item_rows = None
    if "hash" in manifest:
        extra["hash"] = manifest["hash"]
    return export_model(model, features, user_ids, item_ids, out_dir, device, config_hash, options=options,
                        user_rows=user_rows, item_rows=item_rows, extra=extra)


def _read_table_vectors(path: Path) -> Tuple[pa.Array, np.ndarray]:
    table = pq.read_table(path)
    vec = table["vector"].combine_chunks()
    return table.column(0).combine_chunks(), vec.values.to_numpy().reshape(-1, vec.type.list_size)


def read_vectors(path: Path) -> tuple[list, np.ndarray]:
    """Read an exported vectors file back: (raw ids, [N, D] float32 matrix)."""
    ids, vectors = _read_table_vectors(path)
    return ids.to_pylist(), vectors


# ---------------------------------------------------------------------------------------------
# Serving artefacts: .npy matrices and id lists, the FAISS index and its measurements
# ---------------------------------------------------------------------------------------------


def ids_array(ids: pa.Array, name: str) -> np.ndarray:
    """The raw ids as a numpy array that ``np.load`` reads without pickle: the id's integer
    type, or fixed-width unicode (``<U``) for string ids."""
    if ids.null_count:
        raise ExportError(f"{name}: {ids.null_count} null ids")
    if pa.types.is_integer(ids.type):
        return ids.to_numpy(zero_copy_only=False)
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        values = ids.to_pylist()
        array = np.array(values, dtype=str) if values else np.array([], dtype="<U1")
        if any(v.endswith("\x00") for v in values):  # numpy's fixed-width strings drop trailing NULs
            raise ExportError(f"{name}: ids ending in NUL characters cannot be kept in .npy")
        return array
    raise ExportError(f"{name}: ids of type {ids.type} cannot be written as .npy")


def _unit_norm(vecs: np.ndarray, name: str) -> Tuple[np.ndarray, float]:
    """Cosine score: the vectors should be unit-norm; renormalise them (with a warning) if not."""
    norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
    deviation = float(np.max(np.abs(norms - 1.0))) if len(norms) else 0.0
    if deviation > 1e-4:
        logger.warning("%s: the score is cosine but vector norms differ from 1 by up to %.3g: "
                       "renormalised for the index", name, deviation)
        vecs = (vecs / np.maximum(norms, 1e-12)[:, None]).astype(np.float32)
    return vecs, deviation


def ivf_nlist(num_items: int, nlist: int) -> int:
    """``export.ivf_nlist``, or by default 4 sqrt(N) cells with at least 39 items each (FAISS's
    k-means asks for 39 training points per centroid)."""
    if nlist:
        return nlist
    return max(1, min(int(round(4 * math.sqrt(num_items))), num_items // 39))


def build_index(item_vecs: np.ndarray, options: ExportConfig):
    """The FAISS index of ``options.faiss`` over the item vectors (inner product; label i = row i).

    Returns (index, factory string, parameters)."""
    n, d = item_vecs.shape
    x = np.ascontiguousarray(item_vecs, dtype=np.float32)
    if options.faiss == "flat":
        factory, params = "Flat", {}
    elif options.faiss == "ivf":
        nlist = ivf_nlist(n, options.ivf_nlist)
        if nlist > n:
            raise ConfigError(f"export.ivf_nlist={nlist} is larger than the number of items ({n})")
        factory, params = f"IVF{nlist},Flat", {"nlist": nlist, "nprobe": min(options.ivf_nprobe, nlist)}
    elif options.faiss == "hnsw":
        factory = f"HNSW{options.hnsw_m},Flat"
        params = {"M": options.hnsw_m, "efConstruction": options.hnsw_ef_construction,
                  "efSearch": options.hnsw_ef_search}
    else:
        raise ConfigError(f"export.faiss={options.faiss!r} builds no index")
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if options.faiss == "ivf":
        index.train(x)
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    if options.faiss == "hnsw":
        index.hnsw.efConstruction = options.hnsw_ef_construction
    index.add(x)
    if options.faiss == "hnsw":
        index.hnsw.efSearch = options.hnsw_ef_search
    return index, factory, params


def sample_users(num_users: int, size: int, seed: int) -> np.ndarray:
    """Rows of the users whose vectors are the measurement's queries: all users when
    ``size >= num_users``, else ``sorted(np.random.default_rng(seed).choice(num_users, size, replace=False))``."""
    if size >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(seed).choice(num_users, size, replace=False))


def ann_recall(labels: np.ndarray, queries: np.ndarray, item_vecs: np.ndarray, k: int) -> float:
    """Mean recall@K of ANN results ``labels`` [Q, K] against exact inner-product search.

    Exact scores are computed in float64 by brute force. An ANN result is a true neighbour when
    its exact score reaches the exact K-th best score (less float32 rounding: ties count), so an
    exact index scores 1.0; a missing result (label -1) is a miss."""
    items64 = item_vecs.astype(np.float64)
    max_item_norm = float(np.linalg.norm(items64, axis=1).max())
    n = len(items64)
    chunk = max(1, (1 << 24) // max(n, 1))
    hits = 0
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk].astype(np.float64)
        scores = q @ items64.T
        kth = np.partition(scores, n - k, axis=1)[:, n - k]
        lab = labels[start:start + chunk]
        found = np.take_along_axis(scores, np.where(lab >= 0, lab, 0), axis=1)
        tol = 1e-5 * np.linalg.norm(q, axis=1) * max_item_norm
        hits += int(((lab >= 0) & (found >= (kth - tol)[:, None])).sum())
    return hits / (len(queries) * k)


def queries_per_s(index, queries: np.ndarray, k: int, threads: int, min_s: float = 0.2) -> float:
    """Batch search throughput (the whole ``queries`` matrix per call) with ``threads`` OpenMP threads."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        index.search(queries[:1], k)  # warm up
        done, t0 = 0, time.perf_counter()
        while True:
            index.search(queries, k)
            done += len(queries)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                return done / elapsed
    finally:
        faiss.omp_set_num_threads(before)


def _add_serving(directory: Path, manifest: Dict, user_ids: pa.Array, user_vecs: np.ndarray, item_ids: pa.Array,
                 item_vecs: np.ndarray, options: ExportConfig) -> None:
    """Write the serving artefacts into ``directory`` (a temporary one, renamed by the caller) and
    record them, with their checksums, in ``manifest``."""
    files = manifest["files"]
    if options.npy:
        for name, ids, vecs in (("users", user_ids, user_vecs), ("items", item_ids, item_vecs)):
            np.save(directory / f"{name}.npy", np.ascontiguousarray(vecs, dtype=np.float32), allow_pickle=False)
            np.save(directory / f"{name}_ids.npy", ids_array(ids, f"{name}.parquet"), allow_pickle=False)
            for f in (f"{name}.npy", f"{name}_ids.npy"):
                files[f] = {"rows": len(ids), "sha256": _sha256(directory / f)}
    if options.faiss == "none":
        return
    items, deviation = item_vecs, 0.0
    users = user_vecs
    if manifest["score"] == "cosine":
        items, deviation = _unit_norm(item_vecs, "items")
        users, _ = _unit_norm(user_vecs, "users")
    t0 = time.perf_counter()
    index, factory, params = build_index(items, options)
    build_s = time.perf_counter() - t0
    faiss.write_index(index, str(directory / "items.faiss"))  # inside the temporary directory
    files["items.faiss"] = {"rows": int(index.ntotal), "sha256": _sha256(directory / "items.faiss")}

    k = min(options.ann_k, len(items))
    rows = sample_users(len(users), options.ann_sample_users, options.ann_seed)
    queries = np.ascontiguousarray(users[rows], dtype=np.float32)
    recall = None
    throughput = None
    if len(queries):
        _, labels = index.search(queries, k)
        recall = ann_recall(labels, queries, items, k)
        threads = faiss.omp_get_max_threads()
        qps = queries_per_s(index, queries, k, threads)
        throughput = {
            "queries_per_s": round(qps, 1),
            "threads": threads,
            "queries_per_s_1_thread": round(qps if threads == 1 else queries_per_s(index, queries, k, 1), 1),
            "batch": len(queries),
            "k": k,
        }
    manifest["faiss"] = {
        "file": "items.faiss",
        "sha256": files["items.faiss"]["sha256"],
        "type": options.faiss,
        "factory": factory,
        "metric": "inner_product",
        "score": manifest["score"],
        "params": params,
        "ntotal": int(index.ntotal),
        "dimension": int(index.d),
        "labels": "faiss label i is row i of items.parquet",
        "max_norm_deviation": round(deviation, 7),
        "build_s": round(build_s, 3),
        "recall": {
            "k": k,
            "value": None if recall is None else round(recall, 6),
            "users": len(queries),
            "seed": options.ann_seed,
            "reference": "exact inner-product search (float64 brute force) on the same user vectors",
        },
        "throughput": throughput,
    }
    logger.info("%s", describe_faiss(manifest["faiss"]))


def describe_faiss(entry: Dict) -> str:
    """One line about the index of a manifest's ``faiss`` entry."""
    r, t = entry["recall"], entry["throughput"]
    text = f"faiss {entry['factory']} ({entry['metric']}, {entry['ntotal']} items, built in {entry['build_s']:.2f}s): "
    if r["value"] is None:
        return text + "no user vectors to measure recall and throughput with"
    text += f"recall@{r['k']} {r['value']:.4f} vs exact search on {r['users']} users"
    if t and t["threads"] == 1:
        text += f"; {t['queries_per_s']:,.0f} queries/s (1 thread, batches of {t['batch']})"
    elif t:
        text += (f"; {t['queries_per_s']:,.0f} queries/s ({t['threads']} threads, batches of {t['batch']}), "
                 f"{t['queries_per_s_1_thread']:,.0f} queries/s on 1 thread")
    return text


# ---------------------------------------------------------------------------------------------
# From a run directory
# ---------------------------------------------------------------------------------------------


def export_run(export_dir: Path, options: ExportConfig) -> Dict:
    """Rebuild a training run's export directory with the serving artefacts of ``options``.

    The Parquet files are checked against the manifest's checksums and kept byte for byte;
    everything else is (re)built, and the directory is replaced atomically. Returns the manifest."""
    export_dir = Path(export_dir)
    manifest_path = export_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ExportError(f"{manifest_path}: not found (no exported vectors: was the run trained with export.enabled=true?)")
    try:
        old = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(old, dict) or not isinstance(old.get("files"), dict) or old.get("score") not in ("cosine", "dot"):
        raise ExportError(f"{manifest_path}: not an export manifest (needs 'files' and 'score': cosine or dot)")
    tables = {}
    for name, count in (("users", "num_users"), ("items", "num_items")):
        path = export_dir / f"{name}.parquet"
        entry = old["files"].get(f"{name}.parquet")
        if not path.is_file() or not isinstance(entry, dict):
            raise ExportError(f"{path}: missing (or not listed in {manifest_path.name})")
        if _sha256(path) != entry.get("sha256"):
            raise ExportError(f"{path}: sha256 does not match {manifest_path.name} (the file changed after the export)")
        try:
            ids, vecs = _read_table_vectors(path)
        except (pa.ArrowException, KeyError) as e:
            raise ExportError(f"{path}: not a vectors file ({e})") from None
        if len(ids) != old.get(count) or vecs.shape[1] != old.get("dimension"):
            raise ExportError(f"{path}: {len(ids)} x {vecs.shape[1]} vectors, the manifest says "
                              f"{old.get(count)} x {old.get('dimension')}")
        tables[name] = (ids, vecs)
    if options.faiss == "none" and not options.npy:
        logger.warning("export.faiss=none and export.npy=false: no serving artefact to add "
                       "(the export is verified and rewritten with its Parquet files only)")

    with _staged_dir(export_dir) as tmp:
        manifest = {key: value for key, value in old.items() if key not in ("files", "faiss")}
        manifest["files"] = {}
        for name in ("users.parquet", "items.parquet"):
            try:
                os.link(export_dir / name, tmp / name)
            except OSError:
                shutil.copy2(export_dir / name, tmp / name)
            manifest["files"][name] = old["files"][name]
        (user_ids, user_vecs), (item_ids, item_vecs) = tables["users"], tables["items"]
        _add_serving(tmp, manifest, user_ids, user_vecs, item_ids, item_vecs, options)
        write_json_atomic(manifest, tmp / "manifest.json")
    return manifest
