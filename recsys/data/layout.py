"""The prepared layout, whichever engine wrote it: the finishing steps both engines share.

    train/part-00000.parquet ...   user, item (int64 rows)[, valid (bool)][, timestamp][, weight],
                                   ordered by a seeded key of (user, item): a shuffle
    train/pieces.json              [{"file", "row_group", "rows", "fit_rows"}] in file order: the
                                   streaming loader plans its reads without opening a file
                                   (fit_rows: the rows with valid == False)
    test/part-00000.parquet ...    user, item (int64 rows), ordered by (user, item); test/pieces.json
    users.parquet, items.parquet   vocab / identity: the raw id of each row (``user_id`` / ``item_id``),
                                   row order; hash: every raw id seen in training and its ``row``
    item_counts.npy                training interactions per item row, validation rows excluded
                                   (logQ); item_counts_all.npy: including them
    user_counts.npy                training interactions per user row (validation included)
    valid_user_counts.npy          validation rows per user row (all 0 without data.valid_fraction)
    test_user_counts.npy           test interactions per user row
    test_missing_user_counts.npy   test interactions per user row whose item has no row (dropped:
                                   the misses of the figure over all test interactions)
    test_cold_user_counts.npy      with item features: test interactions per user row whose item
                                   has no training interaction (the cold-item evaluation)
    items_features.parquet         with data.item_features: row, feature (the column's index),
                                   code (the value's row in the column's table), sorted, distinct
    items_feature_values.parquet   feature, value (text), code, n (rows having it): the value
                                   vocabulary (or the hashed rows); users_*: the same for users
    items_features/feature-K.{indptr,codes}.npy   the same as one CSR per column (memory-mapped
                                   by the loaders)
    manifest.json                  counts, schema, split, rows dropped and kept and why, the engine,
                                   the side features (columns, table sizes, what was counted)

Ids of a feature file without a training interaction get rows too (a count of 0 in
item_counts_all.npy / user_counts.npy): with data.id_mapping=vocab after the trained ones, before
the OOV rows (data.oov_buckets: the last N item rows, shared by the rare items; items.parquet then
has the ``row`` column, as with hash).

Both loaders read this one layout: ``data.loader=memory`` loads ``train/`` and ``test/`` whole
(``recsys.data.dataset.Dataset``), ``data.loader=stream`` streams the row groups.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.atomic import write_json_atomic

COUNT_FILES = ("user_counts", "item_counts_all", "item_counts", "valid_user_counts", "test_user_counts")


def number_parts(directory: Path) -> List[Path]:
    """Rename the Parquet files of `directory` (in name order: the engines write their parts in
    order) to ``part-00000.parquet``, ...; returns them in order."""
    files = sorted(p for p in directory.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_")))
    out = []
    for k, f in enumerate(files):
        target = directory / f".part-{k:05d}.parquet"
        os.rename(f, target)
        out.append(target)
    final = []
    for k, f in enumerate(out):
        target = directory / f"part-{k:05d}.parquet"
        os.rename(f, target)
        final.append(target)
    for p in directory.iterdir():  # engines' markers (_SUCCESS, .crc files)
        if p.name.startswith(("_", ".")) or p.suffix == ".crc":
            p.unlink()
    return final


GROUPS_PER_FILE = 16
"""Row groups per part file when the rows are cut again (``cut_row_groups``)."""


def cut_row_groups(directory: Path, row_group_size: int, groups_per_file: int = GROUPS_PER_FILE) -> None:
    """Make the parts of `directory` hold row groups of exactly `row_group_size` rows (the last
    one shorter), ``groups_per_file`` per file, keeping the row order: engines size row groups their
    own way (DuckDB in multiples of its 2,048-row vectors, Spark in bytes). Nothing is done when
    the groups already have that size (DuckDB's, when the size is a multiple of 2,048); otherwise the rows are copied a row group at a time (memory: one
    group)."""
    parts = sorted(directory.glob("part-*.parquet"))
    metas = [pq.read_metadata(f) for f in parts]
    sizes = [m.row_group(g).num_rows for m in metas for g in range(m.num_row_groups)]
    if all(n == row_group_size for n in sizes[:-1]) and (not sizes or sizes[-1] <= row_group_size):
        return
    staging = directory / "_cut"
    staging.mkdir()
    buffer, buffered, k, group_in_file, writer, schema = [], 0, -1, groups_per_file, None, None

    def flush(n: int) -> None:
        nonlocal buffer, buffered, k, group_in_file, writer
        table = pa.concat_tables(buffer)
        group, rest = table.slice(0, n), table.slice(n)
        buffer, buffered = ([rest] if len(rest) else []), len(rest)
        if group_in_file == groups_per_file:
            if writer is not None:
                writer.close()
            k, group_in_file = k + 1, 0
            writer = pq.ParquetWriter(staging / f"part-{k:05d}.parquet", schema)
        writer.write_table(group, row_group_size=n)
        group_in_file += 1

    for f in parts:
        pf = pq.ParquetFile(f)
        schema = schema or pf.schema_arrow
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            buffer.append(table)
            buffered += len(table)
            while buffered >= row_group_size:
                flush(row_group_size)
    if buffered:
        flush(buffered)
    if writer is not None:
        writer.close()
    for f in parts:
        f.unlink()
    for f in sorted(staging.iterdir()):
        os.rename(f, directory / f.name)
    staging.rmdir()


def write_pieces(root: Path, part: str) -> int:
    """``<part>/pieces.json`` from the files' metadata (and their ``valid`` column, a row group at
    a time); returns the number of rows."""
    pieces, total = [], 0
    for f in sorted((root / part).glob("part-*.parquet")):
        pf = pq.ParquetFile(f)
        has_valid = "valid" in pf.schema_arrow.names
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            fit = rows
            if has_valid:
                fit -= int(pc.sum(pf.read_row_group(g, columns=["valid"])["valid"]).as_py() or 0)
            pieces.append({"file": f"{part}/{f.name}", "row_group": g, "rows": rows, "fit_rows": fit})
            total += rows
    write_json_atomic(pieces, root / part / "pieces.json")
    return total


def counts_npy(batches: Iterable[pa.RecordBatch], num_rows: int, path: Path) -> np.ndarray:
    """A per-row count array written as ``.npy`` from (row, count) batches (rows absent: 0),
    filled a batch at a time into a memory map: nothing of size rows x batches held."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(num_rows,))
    out[:] = 0
    for batch in batches:
        if batch.num_rows:
            rows = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
            out[rows] += batch.column(1).to_numpy(zero_copy_only=False).astype(np.int64)
    out.flush()
    return out


