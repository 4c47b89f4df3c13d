"""The streaming preparation: two passes over the source that never hold the log.

Used when ``data.loader`` resolves to ``stream`` (``recsys.data.prepare.resolve_loader``). Memory stays
bounded by the number of distinct ids (the vocabularies and the per-row counts), never by the
number of interactions. The prepared directory (``recsys.data.prepare.prepared_dir``) holds::

    train/part-00000.parquet ...   user, item (int64 rows)[, valid (bool)][, timestamp][, weight];
                                   row groups of data.row_group_size rows
    train/pieces.json              [{"file", "row_group", "rows", "fit_rows"}] in file order: the
                                   loader plans its reads without opening a file (fit_rows: the
                                   rows with valid == False)
    test/part-00000.parquet ...    user, item (int64 rows); test/pieces.json likewise
    users.parquet, items.parquet   vocab / identity: the raw id of each row (``user_id`` / ``item_id``);
                                   hash: every raw id seen in training and its ``row``
    item_counts.npy                train interactions per item row, validation rows excluded (logQ,
                                   popularity); item_counts_all.npy: including them
    user_counts.npy                train interactions per user row (validation included)
    valid_user_counts.npy          validation rows per user row (all 0 without data.valid_fraction)
    test_user_counts.npy           test interactions per user row
    manifest.json                  as the in-memory prepare's, plus "loader": "stream" (and "hash")

Two passes over the source (its files' schemas checked first): pass 1 streams the rows once,
deciding the split per row (``recsys.data.hashing.split_masks``) and collecting the distinct
training ids (the vocabulary); pass 2 encodes every row through a ``pandas.Index`` built once and
writes the row groups and the counts. ``data=synthetic`` first writes its event log
(``recsys.data.synthetic.generate_stream``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys.atomic import write_json_atomic, write_parquet_atomic
from recsys.config import DataConfig
from recsys.data.hashing import collision_stats, id_hash, rows_from_hash, split_masks
from recsys.data.readers import ROLE_WORD, DataError, _first_true, _one_line, column_roles, source_files
from recsys.data.synthetic import GROUPS_PER_FILE, generate_stream

logger = logging.getLogger(__name__)

BATCH_ROWS = 1 << 18
"""Rows per batch read from the source (each pass holds a few such batches at a time)."""


# ---------------------------------------------------------------------------------------------
# The source: files and their schemas, checked before any work
# ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    """The files of a ``parquet`` / ``csv`` source with the column of each role, checked."""

    path: str
    files: List[str]
    file_format: ds.FileFormat
    what: str
    columns: Dict[str, str]
    """role (user_id, item_id[, timestamp, weight, rating]) -> the files' column name."""
    id_types: Dict[str, pa.DataType]
    """user_id / item_id -> int64 or string (what every batch is cast to)."""
    timestamp_type: Optional[pa.DataType]


