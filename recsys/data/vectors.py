"""Vector files: raw ids with a vector each, read for the ids a rank wants.

A vector file is a Parquet file, or a directory of them (read in name order), with an id column
and a ``vector`` column (a list or fixed-size list of floats, one length throughout): another
model's embeddings, or a ``recsys`` export's ``items/`` or ``users/`` parts. ``vectors_for``
streams it a row group at a time and keeps only the rows whose id is wanted, so a rank holds
its own rows' vectors, never the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.errors import DataError

VECTOR_COLUMN = "vector"


@dataclass
class Found:
    """The wanted ids a vector file has: ``positions`` into the wanted array, their ``vectors``."""

    positions: np.ndarray
    vectors: np.ndarray
    file_rows: int
    """Rows of the file (every id, wanted or not)."""
    repeated: np.ndarray
    """Positions of wanted ids the file gives more than once, once per extra time (the first
    vector is used)."""


def vector_files(path: Path) -> List[Path]:
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise DataError(f"{path}: no such vector file (a Parquet file or a directory of them)")
    return files


OTHER_TABLE = {"item_id": "user_id", "user_id": "item_id"}


def id_column(schema: pa.Schema, file: Path, preferred: str) -> str:
    """The file's id column: `preferred` (``item_id`` / ``user_id``, as an export names it) or its
    only column besides ``vector`` (not the other table's export column: a user file given for
    the items is refused, not matched by chance)."""
    if VECTOR_COLUMN not in schema.names:
        raise DataError(f"{file}: no column '{VECTOR_COLUMN}' (a vector file has an id column and '{VECTOR_COLUMN}', "
                        f"a list of floats per row); columns: {schema.names}")
    vtype = schema.field(VECTOR_COLUMN).type
    if not (pa.types.is_list(vtype) or pa.types.is_fixed_size_list(vtype) or pa.types.is_large_list(vtype)) \
            or not pa.types.is_floating(vtype.value_type):
        raise DataError(f"{file}: column '{VECTOR_COLUMN}' has type {vtype}; it must be a list of floats")
    if preferred in schema.names:
        return preferred
    others = [n for n in schema.names if n != VECTOR_COLUMN]
    if others == [OTHER_TABLE.get(preferred)]:
        raise DataError(f"{file}: its ids are in column '{others[0]}', another table's (this file gives the "
                        f"{'items' if preferred == 'item_id' else 'users'}' vectors, ids in '{preferred}')")
    if len(others) != 1:
        raise DataError(f"{file}: which column holds the ids? no '{preferred}' column and {len(others)} others "
                        f"({others}); keep only the id column and '{VECTOR_COLUMN}'")
    return others[0]


def vector_dim(path: Path, preferred_id: str) -> Optional[int]:
    """The length of the vector file's vectors: from the schema (a fixed-size list), else from its
    first non-null vector (the first row group, normally); None when it has no vector at all.
    Cheap: every rank reads it before the model is built. (``vectors_for`` checks every row.)"""
    for file in vector_files(path):
        pf = pq.ParquetFile(file)
        id_column(pf.schema_arrow, file, preferred_id)  # a vector column of floats, an id column
        vtype = pf.schema_arrow.field(VECTOR_COLUMN).type
        if pa.types.is_fixed_size_list(vtype):
            return vtype.list_size
        for group in range(pf.num_row_groups):
            lengths = pc.list_value_length(pf.read_row_group(group, columns=[VECTOR_COLUMN])[VECTOR_COLUMN])
            valid = lengths.drop_null()
            if len(valid):
                return int(valid[0].as_py())
    return None


class _Lookup:
    """Positions of ids in `wanted` (distinct ids), -1 where absent; built once for the whole file
    (a sorted array for integer ids, a pandas hash index for strings)."""

    def __init__(self, wanted: pa.Array) -> None:
        self.integer = pa.types.is_integer(wanted.type)
        if self.integer:
            values = wanted.to_numpy(zero_copy_only=False).astype(np.int64)
            self.order = np.argsort(values, kind="stable")
            self.sorted = values[self.order]
        else:
            self.index = pd.Index(wanted.to_pandas(), dtype=object)

    def positions(self, ids: pa.Array) -> np.ndarray:
        missing = ids.is_null().to_numpy(zero_copy_only=False)
        if self.integer:
            if pa.types.is_unsigned_integer(ids.type):  # ids above int64's range can match none
                missing |= pc.greater(ids, np.iinfo(np.int64).max).fill_null(True).to_numpy(zero_copy_only=False)
            values = ids.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            if len(self.sorted) == 0:
                return np.full(len(values), -1, dtype=np.int64)
            at = np.minimum(np.searchsorted(self.sorted, values), len(self.sorted) - 1)
            out = np.where(self.sorted[at] == values, self.order[at], -1)
        else:
            out = self.index.get_indexer(pd.Index(ids.to_pandas(), dtype=object)).astype(np.int64)
        out[missing] = -1
        return out


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_integer(t):
        return "integer"
    return "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else str(t)


def vectors_for(path: Path, wanted: pa.Array, dim: int, preferred_id: str) -> Found:
    """The vectors of the `wanted` raw ids (each distinct) that the vector file at `path` has.

    One-line ``DataError`` (naming the file and the column) for a file that is not a vector file,
    ids of another type than `wanted`'s, or vectors of another length than `dim` (the table's
    width, checked against the file's first vector by the caller, ``vector_dim``)."""
    positions: List[np.ndarray] = []
    vectors: List[np.ndarray] = []
    file_rows = 0
    seen = np.zeros(len(wanted), dtype=bool)
    repeated: List[np.ndarray] = []
    lookup = _Lookup(wanted)
    first_column = None
    for file in vector_files(path):
        pf = pq.ParquetFile(file)
        column = id_column(pf.schema_arrow, file, preferred_id)
        if first_column is not None and column != first_column:
            raise DataError(f"{file}: ids in column '{column}' but the directory's first file has them in "
                            f"'{first_column}': every file of a vector directory has the same columns")
        first_column = column
        id_type = pf.schema_arrow.field(column).type
        if _kind(id_type) != _kind(wanted.type):
            raise DataError(f"{file}: column '{column}' has ids of type {id_type} but the dataset's ids are "
                            f"{wanted.type}: the vectors cannot be matched to its ids")
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=[column, VECTOR_COLUMN])
            file_rows += table.num_rows
            ids = table[column].combine_chunks()
            if pa.types.is_dictionary(ids.type):
                ids = ids.dictionary_decode()
            column_vectors = table[VECTOR_COLUMN].combine_chunks()
            lengths = pc.list_value_length(column_vectors).fill_null(-1).to_numpy(zero_copy_only=False)
            if np.any(lengths != dim):  # every row checked, wanted or not: a wrong file fails the same way
                bad = int(lengths[np.flatnonzero(lengths != dim)[0]])
                raise DataError(f"{file}: column '{VECTOR_COLUMN}' has vectors of length "
                                f"{bad if bad >= 0 else 'null'} and of length {dim}: all must have one length")
            values = pc.list_flatten(column_vectors)
            if values.null_count or not np.isfinite(values.to_numpy(zero_copy_only=False)).all():
                raise DataError(f"{file}: column '{VECTOR_COLUMN}' has null, NaN or infinite values")
            where = lookup.positions(ids)
            hit = where >= 0
            if not hit.any():
                continue
            rows = np.flatnonzero(hit)
            pos = where[rows].astype(np.int64)
            _, unique_first = np.unique(pos, return_index=True)  # the same id twice in one row group
            keep = np.zeros(len(pos), dtype=bool)
            keep[unique_first] = True
            keep &= ~seen[pos]
            repeated.append(pos[~keep])
            seen[pos[keep]] = True
            flat = pc.list_flatten(column_vectors.take(pa.array(rows[keep]))).to_numpy(zero_copy_only=False)
            positions.append(pos[keep])
            vectors.append(flat.astype(np.float32).reshape(-1, dim))
    return Found(np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64),
                 np.concatenate(vectors) if vectors else np.zeros((0, dim), dtype=np.float32), file_rows,
                 np.concatenate(repeated) if repeated else np.zeros(0, dtype=np.int64))


def ids_present(path: Path, column: str, wanted: pa.Array) -> np.ndarray:
    """Which of the distinct `wanted` ids column `column` of the Parquet file at `path` holds (a
    prepared dataset's ``users.parquet`` / ``items.parquet``), read a row group at a time."""
    present = np.zeros(len(wanted), dtype=bool)
    if len(wanted) == 0:
        return present
    lookup = _Lookup(wanted)
    pf = pq.ParquetFile(path)
    for group in range(pf.num_row_groups):
        ids = pf.read_row_group(group, columns=[column])[column].combine_chunks()
        if pa.types.is_dictionary(ids.type):
            ids = ids.dictionary_decode()
        where = lookup.positions(ids)
        present[where[where >= 0]] = True
    return present


def id_kind(t: pa.DataType) -> str:
    """``integer``, ``string`` or the type's name: ids of one kind can be matched with each other."""
    return _kind(t)
