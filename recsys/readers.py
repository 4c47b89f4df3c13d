"""Readers: raw interaction files in their own formats -> one Arrow table.

Every reader returns a table with columns ``user_id``, ``item_id`` (int64 or string) and, when
the source has them, ``timestamp`` (int64) and ``weight``/``rating``, plus the counts of rows it
dropped and why. ``recsys.data.prepare`` then builds vocabularies and splits the same way for all
formats. Supported sources:

- ``parquet`` / ``csv``: a file or a directory of files with named columns (``data.user_column``,
  ``data.item_column``, optional ``data.timestamp_column``, ``data.weight_column``,
  ``data.rating_column``).
- ``lightgcn``: a directory with ``train.txt`` and ``test.txt``; each line is
  ``user item item ...`` (integer ids, whitespace separated). The given split is kept.
- ``movielens``: ml-100k (``u.data``, tab separated), ml-1m / ml-10m (``ratings.dat``, ``::``
  separated), ml-20m / ml-25m / ml-latest (``ratings.csv`` with a header); ``data.min_rating``
  turns ratings into implicit feedback.

A file that is not in its format raises ``DataError`` naming the file, and the line or column.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Input that cannot be used; the message names the file, the column or line, and the reason."""


def _id_type_ok(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _normalise(table: pa.Table, source: str) -> Tuple[pa.Table, Dict[str, int]]:
    """Common tail of every reader: string ids as ``string``, timestamps as int64, null ids dropped
    (counted), an empty result refused."""
    if "timestamp" in table.column_names:
        t = table.schema.field("timestamp").type
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                                     pc.cast(table["timestamp"], pa.timestamp("s")).cast(pa.int64()))
        elif not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise DataError(f"{source}: timestamp column has type {t}; expected integers, floats or timestamps "
                            "(set data.timestamp_column=null to ignore it)")
    for name in ("user_id", "item_id"):
        if pa.types.is_large_string(table.schema.field(name).type):
            table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(pa.string()))
    valid = pc.and_(pc.is_valid(table["user_id"]), pc.is_valid(table["item_id"]))
    n_null = len(table) - (pc.sum(valid).as_py() or 0) if len(table) else 0
    if n_null:
        logger.warning("%s: dropped %d rows with a null user or item id", source, n_null)
        table = table.filter(valid)
    if len(table) == 0:
        raise DataError(f"{source}: no interactions (after dropping {n_null} rows with null ids)")
    return table, {"null_ids": int(n_null)}


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
        raise DataError(f"{source}: no interactions with rating >= {min_rating} (data.min_rating)")
    return table, int(n_drop)


# ---------------------------------------------------------------------------------------------
# Parquet and CSV with a column mapping
# ---------------------------------------------------------------------------------------------


def read_columns(path: str, fmt: str, user_column: str, item_column: str, timestamp_column: Optional[str],
                 weight_column: Optional[str], rating_column: Optional[str], min_rating: Optional[float],
                 separator: str = ",") -> Tuple[pa.Table, Dict[str, int]]:
    """A Parquet or CSV file, or a directory of them, with named columns."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory (data.path)")
    if fmt == "csv":
        file_format = ds.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter=separator))
    else:
        file_format = "parquet"
    what = "Parquet" if fmt == "parquet" else f"CSV (separator {separator!r})"
    try:
        dataset = ds.dataset(str(p), format=file_format, exclude_invalid_files=False)
        files = dataset.files
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{p}: cannot be read as {what}: {e}") from None
    if not files:
        raise DataError(f"{p}: directory holds no {what} files")
    schema = dataset.schema
    columns = {"user_id": user_column, "item_id": item_column}
    for role, col in columns.items():
        if col not in schema.names:
            hint = "; is the separator right? (data.separator)" if fmt == "csv" and len(schema.names) == 1 else ""
            raise DataError(f"{p}: missing {role.split('_')[0]} column {col!r} (has {schema.names}); "
                            f"set data.{role.split('_')[0]}_column{hint}")
        if not _id_type_ok(schema.field(col).type):
            raise DataError(f"{p}: column {col!r} has type {schema.field(col).type}; ids must be integers or strings")
    if timestamp_column and timestamp_column in schema.names:
        columns["timestamp"] = timestamp_column
    for role, col in (("weight", weight_column), ("rating", rating_column)):
        if col:
            if col not in schema.names:
                raise DataError(f"{p}: missing {role} column {col!r} (has {schema.names}); set data.{role}_column")
            t = schema.field(col).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                raise DataError(f"{p}: {role} column {col!r} has type {t}; expected numbers")
            columns[role] = col
    try:
        table = dataset.to_table(columns=list(columns.values()))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{p}: cannot be read as {what}: {e}") from None
    table = table.rename_columns(list(columns.keys()))
    table, n_below = _apply_min_rating(table, min_rating, str(p))
    table, dropped = _normalise(table, str(p))
    if rating_column:
        dropped["below_min_rating"] = n_below
    return table, dropped


# ---------------------------------------------------------------------------------------------
# LightGCN text format
# ---------------------------------------------------------------------------------------------


def read_lightgcn_file(path: Path) -> pa.Table:
    """``user item item ...`` per line (whitespace separated integers) -> (user_id, item_id).

    Rows keep the file's order (the order of a user's items on the line)."""
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
    counts = counts[nonempty]
    users = tokens[starts]
    is_user = np.zeros(len(tokens), dtype=bool)
    is_user[starts] = True
    items = tokens[~is_user]
    users = np.repeat(users, counts - 1)
    return pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64())})


def read_lightgcn(path: str) -> Tuple[pa.Table, pa.Table, Dict[str, int]]:
    """A LightGCN-format directory -> (train, test, dropped)."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: not a directory (LightGCN format: a directory with train.txt and test.txt)")
    train = read_lightgcn_file(p / "train.txt")
    test = read_lightgcn_file(p / "test.txt")
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


def read_movielens(path: str, min_rating: Optional[float]) -> Tuple[pa.Table, Dict[str, int]]:
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
    table, n_below = _apply_min_rating(table, min_rating, str(p))
    table, dropped = _normalise(table, str(p))
    dropped["below_min_rating"] = n_below
    return table, dropped