def parquet_rows(path: str) -> Optional[int]:
    """Rows of a Parquet file or directory from the files' metadata (unreadable files count 0);
    None when the path does not exist."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        files = ds.dataset(str(p), format="parquet", exclude_invalid_files=False).files if p.is_dir() else [str(p)]
    except (pa.ArrowInvalid, OSError):
        return None
    total = 0
    for f in files:
        try:
            total += pq.read_metadata(f).num_rows
        except (pa.ArrowInvalid, OSError):
            pass
    return total


def open_source(path: str, fmt: str, cfg: DataConfig) -> Source:
    """Check every file's columns and types (from its schema, without reading the rows): a missing
    column, an id type other than integers or strings, files disagreeing on the columns or on the
    id types are refused naming the file and the column."""
    p = Path(path)
    files, file_format, what = source_files(p, fmt, cfg.separator)
    first: Optional[Tuple[str, Dict[str, str], Dict[str, pa.DataType]]] = None
    any_float_time = False
    for f in files:
        try:
            schema = ds.dataset(f, format=file_format).schema
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: cannot be read as {what}: {_one_line(e)}") from None
        columns = column_roles(f, schema, fmt, cfg.user_column, cfg.item_column, cfg.timestamp_column,
                               cfg.weight_column, cfg.rating_column)
        types = {}
        for role in ("user_id", "item_id"):
            t = schema.field(columns[role]).type
            if cfg.id_mapping == "identity" and not pa.types.is_integer(t):
                key = "num_users" if role == "user_id" else "num_items"
                raise DataError(f"{f}: column {columns[role]!r} has type {t}; data.id_mapping=identity needs integer "
                                f"{ROLE_WORD[role]} ids 0..data.{key}-1 (use data.id_mapping=vocab for other ids)")
            types[role] = pa.int64() if pa.types.is_integer(t) else pa.string()
        if "timestamp" in columns:
            t = schema.field(cfg.timestamp_column).type
            if not (pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_integer(t)
                    or pa.types.is_floating(t)):
                raise DataError(f"{f}: timestamp column has type {t}; expected integers, floats or timestamps "
                                "(set data.timestamp_column=null to ignore it)")
            any_float_time |= pa.types.is_floating(t)
        if first is None:
            first = (f, columns, types)
            continue
        if set(columns) != set(first[1]):
            raise DataError(f"{f}: has columns {sorted(columns)} but {first[0]} has {sorted(first[1])} (after the "
                            "column mapping); every file must have the same ones")
        for role in ("user_id", "item_id"):
            if types[role] != first[2][role]:
                t, t0 = schema.field(columns[role]).type, "integers" if first[2][role] == pa.int64() else "strings"
                raise DataError(f"{f}: column {columns[role]!r} has type {t} but {first[0]} has {t0}; every file "
                                "must give the ids the same type")
    timestamp_type = None
    if "timestamp" in first[1]:
        timestamp_type = pa.float64() if any_float_time else pa.int64()
    return Source(str(p), files, file_format, what, first[1], first[2], timestamp_type)


def _synthetic_source(path: Path) -> Source:
    files = sorted(str(f) for f in path.glob("part-*.parquet"))
    return Source(str(path), files, ds.ParquetFileFormat(), "Parquet",
                  {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"},
                  {"user_id": pa.int64(), "item_id": pa.int64()}, pa.int64())


@dataclass
class _Filtered:
    """Rows read and rows left out by the reader (counted, never silent)."""

    rows: int = 0
    null_ids: int = 0
    below_min_rating: int = 0


def _batches(src: Source, cfg: DataConfig, filtered: _Filtered) -> Iterator[Tuple[str, pa.Table]]:
    """The source's rows in file order, BATCH_ROWS at a time, as (file, table of the roles' columns)
    (ids as int64 / string, timestamp int64 or float64 seconds, weight and rating float64);
    rows with null ids dropped (counted) or refused, ``min_rating`` applied (counted), identity
    ids checked against the table sizes. An error names the file and the row."""
    columns = {role: ds.field(col) for role, col in src.columns.items()}
    file_format = src.file_format
    if isinstance(file_format, ds.ParquetFileFormat):  # read one row group at a time, no read-ahead
        file_format = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
            pre_buffer=False))
    for f in src.files:
        try:
            scanner = ds.dataset(f, format=file_format).scanner(
                columns=columns, batch_size=BATCH_ROWS, batch_readahead=0, fragment_readahead=0,
                use_threads=False)
            batches = scanner.to_batches()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: cannot be read as {src.what}: {_one_line(e)}") from None
        offset = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
                raise DataError(f"{f}: cannot be read as {src.what} (corrupt or truncated?): {_one_line(e)}") from None
            table = pa.Table.from_batches([batch])
            if len(table):
                yield f, _clean(table, src, cfg, f, offset, filtered)
            offset += batch.num_rows


def _clean(table: pa.Table, src: Source, cfg: DataConfig, f: str, offset: int, filtered: _Filtered) -> pa.Table:
    """One batch (rows offset.. of file f) cast, checked and filtered (see _batches)."""
    filtered.rows += len(table)
    where = lambda row: f"{f}, row {offset + row + 1}"  # noqa: E731
    for role in ("user_id", "item_id"):
        i = table.schema.get_field_index(role)
        table = table.set_column(i, role, table[role].cast(src.id_types[role]))
    valid = pc.and_(pc.is_valid(table["user_id"]), pc.is_valid(table["item_id"]))
    n_null = len(table) - (pc.sum(valid).as_py() or 0)
    if n_null and cfg.null_ids == "error":
        row = _first_true(pc.invert(valid))
        role = "user_id" if not table["user_id"][row].is_valid else "item_id"
        raise DataError(f"{where(row)}: null {ROLE_WORD[role]} id (column {src.columns[role]!r}); "
                        "data.null_ids=drop drops such rows and counts them")
    if n_null:
        filtered.null_ids += n_null
        table = table.filter(valid)
    if cfg.id_mapping == "identity":
        for role, limit, key in (("user_id", cfg.num_users, "num_users"), ("item_id", cfg.num_items, "num_items")):
            bad = pc.or_(pc.less(table[role], 0), pc.greater_equal(table[role], limit))
            if pc.any(bad).as_py():
                row = _first_true(bad)
                raise DataError(f"{where(row)}: {ROLE_WORD[role]} id {table[role][row].as_py()} (column "
                                f"{src.columns[role]!r}) "
                                f"is out of range [0, {limit}) of data.id_mapping=identity with data.{key}={limit}")
    if "timestamp" in table.column_names:
        i = table.schema.get_field_index("timestamp")
        t = table.schema.field("timestamp").type
        ts = table["timestamp"]
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            ts = pc.cast(ts, pa.timestamp("s")).cast(pa.int64())
        table = table.set_column(i, "timestamp", ts.cast(src.timestamp_type))
    for role in ("weight", "rating"):
        if role in table.column_names:
            table = table.set_column(table.schema.get_field_index(role), role, table[role].cast(pa.float64()))
    if cfg.min_rating is not None and "rating" in table.column_names:
        keep = pc.fill_null(pc.greater_equal(table["rating"], cfg.min_rating), False)
        filtered.below_min_rating += len(table) - (pc.sum(keep).as_py() or 0)
        table = table.filter(keep)
    return table


# ---------------------------------------------------------------------------------------------
# Pass 1: the split and the distinct training ids
# ---------------------------------------------------------------------------------------------


class DistinctIds:
    """Distinct values of a stream of Arrow arrays, in memory bounded by the distinct values (about
    three times their size, with the lookup table), never by the number of values: each batch's
    distinct values are looked up among those known (a ``pandas.Index``) and only the new ones are
    kept, merged into the known ones once they outnumber half of them."""

    def __init__(self, type_: pa.DataType) -> None:
        self.known = pa.array([], type_)
        self.index: Optional[pd.Index] = None
        self.new: List[pa.Array] = []
        self.pending = 0

    def add(self, values) -> None:
        unique = pc.unique(values)
        if self.index is not None:
            unique = unique.filter(pa.array(_lookup(self.index, unique) < 0))
        if len(unique):
            self.new.append(unique)
            self.pending += len(unique)
            if self.pending > max(BATCH_ROWS, len(self.known) // 2):
                self._merge()

    def _merge(self) -> None:
        if self.new:
            fresh = pc.unique(pa.concat_arrays(self.new))  # new ids found in several batches, once
            self.known = pa.concat_arrays([self.known, fresh])
            self.index = _as_index(self.known)
            self.new, self.pending = [], 0

    def sorted(self) -> pa.Array:
        """The distinct values in Arrow's sort order (that of pc.unique(...).sort())."""
        self._merge()
        return self.known.sort()


