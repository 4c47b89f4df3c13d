"""Export: every user and item vector with its raw id, written a part per rank, and the artefacts
that serve them.

    <run_dir>/export/items/part-RRRRR.parquet   item_id (raw id, original type), vector
                                                (fixed_size_list<float32>[D]): rank R's share of the
                                                item table's rows, in row order
    <run_dir>/export/users/part-RRRRR.parquet   user_id, vector
                                                (data.id_mapping=hash: every raw id seen in training,
                                                each with its hashed row's vector: colliding ids
                                                share a vector)
    <run_dir>/export/items.npy, items_ids.npy   float32 [num_items, D] and the raw ids of its rows
                                                (the id's integer type or unicode strings, np.load()
                                                without pickle); row i = row i of items/ (export.npy=true)
    <run_dir>/export/users.npy, users_ids.npy   (export.npy=true)
    <run_dir>/export/items.faiss                FAISS index of the item vectors, inner-product metric:
                                                faiss label i is row i of items/, the parts read in
                                                order                      (export.faiss=flat|ivf|hnsw)
    <run_dir>/export/manifest.json              dimension, counts, normalised, score, config hash, id
                                                mapping (and hash collision figures), every part and
                                                file with its rows and sha256, the index's measured
                                                recall and throughput

``pyarrow.dataset``, pandas, DuckDB and Spark read ``items/`` or ``users/`` as one table (the
parts in name order are the rows in order).

No rank holds the world: every rank computes the vectors of its share of each table's rows
(``rank_bounds``: rows [lo, hi)) a chunk at a time and writes them, with the raw ids of those rows
(``DataSource.id_rows(which, lo, hi)``), into its part, row groups of at most ROW_GROUP_BYTES.
Rank 0 then coordinates: it collects the parts' names, rows and checksums, builds the serving
artefacts by reading the parts one at a time (the FAISS index gets the items part by part; an IVF
index is trained on a seeded sample; the ``.npy`` files are written as a stream), writes the
manifest and only then renames the staging directory to ``export/`` (``Staging``: under a lock
file, so that two exports of one directory never interleave): a job killed during the export
leaves the previous export (or none) in place, and a staging directory that no reader takes for
an export (removed by the next export). An error on any rank is raised on every rank. ``export_run`` rebuilds the serving artefacts
of an exported directory from its parts, checksums verified (``python -m recsys.export``).
Exports written before the parts (``users.parquet`` / ``items.parquet``) are still read.

The index's metric is the model's score: inner product, for ``dot`` and for ``cosine`` (whose
exported vectors are unit-norm; checked, and renormalised for the index if they are not). Its
recall@K is measured against exact search (float64 brute force, a part at a time) with the
vectors of a seeded sample of users as queries, and its throughput with the same queries as one
batch, with FAISS's default number of threads and with one thread; both go into
``manifest["faiss"]``.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.atomic import file_sha256, write_json_atomic
from recsys.config import ConfigError, ExportConfig
from recsys.data.source import DataSource
from recsys.distributed import all_gather_objects, from_rank0, own_rows, rank_and_world, rank_bounds
from recsys.errors import ExportError
from recsys.evaluation.vectors import item_tower, tower_outputs, user_tower

__all__ = ["ExportError"]  # raised when an export directory cannot be read back (defined in recsys.errors)

logger = logging.getLogger("recsys.export")

TABLES = (("users", "user_id"), ("items", "item_id"))
ROW_GROUP_BYTES = 64 << 20  # a part's row groups hold at most this many bytes of vectors
PART = "part-{:05d}.parquet"

IdRows = Callable[[str, int, int], Tuple[pa.Array, np.ndarray]]
"""``id_rows(which, lo, hi)``: the raw ids of table rows [lo, hi) of ``users`` / ``items`` and
their rows, sorted by row (``DataSource.id_rows``)."""


FROM_FEATURES = "from_features"
"""With side features, a boolean column of the export: the id had no training interaction, its
vector comes from its features alone (a new item or user of the feature files)."""


def vectors_table(id_name: str, ids: pa.Array, vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table({id_name: ids, "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


# ---------------------------------------------------------------------------------------------
# Writing: a part per rank, a staging directory committed by rank 0
# ---------------------------------------------------------------------------------------------


class PartWriter:
    """One part file: (ids, vectors) appended in row order, buffered into row groups of at most
    ROW_GROUP_BYTES, written under a temporary name and renamed by ``close`` (atomic)."""

    def __init__(self, path: Path, id_name: str, id_type: pa.DataType, dim: int, flagged: bool = False) -> None:
        self.path, self.id_name, self.dim = Path(path), id_name, dim
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        fields = [(id_name, id_type), ("vector", pa.list_(pa.float32(), dim))]
        self.flagged, self.flags = flagged, 0
        if flagged:  # side features: whether the vector comes from the features alone (no training interaction)
            fields.append((FROM_FEATURES, pa.bool_()))
        schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.group_rows = max(1, ROW_GROUP_BYTES // (4 * dim + 8))
        self.pending: List[pa.Table] = []
        self.pending_rows = self.rows = 0

    def write(self, ids: pa.Array, vectors: np.ndarray, from_features: Optional[np.ndarray] = None) -> None:
        if len(ids) != len(vectors):
            raise ValueError(f"{self.path}: {len(ids)} ids but {len(vectors)} vectors")
        if len(ids):
            table = vectors_table(self.id_name, ids, vectors)
            if self.flagged:
                flags = np.zeros(len(ids), bool) if from_features is None else np.asarray(from_features, bool)
                table = table.append_column(FROM_FEATURES, pa.array(flags))
                self.flags += int(flags.sum())
            self.pending.append(table.cast(self.writer.schema))
            self.pending_rows += len(ids)
            self.rows += len(ids)
        if self.pending_rows >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.group_rows)
        self.pending, self.pending_rows = [], 0

    def close(self) -> Dict:
        """Finish the file; its manifest entry (rows, sha256)."""
        self._flush()
        self.writer.close()
        os.replace(self.tmp, self.path)
        entry = {"rows": self.rows, "sha256": file_sha256(self.path)}
        if self.flagged:
            entry[FROM_FEATURES] = self.flags
        return entry


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Put the finished staging directory in place of ``out_dir``."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


class Staging:
    """An export being written: a staging directory beside ``out_dir``, under an exclusive lock.

    The lock (``flock`` on ``.<name>.lock``, released by the kernel when a job is killed) keeps two
    exports of one directory from running at once, so that removing what a killed export left
    (``.<name>.tmp-*`` staging directories) never touches a live one; a previous export stranded
    by a kill between the two renames of ``_replace_dir`` (``.<name>.old-*`` with no ``<name>``)
    is put back first. ``commit`` adds the serving artefacts and the manifest and renames the
    staging directory to ``out_dir``; ``abort`` removes it. Either releases the lock."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = self.out_dir.with_name(f".{self.out_dir.name}.lock")
        self.fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ExportError(f"{self.out_dir}: another export of this directory is running (it holds {lock})") from None
        try:
            self._recover()
            self.path = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{os.getpid()}")
            self.path.mkdir()
        except BaseException:
            self._release()
            raise

    def _recover(self) -> None:
        olds = sorted(glob.glob(str(self.out_dir.with_name(f".{self.out_dir.name}.old-*"))), key=os.path.getmtime)
        if olds and not self.out_dir.exists():
            logger.warning("%s: a previous export was interrupted while being replaced; its predecessor is put back",
                           self.out_dir)
            os.rename(olds.pop(), self.out_dir)
        for stale in olds + glob.glob(str(self.out_dir.with_name(f".{self.out_dir.name}.tmp-*"))):
            shutil.rmtree(stale, ignore_errors=True)

    def _release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def commit(self, manifest: Dict, options: Optional[ExportConfig]) -> Path:
        """Check the parts the manifest lists (each there, with its rows), add the serving artefacts
        and the manifest, and put the directory in place of ``out_dir``; on failure the staging
        directory is removed (``out_dir`` is left as it was)."""
        try:
            for name in ("users", "items"):
                for file in vector_files(self.path, name, manifest):
                    path, rows = self.path / file, manifest["files"][file]["rows"]
                    if not path.is_file() or pq.ParquetFile(path).metadata.num_rows != rows:
                        raise ExportError(f"{path}: missing or not of its {rows} rows on rank 0 (is "
                                          f"{self.out_dir.parent} on a filesystem every rank shares?)")
            if options is not None:
                _add_serving(self.path, manifest, options)
            write_json_atomic(manifest, self.path / "manifest.json")
            _replace_dir(self.path, self.out_dir)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        finally:
            self._release()
        return self.out_dir


