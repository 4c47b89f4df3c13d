"""Readers: the front ends that check raw files in their own formats before the engine reads them.

``check_source`` checks a Parquet or CSV source's files from their schemas (no row read): the
column of each role, the id types, files agreeing. The preparation engine (``recsys.data.engine``)
then reads Parquet in place and CSV through a batch-at-a-time conversion. The text formats with a
fixed layout are read here into Arrow tables (``user_id``, ``item_id`` int64, ``timestamp``) that
the engine receives as Parquet:

- ``parquet`` / ``csv``: a file or a directory of files with named columns (``data.user_column``,
  ``data.item_column``, optional ``data.timestamp_column``, ``data.weight_column``,
  ``data.rating_column``).
- ``lightgcn``: a directory with ``train.txt`` and ``test.txt``; each line is
  ``user item item ...`` (integer ids, whitespace separated). The given split is kept.
- ``movielens``: ml-100k (``u.data``, tab separated), ml-1m / ml-10m (``ratings.dat``, ``::``
  separated), ml-20m / ml-25m / ml-latest (``ratings.csv`` with a header); ``data.min_rating``
  turns ratings into implicit feedback.

A file that is not in its format raises ``DataError`` naming the file, and the line or column.
Files of a directory are checked one by one, so an error names the file at fault. (Null ids and
identity ids out of range are found by the engine's checks, naming the file and row.)
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recsys.config import DataConfig
from recsys.errors import DataError

__all__ = ["DataError"]  # raised here for every file problem (defined with the other user errors)

logger = logging.getLogger(__name__)


def _one_line(e: BaseException, limit: int = 400) -> str:
    """An Arrow (or OS) error message on one line of printable text (it may quote binary input),
    so the error the user sees stays one short paragraph."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(e)).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _id_type_ok(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


ROLE_WORD = {"user_id": "user", "item_id": "item"}


def _first_true(mask: pa.ChunkedArray) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _clean_ids(table: pa.Table, where: Callable[[int], str], columns: Dict[str, str], null_ids: str,
               id_limits: Optional[Tuple[int, int]]) -> Tuple[pa.Table, int]:
    """One file's ids: integer ids as int64 and string ids as ``string``; ids out of the declared
    range refused (``id_limits``: data.id_mapping=identity); rows with a null id refused
    (``null_ids=error``) or dropped and counted. ``where(row)`` names a 0-based row of the file
    (``file, row N`` / ``file, line N``); ``columns`` maps user_id/item_id to the file's names."""
    for name in ("user_id", "item_id"):
        t = table.schema.field(name).type
        i = table.schema.get_field_index(name)
        if pa.types.is_integer(t) and t != pa.int64():
            table = table.set_column(i, name, table[name].cast(pa.int64()))
        elif pa.types.is_large_string(t):
            table = table.set_column(i, name, table[name].cast(pa.string()))
    if id_limits is not None:
        for name, limit, key in (("user_id", id_limits[0], "num_users"), ("item_id", id_limits[1], "num_items")):
            col, t = columns[name], table.schema.field(name).type
            if not pa.types.is_integer(t):
                raise DataError(f"{where(-1)}: column {col!r} has type {t}; data.id_mapping=identity needs integer "
                                f"{ROLE_WORD[name]} ids 0..data.{key}-1 (use data.id_mapping=vocab for other ids)")
            bad = pc.fill_null(pc.or_(pc.less(table[name], 0), pc.greater_equal(table[name], limit)), False)
            n_bad = pc.sum(bad).as_py() or 0
            if n_bad:
                row = _first_true(bad)
                raise DataError(f"{where(row)}: {ROLE_WORD[name]} id {table[name][row].as_py()} (column {col!r}) is "
                                f"out of range [0, {limit}) of data.id_mapping=identity with data.{key}={limit} "
                                f"({n_bad} such rows in this file)")
    valid = pc.and_(pc.is_valid(table["user_id"]), pc.is_valid(table["item_id"]))
    n_null = len(table) - (pc.sum(valid).as_py() or 0) if len(table) else 0
    if n_null and null_ids == "error":
        row = _first_true(pc.invert(valid))
        name = "user_id" if not table["user_id"][row].is_valid else "item_id"
        raise DataError(f"{where(row)}: null {ROLE_WORD[name]} id (column {columns[name]!r}); {n_null} rows of this "
                        "file have a null user or item id (data.null_ids=drop drops them and counts them)")
    if n_null:
        logger.warning("%s: dropped %d rows with a null user or item id", where(-1), n_null)
        table = table.filter(valid)
    return table, int(n_null)