def _lookup(index: pd.Index, ids: pa.Array) -> np.ndarray:
    """Position of each id in `index` (-1 when absent), vectorised; string ids are dictionary
    encoded first, so each distinct string of the batch is looked up once."""
    if pa.types.is_integer(ids.type):
        return index.get_indexer(ids.to_numpy())
    encoded = pc.dictionary_encode(ids)
    return index.get_indexer(encoded.dictionary.to_numpy(zero_copy_only=False))[encoded.indices.to_numpy()]


def _as_index(values: pa.Array) -> pd.Index:
    return pd.Index(values.to_numpy(zero_copy_only=False), copy=False)


# ---------------------------------------------------------------------------------------------
# Pass 2: row groups out
# ---------------------------------------------------------------------------------------------


class RowGroupWriter:
    """Tables of any length in, Parquet parts of ``groups_per_file`` row groups of exactly
    ``row_group_size`` rows out (the last one shorter); records each group as a piece."""

    def __init__(self, directory: Path, name: str, schema: pa.Schema, row_group_size: int,
                 groups_per_file: int = GROUPS_PER_FILE) -> None:
        self.directory, self.name, self.schema = directory, name, schema
        self.row_group_size, self.groups_per_file = row_group_size, groups_per_file
        self.buffer: List[pa.Table] = []
        self.buffered = 0
        self.writer: Optional[pq.ParquetWriter] = None
        self.file_index, self.group_in_file = -1, 0
        self.pieces: List[dict] = []
        (directory / name).mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        if len(table) == 0:
            return
        self.buffer.append(table)
        self.buffered += len(table)
        while self.buffered >= self.row_group_size:
            self._flush(self.row_group_size)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        group, rest = table.slice(0, n).combine_chunks(), table.slice(n)
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)
        if self.writer is None or self.group_in_file == self.groups_per_file:
            if self.writer is not None:
                self.writer.close()
            self.file_index += 1
            self.group_in_file = 0
            self.writer = pq.ParquetWriter(self.directory / self.name / f"part-{self.file_index:05d}.parquet",
                                           self.schema)
        self.writer.write_table(group, row_group_size=n)
        fit = n - (int(pc.sum(group["valid"]).as_py() or 0) if "valid" in group.column_names else 0)
        self.pieces.append({"file": f"{self.name}/part-{self.file_index:05d}.parquet",
                            "row_group": self.group_in_file, "rows": n, "fit_rows": fit})
        self.group_in_file += 1

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------
# The streaming prepare
# ---------------------------------------------------------------------------------------------