def feature_csr_npy(path: Path, directory: Path, num_rows: int, num_features: int) -> None:
    """The prepared ``<stem>_features.parquet`` (row, feature, code; sorted by row, feature, code)
    as one CSR per feature column, ``<directory>/feature-K.indptr.npy`` (int64, num_rows + 1) and
    ``feature-K.codes.npy`` (int64): what the loaders memory-map, so that a rank holds the pages
    of the rows it reads rather than every id's values. Two passes over the file a row group at a
    time (memory: one row group); the codes of a feature are in CSR order in the file already."""
    directory.mkdir(parents=True, exist_ok=True)
    pf = pq.ParquetFile(path)
    counts = [np.zeros(num_rows, dtype=np.int64) for _ in range(num_features)]
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=["row", "feature"])
        rows, feature = t["row"].to_numpy(), t["feature"].to_numpy()
        for k in range(num_features):
            counts[k] += np.bincount(rows[feature == k], minlength=num_rows)
    codes, cursor = [], [0] * num_features
    for k in range(num_features):
        indptr = np.lib.format.open_memmap(directory / f"feature-{k}.indptr.npy", mode="w+", dtype=np.int64,
                                           shape=(num_rows + 1,))
        indptr[0] = 0
        np.cumsum(counts[k], out=indptr[1:])
        indptr.flush()
        codes.append(np.lib.format.open_memmap(directory / f"feature-{k}.codes.npy", mode="w+", dtype=np.int64,
                                               shape=(int(indptr[-1]),)))
        del indptr
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=["feature", "code"])
        feature, code = t["feature"].to_numpy(), t["code"].to_numpy()
        for k in range(num_features):
            mine = code[feature == k]
            codes[k][cursor[k] : cursor[k] + len(mine)] = mine
            cursor[k] += len(mine)
    for c in codes:
        c.flush()


def parts_to_file(parts: List[Path], dest: Path, schema: pa.Schema) -> int:
    """Concatenate Parquet parts (in the given order) into one file, a row group at a time."""
    rows = 0
    with pq.ParquetWriter(dest, schema) as writer:
        for f in parts:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g).cast(schema)
                writer.write_table(table)
                rows += len(table)
    return rows