def _not_empty(table: pa.Table, source: str, n_null: int) -> pa.Table:
    if len(table) == 0:
        raise DataError(f"{source}: no interactions (after dropping {n_null} rows with null ids)")
    return table


def _apply_min_rating(table: pa.Table, min_rating: Optional[float], source: str) -> Tuple[pa.Table, int]:
    """Implicit feedback from ratings: keep rows with rating >= min_rating (count the rest)."""
    if min_rating is None or "rating" not in table.column_names:
        return table, 0
    keep = pc.fill_null(pc.greater_equal(table["rating"], min_rating), False)
    n_drop = len(table) - (pc.sum(keep).as_py() or 0)
    if n_drop:
        logger.info("%s: %d rows with rating < %s (or no rating) are not positives", source, n_drop, min_rating)
    table = table.filter(keep)
    if len(table) == 0:
        raise DataError(f"{source}: no interactions with rating >= {min_rating} (data.min_rating): "
                        f"all {n_drop} rows are below it")
    return table, int(n_drop)


# ---------------------------------------------------------------------------------------------
# Parquet and CSV with a column mapping
# ---------------------------------------------------------------------------------------------


def source_files(path: Path, fmt: str, separator: str = ",") -> Tuple[List[str], ds.FileFormat, str]:
    """(files, their Arrow format, its name for messages) of a ``parquet`` / ``csv`` source: the
    file `path`, or the files of the directory `path` (files starting with '.' or '_' left out).
    A missing path, an unreadable directory or one without files raises ``DataError``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory (data.path)")
    if fmt == "csv":
        file_format = ds.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter=separator))
        what = f"CSV (separator {separator!r})"
    else:
        file_format, what = ds.ParquetFileFormat(), "Parquet"
    if not p.is_dir():
        return [str(p)], file_format, what
    try:
        files = ds.dataset(str(p), format=file_format, exclude_invalid_files=False).files
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{p}: cannot be read as {what}: {_one_line(e)}") from None
    if not files:
        raise DataError(f"{p}: directory holds no {what} files (data.path; files starting with '.' or '_' are "
                        "ignored)")
    return files, file_format, what


def column_roles(f: str, schema: pa.Schema, fmt: str, user_column: str, item_column: str,
                 timestamp_column: Optional[str], weight_column: Optional[str],
                 rating_column: Optional[str]) -> Dict[str, str]:
    """A file's column name by role (user_id, item_id[, timestamp, weight, rating]) from its schema:
    a missing id, weight or rating column, ids that are neither integers nor strings, a
    non-numeric weight or rating are refused naming the file and the column."""
    columns = {"user_id": user_column, "item_id": item_column}
    for role, col in columns.items():
        word = ROLE_WORD[role]
        if col not in schema.names:
            hint = "; is the separator right? (data.separator)" if fmt == "csv" and len(schema.names) == 1 else ""
            raise DataError(f"{f}: missing {word} column {col!r} (has {schema.names}); set data.{word}_column{hint}")
        t = schema.field(col).type
        if not _id_type_ok(t):
            raise DataError(f"{f}: column {col!r} has type {t}; ids must be integers or strings (the {word} column)")
    if timestamp_column and timestamp_column in schema.names:
        columns["timestamp"] = timestamp_column
    for role, col in (("weight", weight_column), ("rating", rating_column)):
        if col:
            if col not in schema.names:
                raise DataError(f"{f}: missing {role} column {col!r} (has {schema.names}); set data.{role}_column")
            t = schema.field(col).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                raise DataError(f"{f}: {role} column {col!r} has type {t}; expected numbers")
            columns[role] = col
    return columns


# ---------------------------------------------------------------------------------------------
# The files of a source and their schemas, checked before any row is read
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
    timestamp_is_time: bool = False
    """Whether the timestamp column holds dates or timestamps (read as epoch seconds)."""


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


def check_source(path: str, fmt: str, cfg: DataConfig) -> Source:
    """Check every file's columns and types (from its schema, without reading the rows): a missing
    column, an id type other than integers or strings, files disagreeing on the columns or on the
    id types are refused naming the file and the column."""
    p = Path(path)
    files, file_format, what = source_files(p, fmt, cfg.separator)
    first: Optional[Tuple[str, Dict[str, str], Dict[str, pa.DataType]]] = None
    any_float_time = any_time = False
    for f in files:
        try:
            schema = ds.dataset(f, format=file_format).schema
        except (pa.ArrowInvalid, OSError) as e:
            hint = ""
            if fmt == "csv":
                with open(f, "rb") as fh:
                    hint = " (it is a Parquet file: data=parquet?)" if fh.read(4) == b"PAR1" else ""
            raise DataError(f"{f}: cannot be read as {what}{hint}: {_one_line(e)}") from None
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
            is_time = pa.types.is_timestamp(t) or pa.types.is_date(t)
            if first is not None and "timestamp" in first[1] and is_time != any_time:
                t0 = first[3].field(first[1]["timestamp"]).type
                raise DataError(f"{f}: timestamp column {cfg.timestamp_column!r} has type {t} but {first[0]} has {t0}; "
                                "every file must give dates/timestamps, or every file numbers")
            any_float_time |= pa.types.is_floating(t)
            any_time |= is_time
        if first is None:
            first = (f, columns, types, schema)
            continue
        if set(columns) != set(first[1]):
            raise DataError(f"{f}: has columns {sorted(columns)} but {first[0]} has {sorted(first[1])} (after the "
                            "column mapping); every file must have the same ones")
        for role in ("user_id", "item_id"):
            if types[role] != first[2][role]:
                t, t0 = schema.field(columns[role]).type, first[3].field(first[1][role]).type
                raise DataError(f"{f}: column {columns[role]!r} has type {t} but {first[0]} has {t0}; every file "
                                "must give the ids the same type")
    timestamp_type = None
    if "timestamp" in first[1]:
        timestamp_type = pa.float64() if any_float_time else pa.int64()
    return Source(str(p), files, file_format, what, first[1], first[2], timestamp_type, any_time)


# ---------------------------------------------------------------------------------------------
# LightGCN text format
# ---------------------------------------------------------------------------------------------


def read_lightgcn_file(path: Path, id_limits: Optional[Tuple[int, int]] = None) -> pa.Table:
    """``user item item ...`` per line (whitespace separated integers) -> (user_id, item_id).

    Rows keep the file's order (the order of a user's items on the line). ``id_limits``
    (num_users, num_items): ids must lie in [0, num_users) and [0, num_items) (data.id_mapping=identity)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (LightGCN format needs train.txt and test.txt in data.path)")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (LightGCN format: lines of `user item item ...`)") from None
    lines = text.splitlines()
    counts = np.fromiter((len(line.split()) for line in lines), dtype=np.int64, count=len(lines))
    try:
        tokens = np.array(text.split(), dtype=np.int64)
    except ValueError:
        for n, line in enumerate(lines, 1):
            for token in line.split():
                try:
                    int(token)
                except ValueError:
                    raise DataError(f"{path}, line {n}: {token!r} is not an integer id "
                                    "(LightGCN format: `user item item ...`, whitespace separated)") from None
        raise
    if len(tokens) and tokens.min() < 0:
        bad = int(np.argmax(tokens < 0))
        line_no = int(np.repeat(np.arange(1, len(lines) + 1), counts)[bad])
        raise DataError(f"{path}, line {line_no}: negative id {int(tokens[bad])}")
    nonempty = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
    is_user = np.zeros(len(tokens), dtype=bool)
    is_user[starts] = True
    if id_limits is not None:
        for word, key, limit, mask in (("user", "num_users", id_limits[0], is_user),
                                       ("item", "num_items", id_limits[1], ~is_user)):
            bad = mask & (tokens >= limit)
            if bad.any():
                first = int(np.argmax(bad))
                line_no = int(np.repeat(np.arange(1, len(lines) + 1), counts)[first])
                raise DataError(f"{path}, line {line_no}: {word} id {int(tokens[first])} is out of range [0, {limit}) "
                                f"of data.id_mapping=identity with data.{key}={limit} "
                                f"({int(bad.sum())} such ids in this file)")
    counts = counts[nonempty]
    users = tokens[starts]
    items = tokens[~is_user]
    users = np.repeat(users, counts - 1)
    return pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64())})