def _add_counts(counts: np.ndarray, rows: np.ndarray) -> None:
    """counts[r] += 1 for each r of rows: a bincount for small tables, an unbuffered add for large
    ones (a bincount's full-length array per batch would cost more than the batch)."""
    if len(rows) * 8 >= len(counts):
        counts += np.bincount(rows, minlength=len(counts))
    else:
        np.add.at(counts, rows, 1)


def _bar(total: Optional[int], desc: str, progress: Optional[bool]) -> tqdm:
    return tqdm(total=total, unit=" rows", unit_scale=True, desc=desc,
                disable=None if progress is None else not progress)


def prepare_stream(cfg: DataConfig, tmp: Path, version: int, progress: Optional[bool] = None) -> dict:
    """Prepare the dataset of `cfg` into the (empty, temporary) directory `tmp` in the streaming
    layout (module docstring) and return its manifest (not written: the caller writes it last
    and renames the directory). ``data=synthetic`` first generates its raw log into
    ``tmp/raw`` (removed at the end). Bad input raises ``DataError`` (naming the file, the
    column or row, and the reason) before anything but the raw synthetic log is written, except
    an empty test split, found in pass 2."""
    t0 = time.perf_counter()
    src, source_name = _stream_source(cfg, tmp, progress)
    vocab = _pass1(src, cfg, progress)
    logger.info("pass 1: %d rows, %d distinct training users, %d items (%.1fs)", vocab.filtered.rows,
                len(vocab.users), len(vocab.items), time.perf_counter() - t0)
    out = _pass2(src, cfg, vocab, tmp, progress)
    hash_stats = _write_ids(cfg, vocab, tmp)
    for name, counts in out.counts.items():
        np.save(tmp / f"{name}.npy", counts)
    write_json_atomic(out.train.pieces, tmp / "train" / "pieces.json")
    write_json_atomic(out.test.pieces, tmp / "test" / "pieces.json")
    if cfg.name == "synthetic":
        shutil.rmtree(tmp / "raw")
    manifest = _manifest(cfg, version, source_name, vocab, out, hash_stats)
    logger.info("streaming prepare: %d rows in %.1fs (%.0f rows/s)", vocab.filtered.rows, time.perf_counter() - t0,
                vocab.filtered.rows / max(time.perf_counter() - t0, 1e-9))
    return manifest


