"""Side-feature files (``data.item_features`` / ``data.user_features``): checked and staged for the engine.

A feature file has an id column and feature columns, each a categorical scalar or a list
(multi-hot) of integers or strings. The front end checks every file's schema first (a missing
id or feature column, an id type other than the interactions', a feature of another type: one
line naming the file and the column), then turns the rows into one long relation, a batch at a
time (memory: one batch)::

    _features_item/part-*.parquet   id (the interactions' id type), feature (int32: the column's
                                    index in data.item_features.columns), value (string)

which both engines read like the staged interactions. The relational part (the value
vocabularies or hashed rows, the id rows, the prepared ``item_features.parquet``) is SQL of
``recsys.data.steps``; the prepared layout is described in ``recsys.data.layout``.

Values are kept as text (an integer value 7 and a string "7" of another file are the same
value): one value type for the vocabulary and the hash whatever the column type, the same on
DuckDB and Spark. Null ids and null values are counted and left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recsys.config import FeatureFileConfig
from recsys.data.readers import DataError, _id_type_ok, _one_line, source_files

STAGE_BATCH = 1 << 17
"""Feature-file rows turned into the long relation at a time."""

ROLES = {"item": ("item_id", "data.item_features", "data.item_column"),
         "user": ("user_id", "data.user_features", "data.user_column")}
"""role -> (the interactions' id role, the config key of its feature file, the option naming the id column)."""


def _scalar_ok(t: pa.DataType) -> bool:
    return _id_type_ok(t) or pa.types.is_dictionary(t) and _id_type_ok(t.value_type)


def _value_type(t: pa.DataType) -> Optional[str]:
    """``scalar`` / ``list`` for a usable feature column type (integers or strings, or a list of
    them), else None."""
    if _scalar_ok(t):
        return "scalar"
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and _scalar_ok(t.value_type):
        return "list"
    return None


@dataclass
class StagedFeatures:
    """A feature file staged as the long relation (module docstring), and what the front end counted."""

    role: str
    """``item`` or ``user``."""
    files: List[str]
    """The staged Parquet parts (id, feature, value, _file, _row)."""
    columns: List[str]
    source: str
    """The configured path (for messages)."""
    id_kind: str
    """``int`` or ``str``: the interactions' id kind (the staged ids are cast to it)."""
    hash_buckets: int
    counts: Dict[str, int] = field(default_factory=dict)
    """``file_rows``, ``null_ids``, ``rows_without_values`` (an id whose every feature is null or
    empty: no row of its own, nothing to compute a vector from) and per column
    ``null_values.<column>``."""


def check_feature_files(ff: FeatureFileConfig, role: str, id_kind: str, default_id: str, separator: str):
    """(files, Arrow format, id column, kinds) of a feature file after checking every file's schema:
    the id column and each feature column present, ids of the interactions' kind (`id_kind`),
    features integers or strings or lists of them. Raises ``DataError`` naming file and column."""
    id_role, key, id_option = ROLES[role]
    id_column = ff.id_column or default_id
    fmt = "csv" if str(ff.path).lower().endswith((".csv", ".tsv", ".txt")) or (
        Path(ff.path).is_dir() and any(p.suffix.lower() == ".csv" for p in Path(ff.path).iterdir())) else "parquet"
    try:
        files, file_format, what = source_files(Path(ff.path), fmt, separator)
    except DataError as e:
        raise DataError(str(e).replace("(data.path)", f"({key}.path)").replace("data.path;", f"{key}.path;")) from None
    if fmt == "csv":  # text: the ids read as the interactions' type, the values as text (no guessing, "007" stays)
        types = {id_column: pa.int64() if id_kind == "int" else pa.string(), **{c: pa.string() for c in ff.columns}}
        file_format = ds.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter=separator),
                                       convert_options=pacsv.ConvertOptions(column_types=types))
    kinds: Dict[str, str] = {}
    for f in files:
        try:
            schema = ds.dataset(f, format=file_format).schema
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: cannot be read as {what} ({key}.path): {_one_line(e)}") from None
        if id_column not in schema.names:
            raise DataError(f"{f}: missing id column {id_column!r} (has {schema.names}); set {key}.id_column "
                            f"(default: {id_option})")
        t = schema.field(id_column).type
        if not _scalar_ok(t):
            raise DataError(f"{f}: id column {id_column!r} has type {t}; ids must be integers or strings")
        kind = "int" if pa.types.is_integer(t) or pa.types.is_dictionary(t) and pa.types.is_integer(t.value_type) else "str"
        if kind != id_kind:
            word = {"int": "integers", "str": "strings"}
            raise DataError(f"{f}: id column {id_column!r} holds {word[kind]} but the interactions' {role} ids are "
                            f"{word[id_kind]}; the ids must be the same values")
        for c in ff.columns:
            if c not in schema.names:
                raise DataError(f"{f}: missing feature column {c!r} (has {schema.names}); see {key}.columns")
            if c == id_column:
                raise DataError(f"{f}: feature column {c!r} is the id column ({key}.columns)")
            vt = _value_type(schema.field(c).type)
            if vt is None:
                raise DataError(f"{f}: feature column {c!r} has type {schema.field(c).type}; a feature must be "
                                "integers or strings (a category) or a list of them (tags)")
            if kinds.setdefault(c, vt) != vt:
                raise DataError(f"{f}: feature column {c!r} is a {vt} here but a {kinds[c]} in {files[0]}")
    return files, file_format, what, id_column, kinds