def read_lightgcn(path: str, id_limits: Optional[Tuple[int, int]] = None) -> Tuple[pa.Table, pa.Table, Dict[str, int]]:
    """A LightGCN-format directory -> (train, test, dropped)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory (data.path)")
    if not p.is_dir():
        raise DataError(f"{p}: not a directory (LightGCN format: a directory with train.txt and test.txt)")
    train = read_lightgcn_file(p / "train.txt", id_limits)
    test = read_lightgcn_file(p / "test.txt", id_limits)
    if len(train) == 0:
        raise DataError(f"{p / 'train.txt'}: no interactions")
    if len(test) == 0:
        raise DataError(f"{p / 'test.txt'}: no interactions")
    return train, test, {"null_ids": 0, "test_null_ids": 0}


# ---------------------------------------------------------------------------------------------
# MovieLens
# ---------------------------------------------------------------------------------------------

MOVIELENS_FILES = ("u.data", "ratings.dat", "ratings.csv")
_ML_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


def _first_bad_line(data: bytes, sep: str, source: Path, first_line: int = 1) -> str:
    """Describe the first line of a headerless `sep`-separated file that is not 4 numbers."""
    for n, line in enumerate(data.decode(errors="replace").splitlines(), first_line):
        fields = line.split(sep)
        if len(fields) != 4:
            return f"{source}, line {n}: expected 4 {sep!r}-separated fields (user, item, rating, timestamp), got {len(fields)}"
        for name, value in zip(_ML_COLUMNS, fields):
            try:
                float(value)
            except ValueError:
                return f"{source}, line {n}: {name} {value!r} is not a number"
    return f"{source}: cannot be parsed as {sep!r}-separated MovieLens ratings"


def read_movielens(path: str, min_rating: Optional[float], null_ids: str = "drop",
                   id_limits: Optional[Tuple[int, int]] = None) -> Tuple[pa.Table, Dict[str, int]]:
    """A MovieLens directory (or its ratings file) -> (table, dropped)."""
    p = Path(path)
    if p.is_dir():
        found = [p / name for name in MOVIELENS_FILES if (p / name).is_file()]
        if not found:
            raise DataError(f"{p}: no MovieLens ratings file (looked for {', '.join(MOVIELENS_FILES)})")
        p = found[0]
    elif not p.is_file():
        raise DataError(f"{p}: no such file or directory (data.path)")
    if p.name not in MOVIELENS_FILES:
        raise DataError(f"{p}: not a MovieLens ratings file (expected one of {', '.join(MOVIELENS_FILES)})")
    data = p.read_bytes()
    int_cols = {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
    if p.name == "ratings.csv":
        header = data.split(b"\n", 1)[0].decode(errors="replace").strip()
        expected = "userId,movieId,rating,timestamp"
        if header != expected:
            raise DataError(f"{p}, line 1: header {header!r} is not MovieLens' {expected!r}")
        read = pacsv.ReadOptions(column_names=_ML_COLUMNS)
        parse = pacsv.ParseOptions(delimiter=",")
        sep = ","
        body = data.split(b"\n", 1)[1] if b"\n" in data else b""
    else:
        sep = "\t" if p.name == "u.data" else "::"
        body = data.replace(b"::", b"\t") if sep == "::" else data
        read = pacsv.ReadOptions(column_names=_ML_COLUMNS)
        parse = pacsv.ParseOptions(delimiter="\t")
    try:
        table = pacsv.read_csv(io.BytesIO(body), read_options=read, parse_options=parse,
                               convert_options=pacsv.ConvertOptions(column_types=int_cols))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if p.name == "ratings.csv":
            raise DataError(_first_bad_line(body, ",", p, first_line=2)) from None
        raise DataError(_first_bad_line(data, sep, p)) from None
    first_line = 2 if p.name == "ratings.csv" else 1
    table, n_null = _clean_ids(table, lambda r: str(p) if r < 0 else f"{p}, line {r + first_line}",
                               {"user_id": "userId", "item_id": "movieId"}, null_ids, id_limits)
    table = _not_empty(table, str(p), n_null)
    table, n_below = _apply_min_rating(table, min_rating, str(p))
    return table, {"null_ids": n_null, "below_min_rating": n_below}