def _stream_source(cfg: DataConfig, tmp: Path, progress: Optional[bool]) -> Tuple[Source, str]:
    """The checked source (``data=synthetic``: its event log generated into ``tmp/raw`` first) and
    its name in messages."""
    if cfg.name == "synthetic":
        t0 = time.perf_counter()
        generate_stream(tmp / "raw", cfg.num_users, cfg.num_items, cfg.num_interactions, cfg.latent_dim,
                        cfg.popularity_exponent, cfg.affinity, cfg.seed, progress=progress)
        logger.info("generated %d synthetic interactions in %.1fs", cfg.num_interactions, time.perf_counter() - t0)
        src, source_name = _synthetic_source(tmp / "raw"), "synthetic"
    else:
        src, source_name = open_source(cfg.path, cfg.name, cfg), cfg.path
    if cfg.duplicates == "drop":  # a synthetic event log has repeats by design
        logger.log(logging.INFO if cfg.name == "synthetic" else logging.WARNING,
                   "%s: repeated (user, item) pairs are kept with data.loader=stream (a streaming prepare cannot find "
                   "them across the whole log; the repeats of a pair all fall on one side of the split); "
                   "data.loader=memory drops them", source_name)
    return src, source_name


@dataclass
class _Vocabulary:
    """What pass 1 found: the sorted distinct training ids, their lookup indexes, the table sizes,
    and the rows read and left out."""

    users: pa.Array
    items: pa.Array
    user_index: pd.Index
    item_index: pd.Index
    num_users: int
    num_items: int
    filtered: _Filtered
    kept_rows: int


def _pass1(src: Source, cfg: DataConfig, progress: Optional[bool]) -> _Vocabulary:
    """Pass 1: the split decided per row, the distinct training ids (and the test ids, to refuse
    unseen ones with ``data.unseen_test=error``); empty inputs refused."""
    filtered = _Filtered()
    train_ids = {r: DistinctIds(src.id_types[r]) for r in ("user_id", "item_id")}
    test_ids = {r: DistinctIds(src.id_types[r]) for r in ("user_id", "item_id")} if cfg.unseen_test == "error" else None
    total = parquet_rows(src.path) if src.what == "Parquet" else None
    with _bar(total, "prepare 1/2: vocabulary", progress) as bar:
        for _, table in _batches(src, cfg, filtered):
            users, items = table["user_id"].combine_chunks(), table["item_id"].combine_chunks()
            is_test, _ = split_masks(id_hash(users), id_hash(items), cfg.seed, cfg.test_fraction, 0.0)
            train = pa.array(~is_test)
            train_ids["user_id"].add(users.filter(train))
            train_ids["item_id"].add(items.filter(train))
            if test_ids is not None:
                test_ids["user_id"].add(users.filter(pa.array(is_test)))
                test_ids["item_id"].add(items.filter(pa.array(is_test)))
            bar.update(filtered.rows - bar.n)
    kept_rows = filtered.rows - filtered.null_ids - filtered.below_min_rating
    if kept_rows == 0:
        why = (f"after dropping {filtered.null_ids} rows with null ids" if not filtered.below_min_rating else
               f"all {filtered.below_min_rating} rows are below data.min_rating={cfg.min_rating}")
        raise DataError(f"{src.path}: no interactions ({why})")
    users_seen, items_seen = train_ids["user_id"].sorted(), train_ids["item_id"].sorted()
    if len(users_seen) == 0:
        raise DataError(f"{src.path}: the training split is empty")
    if test_ids is not None:
        _refuse_unseen(src.path, test_ids, users_seen, items_seen)
    del train_ids, test_ids  # their lookup tables: pass 2 builds its own, once
    if cfg.id_mapping == "vocab":
        num_users, num_items = len(users_seen), len(items_seen)
    else:  # identity and hash: the declared table sizes
        num_users, num_items = cfg.num_users, cfg.num_items
    return _Vocabulary(users_seen, items_seen, _as_index(users_seen), _as_index(items_seen), num_users, num_items,
                       filtered, kept_rows)


@dataclass
class _Encoded:
    """What pass 2 wrote and counted."""

    train: RowGroupWriter
    test: RowGroupWriter
    counts: Dict[str, np.ndarray]
    """item_counts, item_counts_all, user_counts, valid_user_counts, test_user_counts (the ``*.npy``)."""
    unseen: Dict[str, int]
    extras: List[str]
    """The optional columns kept (timestamp, weight)."""