def _as_text(values: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values if pa.types.is_string(values.type) else pc.cast(values, pa.string())


def stage_feature_file(ff: FeatureFileConfig, role: str, id_kind: str, default_id: str, separator: str,
                       directory: Path) -> StagedFeatures:
    """Check (``check_feature_files``) and stage a feature file into `directory` (module docstring)."""
    files, file_format, what, id_column, kinds = check_feature_files(ff, role, id_kind, default_id, separator)
    directory.mkdir(parents=True, exist_ok=True)
    id_type = pa.int64() if id_kind == "int" else pa.string()
    out = StagedFeatures(role, [], list(ff.columns), str(ff.path), id_kind, ff.hash_buckets,
                         {"file_rows": 0, "null_ids": 0, "rows_without_values": 0, **{f"null_values.{c}": 0 for c in ff.columns}})
    part = 0
    for f in files:
        try:
            batches = ds.dataset(f, format=file_format).scanner(columns=[id_column, *ff.columns],
                                                               batch_size=STAGE_BATCH).to_batches()
            first_row = 1
            for batch in batches:
                n = batch.num_rows
                ids = batch.column(0)
                if pa.types.is_dictionary(ids.type):
                    ids = ids.dictionary_decode()
                ids = pc.cast(ids, id_type)
                row_numbers = np.arange(first_row, first_row + n, dtype=np.int64)
                first_row += n
                out.counts["file_rows"] += n
                has_id = pc.is_valid(ids).to_numpy(zero_copy_only=False)
                out.counts["null_ids"] += int(n - has_id.sum())
                parts = []
                any_value = np.zeros(n, dtype=bool)
                for k, c in enumerate(ff.columns):
                    values = batch.column(k + 1)
                    if kinds[c] == "list":  # a null list, and null elements of the lists
                        out.counts[f"null_values.{c}"] += int(pc.sum(pc.and_(pc.is_null(values),
                                                                               pa.array(has_id))).as_py() or 0)
                        parent = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
                        flat = pc.list_flatten(values)
                    else:
                        parent, flat = np.arange(n), values
                    flat = _as_text(flat)
                    keep = pc.is_valid(flat).to_numpy(zero_copy_only=False) & has_id[parent]
                    out.counts[f"null_values.{c}"] += int((~keep & has_id[parent]).sum())
                    rows = parent[keep]
                    any_value[rows] = True
                    parts.append(pa.table({"id": ids.take(pa.array(rows)),
                                           "feature": pa.array(np.full(len(rows), k, dtype=np.int32)),
                                           "value": flat.filter(pa.array(keep)),
                                           "_file": pa.array([f] * len(rows), pa.string()),
                                           "_row": pa.array(row_numbers[rows])}))
                out.counts["rows_without_values"] += int((has_id & ~any_value).sum())
                if parts:
                    path = directory / f"part-{part:05d}.parquet"
                    pq.write_table(pa.concat_tables(parts), path)
                    out.files.append(str(path))
                    part += 1
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
            raise DataError(f"{f}: cannot be read as {what} ({ROLES[role][1]}.path): {_one_line(e)}") from None
    if not out.files:  # an empty file: an empty relation of the right columns
        path = directory / "part-00000.parquet"
        pq.write_table(pa.table({"id": pa.array([], id_type), "feature": pa.array([], pa.int32()),
                                 "value": pa.array([], pa.string()), "_file": pa.array([], pa.string()),
                                 "_row": pa.array([], pa.int64())}), path)
        out.files.append(str(path))
    return out