def _manifest(dim: int, parts: Dict[str, List[Tuple[str, Dict]]], normalized: bool, config_hash: str,
              extra: Optional[Dict]) -> Dict:
    """The manifest of an export's parts (``parts[name]``: (file, entry) in row order)."""
    files = {file: entry for name in ("users", "items") for file, entry in parts[name]}
    return {
        "layout": "parts",
        "dimension": dim,
        "num_users": sum(entry["rows"] for _, entry in parts["users"]),
        "num_items": sum(entry["rows"] for _, entry in parts["items"]),
        "normalized": normalized,
        "score": "cosine" if normalized else "dot",
        "config_hash": config_hash,
        **(extra or {}),
        "parts": {name: [file for file, _ in parts[name]] for name in ("users", "items")},
        "files": files,
    }


def write_export(out_dir: Path, user_ids: pa.Array, user_vecs: np.ndarray, item_ids: pa.Array,
                 item_vecs: np.ndarray, normalized: bool, config_hash: str,
                 options: Optional[ExportConfig] = None, extra: Optional[Dict] = None) -> Path:
    """Write an export directory from vectors in memory (one part per table), atomically.

    ``options``: the serving artefacts (``.npy``, FAISS index) to add; None: Parquet only.
    ``extra``: more manifest entries (``id_mapping`` and the ``hash`` collision figures)."""
    staging = Staging(out_dir)
    parts = {}
    try:
        for (name, id_name), ids, vecs in zip(TABLES, (user_ids, item_ids), (user_vecs, item_vecs)):
            writer = PartWriter(staging.path / name / PART.format(0), id_name, ids.type, int(item_vecs.shape[1]))
            writer.write(ids, np.asarray(vecs, np.float32))
            parts[name] = [(f"{name}/{PART.format(0)}", writer.close())]
    except BaseException:
        staging.abort()
        raise
    return staging.commit(_manifest(int(item_vecs.shape[1]), parts, normalized, config_hash, extra), options)