def _pass2(src: Source, cfg: DataConfig, vocab: _Vocabulary, tmp: Path, progress: Optional[bool]) -> _Encoded:
    """Pass 2: every row encoded to table rows, written as row groups, counted; an empty test split
    refused."""
    fields = [("user", pa.int64()), ("item", pa.int64())]
    if cfg.valid_fraction > 0:
        fields.append(("valid", pa.bool_()))
    extras = [c for c in ("timestamp", "weight") if c in src.columns]
    fields += [(c, src.timestamp_type if c == "timestamp" else pa.float64()) for c in extras]
    out = _Encoded(RowGroupWriter(tmp, "train", pa.schema(fields), cfg.row_group_size),
                   RowGroupWriter(tmp, "test", pa.schema(fields[:2]), cfg.row_group_size),
                   {name: np.zeros(vocab.num_items if name.startswith("item") else vocab.num_users, dtype=np.int64)
                    for name in ("item_counts", "item_counts_all", "user_counts", "valid_user_counts",
                                 "test_user_counts")},
                   {"test_unseen_user": 0, "test_unseen_item": 0}, extras)
    n_test_raw = 0
    with _bar(vocab.kept_rows, "prepare 2/2: encode", progress) as bar:
        for f, table in _batches(src, cfg, _Filtered()):
            n_test_raw += _encode(f, table, cfg, vocab, out)
            bar.update(len(table))
    out.train.close()
    out.test.close()
    if int(out.counts["test_user_counts"].sum()) == 0:
        raise DataError(f"{src.path}: the test split is empty ({n_test_raw} rows fell in it, data.test_fraction="
                        f"{cfg.test_fraction}, and {sum(out.unseen.values())} had a user or item never seen in training)")
    return out


def _encode(f: str, table: pa.Table, cfg: DataConfig, vocab: _Vocabulary, out: _Encoded) -> int:
    """One batch of pass 2 (rows of file `f`): written and counted into `out`; returns how many of
    its rows fell in the test split."""
    users, items = table["user_id"].combine_chunks(), table["item_id"].combine_chunks()
    hu, hi = id_hash(users), id_hash(items)
    is_test, is_valid = split_masks(hu, hi, cfg.seed, cfg.test_fraction, cfg.valid_fraction)
    pos_u, pos_i = _lookup(vocab.user_index, users), _lookup(vocab.item_index, items)
    if cfg.id_mapping == "vocab":
        _check_known(f, ~is_test, pos_u, pos_i, users, items)
        rows_u, rows_i = pos_u, pos_i
    elif cfg.id_mapping == "identity":
        rows_u, rows_i = users.to_numpy(), items.to_numpy()
    else:
        rows_u, rows_i = rows_from_hash(hu, cfg.seed, vocab.num_users), rows_from_hash(hi, cfg.seed, vocab.num_items)
    out.unseen["test_unseen_user"] += int((is_test & (pos_u < 0)).sum())
    out.unseen["test_unseen_item"] += int((is_test & (pos_u >= 0) & (pos_i < 0)).sum())
    train, test = ~is_test, is_test & (pos_u >= 0) & (pos_i >= 0)
    cols = {"user": rows_u[train], "item": rows_i[train]}
    if cfg.valid_fraction > 0:
        cols["valid"] = is_valid[train]
    for c in out.extras:
        cols[c] = table[c].filter(pa.array(train))
    out.train.write(pa.table(cols, schema=out.train.schema))
    out.test.write(pa.table({"user": rows_u[test], "item": rows_i[test]}, schema=out.test.schema))
    c = out.counts
    _add_counts(c["user_counts"], cols["user"])
    _add_counts(c["item_counts_all"], cols["item"])
    _add_counts(c["item_counts"], cols["item"][~is_valid[train]])
    _add_counts(c["valid_user_counts"], cols["user"][is_valid[train]])
    _add_counts(c["test_user_counts"], rows_u[test])
    return int(is_test.sum())