@torch.no_grad()
def _write_share(path: Path, tower, id_name: str, ids: pa.Array, rows: np.ndarray, lo: int, hi: int,
                 max_share: int, dim: int, chunk: int, device, has_id: Optional[Callable] = None,
                 oov: Optional[Tuple[Path, int, int]] = None) -> Tuple[Optional[Dict], Optional[Exception]]:
    """This rank's part: the vectors of table rows [lo, hi), a chunk at a time, each with the ids
    of its row; (its manifest entry, None) or (None, the error). Every rank makes the same number of
    tower calls (sharded lookups are collective), after an error too, so that no rank waits forever.
    `has_id(rows)` (side features): which rows have a trained id embedding; the others are flagged
    ``from_features``. `oov` (path, first row, buckets): the OOV rows of this share are also
    written there with their bucket number (a serving system's unseen ids hash into them); the
    manifest entry then has ``oov``: the file's entry."""
    writer, error, oov_writer = None, None, None
    try:
        writer = PartWriter(path, id_name, ids.type, dim, flagged=has_id is not None)
        if oov is not None:
            oov_writer = PartWriter(oov[0], "bucket", pa.int64(), dim)
    except Exception as e:  # reported to every rank after the collective calls
        error = e
    for call in range(-(-max_share // chunk)):
        c0 = min(lo + call * chunk, hi)
        c1 = min(c0 + chunk, hi)
        vecs = tower_outputs(tower, np.arange(c0, c1), 1, chunk, dim, device).float().cpu().numpy()
        if error is None:
            try:
                a, b = np.searchsorted(rows, [c0, c1])
                writer.write(ids.slice(a, b - a), vecs[rows[a:b] - c0],
                             None if has_id is None else ~has_id(rows[a:b]))
                if oov_writer is not None:
                    first, buckets = oov[1], oov[2]
                    r = np.arange(max(c0, first), min(c1, first + buckets))
                    oov_writer.write(pa.array(r - first, pa.int64()), vecs[r - c0])
            except Exception as e:
                error = e
    if error is None:
        try:
            entry = writer.close()
            if oov_writer is not None:
                entry["oov"] = oov_writer.close()
            return entry, None
        except Exception as e:
            error = e
    return None, error


def export_model(model, features, id_rows: IdRows, num_users: int, num_items: int, out_dir: Path, device,
                 config_hash: str, chunk: int = 4096, options: Optional[ExportConfig] = None,
                 extra: Optional[Dict] = None, oov: Optional[Dict[str, Dict]] = None) -> Optional[Path]:
    """Write the vectors of a (sharded) two-tower model, a part per rank; rank 0 commits.

    ``id_rows(which, lo, hi)`` gives the raw ids of rows [lo, hi) of the ``num_users`` x D user
    table / ``num_items`` x D item table: with ``data.id_mapping=hash`` several ids share a row
    (each gets its row's vector) and a row may have no id (not exported). User vectors are the user
    tower's outputs (with each user's history bag from ``features``); ``options`` adds the serving
    artefacts and ``extra`` manifest entries; ``oov`` (a prepared manifest's ``oov`` entry) adds
    each table's OOV rows under ``oov/<table>/`` (``bucket``, ``vector``). An error on any rank is
    raised on every rank (the staging directory removed). Collective; returns the directory on rank 0."""
    rank, world = rank_and_world()
    staging: List[Staging] = []  # rank 0's

    def begin() -> str:
        staging.append(Staging(Path(out_dir)))
        return str(staging[0].path)

    tmp = Path(from_rank0(begin, Exception))
    towers = {"users": user_tower(model, features, device), "items": item_tower(model, features, device)}
    mine, error = {}, None
    for (name, id_name), count in zip(TABLES, (num_users, num_items)):
        lo, hi = own_rows(count)
        ids, rows = pa.array([], pa.int64()), np.zeros(0, np.int64)
        if error is None:
            try:
                ids, rows = id_rows(name, lo, hi)
            except Exception as e:  # raised on every rank below
                error = e
        side = features.side.get(name[:-1])  # users -> user, items -> item
        oov_rows = (oov or {}).get(name)
        oov_target = None if oov_rows is None else (tmp / "oov" / name / PART.format(rank), oov_rows["first_row"],
                                                    oov_rows["buckets"])
        entry, failed = _write_share(tmp / name / PART.format(rank), towers[name], id_name, ids, np.asarray(rows), lo,
                                     hi, int(np.diff(rank_bounds(count, world)).max()), model.embedding_dim, chunk, device,
                                     None if side is None else side.has_id, oov_target)
        mine[name], error = (f"{name}/{PART.format(rank)}", entry), error or failed
    everyone = all_gather_objects((mine, error))
    errors = [e for _, e in everyone if e is not None]
    if errors:
        if staging:
            staging[0].abort()
        raise errors[0]
    parts = {name: [entries[name] for entries, _ in everyone] for name, _ in TABLES}
    flagged = {name: sum(e[FROM_FEATURES] for _, e in parts[name]) for name in parts
               if parts[name] and FROM_FEATURES in parts[name][0][1]}
    extra = {**(extra or {}), **({FROM_FEATURES: flagged} if flagged else {})}
    oov_files = {}
    if oov:  # each table's OOV rows: bucket + vector, and how an id finds its bucket
        extra["oov"] = {}
        for name in oov:
            files = [(f"oov/{name}/{PART.format(r)}", e.pop("oov")) for r, (_, e) in enumerate(parts[name])]
            oov_files.update(files)
            extra["oov"][name] = {**oov[name], "parts": [f for f, _ in files],
                                  "bucket_of_an_id": "recsys.data.hashing.oov_rows(ids, 0, buckets, seed)"}
    manifest = _manifest(model.embedding_dim, parts, model.normalize, config_hash, extra)
    manifest["files"].update(oov_files)
    path = from_rank0(lambda: str(staging[0].commit(manifest, options)), Exception)
    return Path(path) if rank == 0 else None


def export_data(model, features, data: DataSource, out_dir: Path, device, config_hash: str,
                options: Optional[ExportConfig] = None) -> Optional[Path]:
    """``export_model`` of a data source (``recsys.data.source``): every raw id of its
    ``id_rows`` (vocab / identity: one per table row; hash: each id seen in training) with its
    row's vector; the manifest records the id mapping and, for hash, the prepared dataset's
    collision figures. Collective."""
    extra = {"id_mapping": data.manifest.get("id_mapping", "vocab")}
    if "hash" in data.manifest:
        extra["hash"] = data.manifest["hash"]
    return export_model(model, features, data.id_rows, data.num_users, data.num_items, out_dir, device, config_hash,
                        options=options, extra=extra, oov=data.manifest.get("oov"))


# ---------------------------------------------------------------------------------------------
# Reading: the parts (or an export of the single-file layout)
# ---------------------------------------------------------------------------------------------


def _read_manifest(export_dir: Path) -> Dict:
    path = Path(export_dir) / "manifest.json"
    if not path.is_file():
        raise ExportError(f"{path}: not found (no exported vectors: was the run trained with export.enabled=true?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or \
            manifest.get("score") not in ("cosine", "dot"):
        raise ExportError(f"{path}: not an export manifest (needs 'files' and 'score': cosine or dot)")
    return manifest


def vector_files(export_dir: Path, name: str, manifest: Optional[Dict] = None) -> List[str]:
    """The files of table `name` (``users`` / ``items``) of an export, in row order, relative to
    the directory: its parts, or ``<name>.parquet`` for the single-file layout."""
    manifest = manifest if manifest is not None else _read_manifest(export_dir)
    return list(manifest["parts"][name]) if manifest.get("layout") == "parts" else [f"{name}.parquet"]


def _blocks(path: Path, groups: Optional[Iterable[int]] = None,
            vectors: bool = True) -> Iterator[Tuple[pa.Array, Optional[np.ndarray]]]:
    """(ids, vectors) of the row groups `groups` (None: all) of a vectors file; ``vectors=False``
    reads the id column only (vectors None)."""
    pf = pq.ParquetFile(path)
    columns = None if vectors else [pf.schema_arrow.names[0]]
    for group in range(pf.num_row_groups) if groups is None else groups:
        table = pf.read_row_group(group, columns=columns)
        vecs = None
        if vectors:
            vec = table["vector"].combine_chunks()
            vecs = vec.values.to_numpy().reshape(-1, vec.type.list_size)
        yield table.column(0).combine_chunks(), vecs


def iter_vectors(export_dir: Path, name: str, manifest: Optional[Dict] = None,
                 vectors: bool = True) -> Iterator[Tuple[pa.Array, Optional[np.ndarray]]]:
    """(raw ids, [n, D] float32 vectors) of table `name`, a row group at a time, in row order
    (``vectors=False``: the ids only)."""
    for file in vector_files(export_dir, name, manifest):
        yield from _blocks(Path(export_dir) / file, vectors=vectors)


def read_vectors(export_dir: Path, name: str) -> Tuple[list, np.ndarray]:
    """The whole table `name` (``users`` / ``items``) of an export: (raw ids, [N, D] float32).
    Holds it all: for tests and small exports (``iter_vectors`` streams)."""
    ids, vecs = [], []
    for block_ids, block in iter_vectors(export_dir, name):
        ids.extend(block_ids.to_pylist())
        vecs.append(block)
    dim = _read_manifest(export_dir)["dimension"]
    return ids, np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)


# ---------------------------------------------------------------------------------------------
# Serving artefacts: .npy matrices and id lists, the FAISS index and its measurements
# ---------------------------------------------------------------------------------------------


def _npy_id_dtype(directory: Path, name: str, manifest: Dict) -> np.dtype:
    """The numpy dtype of table `name`'s raw ids (``ids_array``'s, widest string over all parts)."""
    dtype = None
    for ids, _ in iter_vectors(directory, name, manifest, vectors=False):
        part = ids_array(ids, name).dtype
        dtype = part if dtype is None or part.itemsize > dtype.itemsize else dtype
    return dtype if dtype is not None else np.dtype("<U1")


def _write_npy(path: Path, shape: Tuple[int, ...], dtype: np.dtype, blocks: Iterable[np.ndarray]) -> None:
    """A ``.npy`` file written block by block (never the whole array in memory)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": shape})
        written = 0
        for block in blocks:
            f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
            written += len(block)
    if written != shape[0]:
        raise ExportError(f"{path}: {written} rows written, the manifest says {shape[0]}")


def _add_npy(directory: Path, manifest: Dict) -> None:
    files = manifest["files"]
    for name in ("users", "items"):
        count = manifest[f"num_{name}"]
        _write_npy(directory / f"{name}.npy", (count, manifest["dimension"]), np.float32,
                   (vecs for _, vecs in iter_vectors(directory, name, manifest)))
        _write_npy(directory / f"{name}_ids.npy", (count,), _npy_id_dtype(directory, name, manifest),
                   (ids_array(ids, name) for ids, _ in iter_vectors(directory, name, manifest, vectors=False)))
        for f in (f"{name}.npy", f"{name}_ids.npy"):
            files[f] = {"rows": count, "sha256": file_sha256(directory / f)}


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


def _unit_norm(vecs: np.ndarray) -> Tuple[np.ndarray, float]:
    """Cosine score: the vectors should be unit-norm; renormalised if they are not. Returns the
    vectors and their largest norm deviation from 1."""
    norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
    deviation = float(np.max(np.abs(norms - 1.0))) if len(norms) else 0.0
    if deviation > 1e-4:
        vecs = (vecs / np.maximum(norms, 1e-12)[:, None]).astype(np.float32)
    return vecs, deviation


class _Vectors:
    """Table `name` of an export as the index sees it, read a row group at a time: float32, and
    unit-norm for the cosine score (the largest deviation seen is kept in ``deviation``)."""

    def __init__(self, directory: Path, name: str, manifest: Dict) -> None:
        self.directory, self.name, self.manifest = directory, name, manifest
        self.cosine = manifest["score"] == "cosine"
        self.count, self.dim = manifest[f"num_{name}"], manifest["dimension"]
        self.deviation = 0.0

    def _prepared(self, vecs: np.ndarray) -> np.ndarray:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if self.cosine:
            vecs, deviation = _unit_norm(vecs)
            self.deviation = max(self.deviation, deviation)
        return vecs

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, vecs in iter_vectors(self.directory, self.name, self.manifest):
            yield self._prepared(vecs)

    def rows(self, wanted: np.ndarray) -> np.ndarray:
        """The vectors of the sorted rows `wanted`, reading only the row groups that hold them."""
        out, start = np.zeros((len(wanted), self.dim), np.float32), 0
        for file in vector_files(self.directory, self.name, self.manifest):
            path = self.directory / file
            meta = pq.ParquetFile(path).metadata
            for group in range(meta.num_row_groups):
                n = meta.row_group(group).num_rows
                a, b = np.searchsorted(wanted, [start, start + n])
                if b > a:
                    _, vecs = next(_blocks(path, [group]))
                    out[a:b] = self._prepared(vecs)[wanted[a:b] - start]
                start += n
        return out


def ivf_nlist(num_items: int, nlist: int) -> int:
    """``export.ivf_nlist``, or by default 4 sqrt(N) cells with at least 39 items each (FAISS's
    k-means asks for 39 training points per centroid)."""
    if nlist:
        return nlist
    return max(1, min(int(round(4 * math.sqrt(num_items))), num_items // 39))


IVF_TRAIN_PER_CELL = 256  # k-means trains on at most this many sampled items per cell (FAISS's own cap)


def build_index(items: _Vectors, options: ExportConfig, seed: int = 0):
    """The FAISS index of ``options.faiss`` over the item vectors (inner product; label i = row i),
    the items added part by part; an IVF index's k-means trains on a seeded sample of at most
    IVF_TRAIN_PER_CELL items per cell. Returns (index, factory string, parameters)."""
    n, d = items.count, items.dim
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
        sample = sample_users(n, IVF_TRAIN_PER_CELL * params["nlist"], seed)
        index.train(items.rows(sample))
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
        params["train_sample"] = len(sample)
    if options.faiss == "hnsw":
        index.hnsw.efConstruction = options.hnsw_ef_construction
    for vecs in items:
        index.add(vecs)
    if options.faiss == "hnsw":
        index.hnsw.efSearch = options.hnsw_ef_search
    return index, factory, params


def sample_users(num_users: int, size: int, seed: int) -> np.ndarray:
    """Rows of the users whose vectors are the measurement's queries: all users when
    ``size >= num_users``, else ``sorted(np.random.default_rng(seed).choice(num_users, size, replace=False))``."""
    if size >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(seed).choice(num_users, size, replace=False))


def ann_recall(labels: np.ndarray, queries: np.ndarray, items: Iterable[np.ndarray], k: int) -> float:
    """Mean recall@K of ANN results ``labels`` [Q, K] against exact inner-product search over the
    item vectors (an array, or its blocks in row order: one block at a time is held).

    Exact scores are computed in float64 by brute force, keeping each query's K best. An ANN
    result is a true neighbour when its exact score reaches the exact K-th best score (less
    float32 rounding: ties count), so an exact index scores 1.0; a missing result (label -1) is a
    miss."""
    q = queries.astype(np.float64)
    best = np.full((len(q), k), -np.inf)
    found = np.full(labels.shape, -np.inf)
    max_item_norm, start = 0.0, 0
    blocks = [items] if isinstance(items, np.ndarray) else items
    for block in blocks:
        step = max(1, (1 << 24) // max(len(q), 1))  # at most 2^24 scores at once
        for b0 in range(0, len(block), step):
            sub = block[b0:b0 + step].astype(np.float64)
            scores = q @ sub.T
            max_item_norm = max(max_item_norm, float(np.linalg.norm(sub, axis=1).max()))
            both = np.concatenate([best, scores], axis=1)
            best = np.partition(both, both.shape[1] - k, axis=1)[:, both.shape[1] - k:]
            lo = start + b0
            inside = (labels >= lo) & (labels < lo + len(sub))
            qi, _ = np.nonzero(inside)
            found[inside] = scores[qi, labels[inside] - lo]
        start += len(block)
    kth = best.min(axis=1)
    tol = 1e-5 * np.linalg.norm(q, axis=1) * max_item_norm
    return float(((labels >= 0) & (found >= (kth - tol)[:, None])).sum()) / (len(q) * k)


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


def _add_serving(directory: Path, manifest: Dict, options: ExportConfig) -> None:
    """Write the serving artefacts of the parts in `directory` (a staging one, renamed by the
    caller) and record them, with their checksums, in `manifest`."""
    if options.npy:
        _add_npy(directory, manifest)
    if options.faiss == "none":
        return
    files = manifest["files"]
    items, users = _Vectors(directory, "items", manifest), _Vectors(directory, "users", manifest)
    t0 = time.perf_counter()
    index, factory, params = build_index(items, options, options.ann_seed)
    build_s = time.perf_counter() - t0
    if items.deviation > 1e-4:
        logger.warning("items: the score is cosine but vector norms differ from 1 by up to %.3g: renormalised for "
                       "the index", items.deviation)
    faiss.write_index(index, str(directory / "items.faiss"))  # inside the staging directory
    files["items.faiss"] = {"rows": int(index.ntotal), "sha256": file_sha256(directory / "items.faiss")}

    k = min(options.ann_k, items.count)
    queries = users.rows(sample_users(users.count, options.ann_sample_users, options.ann_seed))
    recall = throughput = None
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
        "labels": "faiss label i is row i of items/ (its parts read in order)",
        "max_norm_deviation": round(items.deviation, 7),
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


def _verified(export_dir: Path, manifest: Dict) -> Dict[str, List[str]]:
    """The vector files of each table, checked against the manifest (listed, checksums, rows and
    dimension); raises ExportError naming the first file that is not as the manifest says."""
    out = {}
    for name in ("users", "items"):
        out[name], rows = vector_files(export_dir, name, manifest), 0
        for file in out[name]:
            path, entry = export_dir / file, manifest["files"].get(file)
            if not path.is_file() or not isinstance(entry, dict):
                raise ExportError(f"{path}: missing (or not listed in manifest.json)")
            if file_sha256(path) != entry.get("sha256"):
                raise ExportError(f"{path}: sha256 does not match manifest.json (the file changed after the export)")
            try:
                schema = pq.read_schema(path)
                dim = schema.field("vector").type.list_size
                rows += pq.ParquetFile(path).metadata.num_rows
            except (pa.ArrowException, KeyError, AttributeError) as e:
                raise ExportError(f"{path}: not a vectors file ({e})") from None
            if dim != manifest.get("dimension"):
                raise ExportError(f"{path}: vectors of dimension {dim}, the manifest says {manifest.get('dimension')}")
        if rows != manifest.get(f"num_{name}"):
            raise ExportError(f"{export_dir}: {rows} {name} vectors in {out[name]}, the manifest says "
                              f"{manifest.get(f'num_{name}')}")
    return out


def export_run(export_dir: Path, options: ExportConfig) -> Dict:
    """Rebuild a training run's export directory with the serving artefacts of ``options``.

    The vector files (parts, or the single files of the older layout) are checked against the
    manifest's checksums and kept byte for byte; everything else is (re)built, reading them a row
    group at a time, and the directory is replaced atomically. Returns the manifest."""
    export_dir = Path(export_dir)
    old = _read_manifest(export_dir)
    kept = _verified(export_dir, old)
    if options.faiss == "none" and not options.npy:
        logger.warning("export.faiss=none and export.npy=false: no serving artefact to add "
                       "(the export is verified and rewritten with its Parquet files only)")
    staging = Staging(export_dir)
    manifest = {key: value for key, value in old.items() if key not in ("files", "faiss")}
    manifest["files"] = {}
    try:
        for file in kept["users"] + kept["items"]:
            (staging.path / file).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(export_dir / file, staging.path / file)
            except OSError:
                shutil.copy2(export_dir / file, staging.path / file)
            manifest["files"][file] = old["files"][file]
    except BaseException:
        staging.abort()
        raise
    staging.commit(manifest, options)
    return manifest