def _write_ids(cfg: DataConfig, vocab: _Vocabulary, tmp: Path) -> Optional[Dict[str, Dict[str, float]]]:
    """users.parquet / items.parquet (vocab: the ids of the rows; identity: 0..N-1; hash: every id
    seen and its row); returns the hash collision figures (hash only)."""
    hash_stats = None
    for which, seen, column, n in (("users", vocab.users, "user_id", vocab.num_users),
                                   ("items", vocab.items, "item_id", vocab.num_items)):
        if cfg.id_mapping == "hash":
            rows = rows_from_hash(id_hash(seen), cfg.seed, n)
            table = pa.table({column: seen, "row": rows})
            hash_stats = hash_stats or {}
            hash_stats[which] = collision_stats(rows)
            logger.info("data.id_mapping=hash: %d distinct %s ids in %d rows used (of %d): collision rate %.4f",
                        hash_stats[which]["distinct_ids"], which[:-1], hash_stats[which]["rows_used"], n,
                        hash_stats[which]["collision_rate"])
        elif cfg.id_mapping == "identity":
            table = pa.table({column: pa.array(np.arange(n), pa.int64())})
        else:
            table = pa.table({column: seen})
        write_parquet_atomic(table, tmp / f"{which}.parquet")
    return hash_stats


def _manifest(cfg: DataConfig, version: int, source_name: str, vocab: _Vocabulary, out: _Encoded,
              hash_stats: Optional[Dict]) -> dict:
    """The streamed dataset's manifest; the rows dropped are logged."""
    filtered = vocab.filtered
    dropped = {"null_ids": filtered.null_ids}
    if cfg.rating_column:
        dropped["below_min_rating"] = filtered.below_min_rating
    dropped.update(out.unseen)
    for reason, count in dropped.items():
        if count:
            logger.warning("%s: dropped %d rows (%s)", source_name, count, reason.replace("_", " "))
    counts = out.counts
    n_train = int(counts["user_counts"].sum())
    manifest = {
        "version": version,
        "source": source_name,
        "config": dataclasses.asdict(cfg),
        "loader": "stream",
        "split": cfg.split,
        "id_mapping": cfg.id_mapping,
        "schema": {"user_id": str(vocab.users.type), "item_id": str(vocab.items.type),
                   "timestamp": "timestamp" in out.extras, "weight": "weight" in out.extras},
        "counts": {
            "raw_interactions": filtered.rows,
            "num_users": vocab.num_users,
            "num_items": vocab.num_items,
            "train_interactions": n_train,
            "test_interactions": int(counts["test_user_counts"].sum()),
            "test_users": int(np.count_nonzero(counts["test_user_counts"])),
            "valid_interactions": n_train - int(counts["item_counts"].sum()),
        },
        "dropped": dropped,
        "kept": {},
        "row_group_size": cfg.row_group_size,
        "train_row_groups": len(out.train.pieces),
    }
    if hash_stats:
        manifest["hash"] = hash_stats
    return manifest


def _check_known(f: str, train: np.ndarray, pos_u: np.ndarray, pos_i: np.ndarray, users: pa.Array,
                 items: pa.Array) -> None:
    """Pass 2, ``data.id_mapping=vocab``: every training row's ids are in the vocabulary of pass 1
    (else the source changed between the passes, and the row would get no table row)."""
    for role, pos, ids in (("user_id", pos_u, users), ("item_id", pos_i, items)):
        missing = train & (pos < 0)
        if missing.any():
            first = ids[int(np.flatnonzero(missing)[0])].as_py()
            raise DataError(f"{f}: changed during preparation: {int(missing.sum())} training rows have a "
                            f"{ROLE_WORD[role]} id that the first pass did not see (the first: {first!r}); "
                            "prepare again from a source that is not being written")


def _refuse_unseen(source: str, test_ids: Dict[str, DistinctIds], users: pa.Array, items: pa.Array) -> None:
    """data.unseen_test=error: refuse test ids that no training row has (before anything is written)."""
    parts = []
    for role, seen in (("user_id", users), ("item_id", items)):
        ids = test_ids[role].sorted()
        missing = ids.filter(pc.invert(pc.is_in(ids, value_set=seen)))
        if len(missing):
            word = ROLE_WORD[role]
            parts.append(f"{len(missing)} distinct {word}s never seen in training (the first: {word} "
                         f"{missing[0].as_py()!r})")
    if parts:
        raise DataError(f"{source}: the test split has {' and '.join(parts)}; no vector is trained for them "
                        "(data.unseen_test=drop drops their rows and counts them)")
