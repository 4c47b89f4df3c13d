"""Preparation on DuckDB (the embedded default): the source in, the prepared layout out.

The relational work is ``recsys.data.steps`` (the same SQL Spark runs); this module gives it its
input and takes its output:

- **Front ends** (``stage_source``): a Parquet source is read by the engine in place (its files'
  schemas checked first, from their footers); the text formats (CSV, LightGCN, MovieLens) and the
  synthetic generator are turned into Parquet in the staging directory first, a file or a batch
  at a time (pyarrow), so the engine always reads Parquet. Each relation carries ``_file`` and
  ``_row`` for the error messages.
- **DuckDB** (``run_duckdb``): in process, multi-threaded (``data.engine_threads``, 0: all
  cores), spilling to disk in the staging directory under ``data.engine_memory``; the steps'
  tables live in a database file there, removed with it.
- **Output**: the training and test rows written by DuckDB as Parquet row groups, the
  vocabularies and the per-row counts streamed into their files (``recsys.data.layout``).

Bad input raises ``DataError`` naming the file, the column or row, and the reason; nothing in the
staging directory survives it (``recsys.data.prepare`` removes it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys.config import DataConfig
from recsys.data.layout import counts_npy, cut_row_groups, feature_csr_npy, write_pieces
from recsys.data.readers import (ROLE_WORD, DataError, Source, _one_line, check_source, read_lightgcn,
                                 read_movielens)
from recsys.data.side_features import StagedFeatures, stage_feature_file
from recsys.data.steps import DUCKDB, Dialect, Options, Steps, sql_string
from recsys.data.synthetic import generate_stream

logger = logging.getLogger(__name__)

STAGE_BATCH = 1 << 18
"""Rows per batch when a text source is turned into Parquet."""


# ---------------------------------------------------------------------------------------------
# Front ends: every source as Parquet relations with the roles' columns
# ---------------------------------------------------------------------------------------------


@dataclass
class Relation:
    """Parquet files and the column of each role in them (``kinds``: int or str ids; the
    timestamp int, float or time; weight and rating numbers)."""

    files: List[str]
    columns: Dict[str, str]
    kinds: Dict[str, str]
    name: str
    """The source's name in messages."""
    unit: str = "row"
    """``row`` or ``line``: what ``_row`` counts."""
    staged: bool = False
    """Written by a front end: ``_file`` and ``_row`` are columns of the files."""
    labels: Dict[str, str] = field(default_factory=dict)
    """The source's name of each role's column, for messages (default: ``columns``)."""

    def label(self, role: str) -> str:
        return self.labels.get(role, self.columns[role])


@dataclass
class Staged:
    """A source ready for the steps: ``raw`` (and ``raw_test`` for data.split=given), the rows the
    front end left out (counted), and the source's name."""

    raw: Relation
    raw_test: Optional[Relation]
    source_name: str
    test_name: str
    dropped: Dict[str, int] = field(default_factory=dict)


def _kinds(src: Source) -> Dict[str, str]:
    kinds = {r: ("int" if src.id_types[r] == pa.int64() else "str") for r in ("user_id", "item_id")}
    if "timestamp" in src.columns:
        kinds["timestamp"] = "time" if src.timestamp_is_time else (
            "float" if src.timestamp_type == pa.float64() else "int")
    for role in ("weight", "rating"):
        if role in src.columns:
            kinds[role] = "float"
    return kinds


def _write_staged(table: pa.Table, path: Path, name: str, first_row: int = 1) -> None:
    cols = {c: table[c] for c in table.column_names}
    cols["_file"] = pa.repeat(pa.scalar(name, pa.string()), len(table))
    cols["_row"] = pa.array(np.arange(first_row, first_row + len(table), dtype=np.int64))
    pq.write_table(pa.table(cols), path)


def _table_relation(table: pa.Table, directory: Path, name: str, unit: str) -> Relation:
    """An in-memory table (LightGCN, MovieLens readers) staged as Parquet."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_staged(table, directory / "part-00000.parquet", name)
    kinds = {r: ("int" if pa.types.is_integer(table.schema.field(r).type) else "str") for r in ("user_id", "item_id")}
    for c in ("timestamp", "weight", "rating"):
        if c in table.column_names:
            kinds[c] = "int" if c == "timestamp" and pa.types.is_integer(table.schema.field(c).type) else "float"
    return Relation([str(directory / "part-00000.parquet")], {c: c for c in kinds}, kinds, name, unit, staged=True)


def _csv_relation(src: Source, directory: Path, progress: Optional[bool]) -> Relation:
    """A CSV source turned into Parquet a batch at a time (ids cast to the source's id type,
    timestamps to seconds), rows numbered per file; a file that does not parse is refused naming
    it."""
    directory.mkdir(parents=True, exist_ok=True)
    kinds = _kinds(src)
    out, k = [], 0
    with tqdm(unit=" rows", unit_scale=True, desc="prepare: read CSV", disable=None if progress is None else not progress) as bar:
        for f in src.files:
            try:
                scanner = pa.dataset.dataset(f, format=src.file_format).scanner(
                    columns={role: pa.dataset.field(col) for role, col in src.columns.items()}, batch_size=STAGE_BATCH)
                batches = scanner.to_batches()
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{f}: cannot be read as {src.what}: {_one_line(e)}") from None
            row = 1
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
                    raise DataError(f"{f}: cannot be read as {src.what}: {_one_line(e)}") from None
                table = pa.Table.from_batches([batch])
                for role in ("user_id", "item_id"):
                    table = table.set_column(table.schema.get_field_index(role), role, table[role].cast(src.id_types[role]))
                if "timestamp" in table.column_names:
                    ts, t = table["timestamp"], table.schema.field("timestamp").type
                    if pa.types.is_date(t):
                        ts = pa.compute.cast(ts, pa.timestamp("s")).cast(pa.int64())
                    elif pa.types.is_timestamp(t):  # whole seconds, as the engines read them
                        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[t.unit]
                        ts = pa.compute.divide(ts.cast(pa.int64()), per_second)
                    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                                             ts.cast(src.timestamp_type))
                for role in ("weight", "rating"):
                    if role in table.column_names:
                        table = table.set_column(table.schema.get_field_index(role), role, table[role].cast(pa.float64()))
                path = directory / f"part-{k:05d}.parquet"
                _write_staged(table, path, f, row)
                out.append(str(path))
                row += len(table)
                k += 1
                bar.update(len(table))
    if "timestamp" in kinds:
        kinds["timestamp"] = "float" if src.timestamp_type == pa.float64() else "int"
    return Relation(out, {c: c for c in kinds}, kinds, src.path, "row", staged=True, labels=dict(src.columns))


def _file_relation(path: str, fmt: str, cfg: DataConfig, staging: Path, progress: Optional[bool]) -> Relation:
    src = check_source(path, fmt, cfg)
    if fmt == "csv":
        return _csv_relation(src, staging, progress)
    return Relation(list(src.files), dict(src.columns), _kinds(src), src.path)


def stage_source(cfg: DataConfig, tmp: Path, progress: Optional[bool] = None) -> Staged:
    """The source of `cfg` as Parquet relations (module docstring); text formats and the synthetic
    log are written under ``tmp/_raw`` (and ``tmp/_raw_test``)."""
    raw_dir, test_dir = tmp / "_raw", tmp / "_raw_test"
    limits = (cfg.num_users, cfg.num_items) if cfg.id_mapping == "identity" else None
    if cfg.name == "synthetic":
        t0 = time.perf_counter()
        generate_stream(raw_dir, cfg.num_users, cfg.num_items, cfg.num_interactions, cfg.latent_dim,
                        cfg.popularity_exponent, cfg.affinity, cfg.seed, progress=progress)
        logger.info("generated %d synthetic interactions in %.1fs", cfg.num_interactions, time.perf_counter() - t0)
        files = sorted(str(f) for f in raw_dir.glob("part-*.parquet"))
        columns = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"}
        raw = Relation(files, columns, {"user_id": "int", "item_id": "int", "timestamp": "int"}, "synthetic")
        return Staged(raw, None, "synthetic", "synthetic")
    if cfg.name == "lightgcn":
        train, test, dropped = read_lightgcn(cfg.path, limits)
        return Staged(_table_relation(train, raw_dir, str(Path(cfg.path) / "train.txt"), "line"),
                      _table_relation(test, test_dir, str(Path(cfg.path) / "test.txt"), "line"),
                      cfg.path, str(Path(cfg.path) / "test.txt"), dict(dropped))
    if cfg.name == "movielens":
        table, dropped = read_movielens(cfg.path, cfg.min_rating, cfg.null_ids, limits)
        return Staged(_table_relation(table.drop_columns(["rating"]), raw_dir, cfg.path, "line"), None, cfg.path,
                      cfg.path, dict(dropped))
    raw = _file_relation(cfg.path, cfg.name, cfg, raw_dir, progress)
    if cfg.split != "given":
        return Staged(raw, None, cfg.path, cfg.path)
    test = _file_relation(cfg.test_path, cfg.name, cfg, test_dir, progress)
    for role in ("user_id", "item_id"):
        if raw.kinds[role] != test.kinds[role]:
            t = {"int": "int64", "str": "string"}
            raise DataError(f"{cfg.test_path}: column {role!r} has type {t[test.kinds[role]]} but the train file "
                            f"{cfg.path} has {t[raw.kinds[role]]}")
    return Staged(raw, test, cfg.path, cfg.test_path)


# ---------------------------------------------------------------------------------------------
# The steps on an engine
# ---------------------------------------------------------------------------------------------


def options(cfg: DataConfig, staged: Staged) -> Options:
    kinds = staged.raw.kinds
    if staged.raw_test is not None:  # only the columns both relations have
        kinds = {c: k for c, k in kinds.items() if c in staged.raw_test.kinds}
    return Options(string_users=kinds["user_id"] == "str", string_items=kinds["item_id"] == "str",
                   timestamp="timestamp" in kinds, weight="weight" in kinds, split=cfg.split,
                   test_fraction=cfg.test_fraction, valid_fraction=cfg.valid_fraction, duplicates=cfg.duplicates,
                   id_mapping=cfg.id_mapping, num_users=cfg.num_users, num_items=cfg.num_items, seed=cfg.seed,
                   min_rating=cfg.min_rating, rating="rating" in kinds,
                   item_features=len(cfg.item_features.columns) if cfg.item_features.path else 0,
                   item_feature_buckets=cfg.item_features.hash_buckets,
                   user_features=len(cfg.user_features.columns) if cfg.user_features.path else 0,
                   user_feature_buckets=cfg.user_features.hash_buckets, min_count=cfg.min_count,
                   oov_buckets=cfg.oov_buckets)


FEATURE_FILES = {"item": ("item_features", "items"), "user": ("user_features", "users")}
"""role -> (its DataConfig field, the prepared files' stem)."""


def stage_features(engine: "Engine", cfg: DataConfig, o: Options, staged: Staged, tmp: Path) -> Dict[str, StagedFeatures]:
    """Check and stage the side-feature files (``recsys.data.side_features``) and register each as
    ``{role}_feat_raw`` (id, feature, value)."""
    out = {}
    for role, (key, _) in FEATURE_FILES.items():
        ff = getattr(cfg, key)
        if not ff.path:
            continue
        id_role = f"{role}_id"
        kind = "str" if (o.string_users if role == "user" else o.string_items) else "int"
        default_id = staged.raw.labels.get(id_role, staged.raw.columns[id_role]) if cfg.name in ("parquet", "csv") \
            else (cfg.user_column if role == "user" else cfg.item_column)
        sf = stage_feature_file(ff, role, kind, default_id, cfg.separator, tmp / f"_features_{role}")
        relation = Relation(sf.files, {id_role: "id", "feature": "feature", "value": "value"},
                            {id_role: kind, "feature": "int", "value": "text"}, str(ff.path), staged=True)
        engine.register(f"{role}_feat_raw", relation, [id_role, "feature", "value"])
        out[role] = sf
    return out


def write_features(engine: "Engine", steps: Steps, staged_features: Dict[str, StagedFeatures], cfg: DataConfig,
                   tmp: Path, counts: Dict[str, int]) -> Dict[str, Dict]:
    """The prepared feature files of each role (``recsys.data.layout``) and their manifest entry:
    columns, table sizes, what was counted (ids without interactions, interactions' ids without
    features, null ids and values)."""
    out = {}
    for role, sf in staged_features.items():
        _, stem = FEATURE_FILES[role]
        for name, sql in steps.feature_tables(role):
            engine.create_table(name, sql)
        engine.write_file(steps.feature_rows(role), tmp / f"{stem}_features.parquet")
        feature_csr_npy(tmp / f"{stem}_features.parquet", tmp / f"{stem}_features", counts[f"num_{stem}"],
                        len(sf.columns))
        engine.write_file(steps.feature_values(role), tmp / f"{stem}_feature_values.parquet")
        sizes = {int(f): (int(n), int(rows)) for f, n, rows in engine.fetchall(steps.feature_sizes(role))}
        file_ids, trained, with_row, bare, with_interactions, repeated, untrained_values = (
            int(x or 0) for x in engine.fetchall(steps.feature_counts(role))[0])
        columns = []
        for k, c in enumerate(sf.columns):
            n, rows = sizes.get(k, (0, sf.hash_buckets))
            columns.append({"name": c, "values": n, "rows": max(rows, sf.hash_buckets, 1),
                            "null_values": sf.counts[f"null_values.{c}"]})
        entry = {"path": sf.source, "columns": columns, "hash_buckets": sf.hash_buckets,
                 "counts": {"file_rows": sf.counts["file_rows"], "null_ids": sf.counts["null_ids"],
                            "rows_without_values": sf.counts["rows_without_values"],
                            "ids": file_ids, "ids_with_interactions": trained,
                            "ids_without_interactions": with_row - trained, "ids_without_row": file_ids - with_row,
                            f"{stem}_without_features": bare, "ids_on_several_rows": repeated,
                            "values_of_new_ids_only": untrained_values}}
        out[stem] = entry
        c = entry["counts"]
        logger.info("%s features %s: %d ids (%d with training interactions, %d new: vectors from features alone); "
                    "%d of the %d %s with interactions have no feature value%s; columns %s", role, sf.source,
                    c["ids"], trained, c["ids_without_interactions"], bare, with_interactions, stem,
                    f"; {c['ids_without_row']} ids left without a row (data.id_mapping={cfg.id_mapping})"
                    if c["ids_without_row"] else "", ", ".join(f"{x['name']} ({x['values']} values)" for x in columns))
        for key, what in (("null_ids", "rows with a null id"),
                          ("rows_without_values", "rows with no feature value (all null or empty)"),
                          ("values_of_new_ids_only", "values that only ids without training interactions have "
                                                     "(no trained row would hold them)")):
            if c[key]:
                logger.warning("%s: dropped %d %s", sf.source, c[key], what)
        if c["ids_on_several_rows"]:
            logger.warning("%s: %d ids are on several rows; their values are pooled together", sf.source,
                           c["ids_on_several_rows"])
    return out


class Engine:
    """What the checks and the output need of an engine: fetch rows, stream a query's result as
    Arrow batches, create tables and views, write a query to Parquet, register a source."""

    dialect: Dialect

    def fetchall(self, sql: str) -> List[tuple]: ...
    def batches(self, sql: str): ...
    def write_parquet(self, sql: str, directory: Path, row_group_size: int) -> None: ...
    def write_file(self, sql: str, path: Path) -> None: ...
    def create_table(self, name: str, sql: str) -> None: ...
    def create_view(self, name: str, sql: str) -> None: ...
    def register(self, name: str, relation: Relation, keep: List[str]) -> None: ...


class DuckDBEngine(Engine):
    """DuckDB in process, its tables in a database file of the staging directory."""

    dialect = DUCKDB

    def __init__(self, tmp: Path, threads: int, memory_limit: str) -> None:
        self.con = duckdb.connect(str(tmp / "_engine.duckdb"))
        threads = threads or len(os.sched_getaffinity(0)) or 1  # the cores this process may use
        self.con.execute(f"SET threads = {int(threads)}")
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute(f"SET temp_directory = {sql_string(str(tmp / '_spill'))}")
        self.con.execute("SET preserve_insertion_order = false")  # every output has its ORDER BY
        self.con.execute("SET enable_progress_bar = false")
        self.threads = threads

    def close(self) -> None:
        self.con.close()

    def fetchall(self, sql: str) -> List[tuple]:
        return self.con.execute(sql).fetchall()

    def batches(self, sql: str):
        return self.con.sql(sql).to_arrow_reader(1 << 20)

    def create_table(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS {sql}")

    def create_view(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")

    def write_parquet(self, sql: str, directory: Path, row_group_size: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.con.execute(f"COPY ({sql}) TO {sql_string(str(directory / 'part-00000.parquet'))} (FORMAT parquet, "
                         f"ROW_GROUP_SIZE {int(row_group_size)})")

    def write_file(self, sql: str, path: Path) -> None:
        self.con.execute(f"COPY ({sql}) TO {sql_string(str(path))} (FORMAT parquet)")

    def register(self, name: str, relation: Relation, keep: List[str]) -> None:
        """``name`` as a view of the relation's files with the roles' columns (cast) and
        ``_file`` / ``_row``."""
        select = self.dialect.source_columns(relation.columns, relation.kinds, keep)
        if relation.staged:
            select += ["_file", "_row"]
            args = ""
        else:
            select += ["_recsys_file AS _file", "file_row_number + 1 AS _row"]
            args = ", filename = '_recsys_file', file_row_number = true"
        files = "[" + ", ".join(sql_string(f) for f in relation.files) + "]"
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT {', '.join(select)} FROM read_parquet({files}, "
                         f"union_by_name = true{args})")


def memory_limit(setting: str) -> str:
    """``data.engine_memory``: ``NN%`` of this host's memory (or of its container's limit), or an
    absolute size (``8GB``)."""
    setting = str(setting).strip()
    if setting.endswith("%"):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        try:  # a container's memory limit (cgroup v2), when lower
            limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
            total = min(total, int(limit)) if limit.isdigit() else total
        except OSError:
            pass
        return f"{max(int(total * float(setting[:-1]) / 100 / 2**20), 64)}MB"
    return setting


def run_duckdb(cfg: DataConfig, tmp: Path, version: int, progress: Optional[bool] = None) -> dict:
    """Prepare `cfg`'s dataset into the (empty, temporary) directory `tmp` with DuckDB; returns the
    manifest (the caller writes it last and renames the directory)."""
    t0 = time.perf_counter()
    staged = stage_source(cfg, tmp, progress)
    engine = DuckDBEngine(tmp, cfg.engine_threads, memory_limit(cfg.engine_memory))
    try:
        manifest = run_steps(engine, cfg, staged, tmp, version, progress, read_error(staged))
    finally:
        engine.close()
    for leftover in ("_engine.duckdb", "_engine.duckdb.wal"):
        (tmp / leftover).unlink(missing_ok=True)
    manifest["engine"] = {"name": "duckdb", "version": duckdb.__version__, "threads": engine.threads,
                          "memory_limit": memory_limit(cfg.engine_memory)}
    manifest["prepare_s"] = round(time.perf_counter() - t0, 3)
    return manifest


def read_error(staged: Staged):
    """A DuckDB error while reading the source as a ``DataError`` naming the file at fault (found by
    reading each file with pyarrow: only on this path)."""
    def translate(e: Exception) -> Exception:
        for rel in (staged.raw, staged.raw_test):
            if rel is None or rel.staged:
                continue
            for f in rel.files:
                try:
                    pq.read_table(f, columns=list(rel.columns.values()))
                except (pa.ArrowInvalid, OSError) as bad:
                    return DataError(f"{f}: cannot be read as Parquet (corrupt or truncated?): {_one_line(bad)}")
        return e
    return translate


# ---------------------------------------------------------------------------------------------
# The engine-independent driver of the steps
# ---------------------------------------------------------------------------------------------


def run_steps(engine: Engine, cfg: DataConfig, staged: Staged, tmp: Path, version: int,
              progress: Optional[bool], translate=lambda e: e) -> dict:
    """Run ``recsys.data.steps`` on `engine` and write the layout into `tmp`; returns the manifest.
    Checks run first (null ids, identity ranges, emptiness, repeated pairs), so bad input is
    refused before any output is written."""
    o = options(cfg, staged)
    if cfg.split == "temporal" and not o.timestamp:
        raise DataError(f"{staged.source_name}: data.split=temporal needs a timestamp column (data.timestamp_column)")
    steps = Steps(o, engine.dialect)
    keep = ["user_id", "item_id", *steps.extras] + (["rating"] if o.rating else [])
    engine.register("raw", staged.raw, keep)
    if staged.raw_test is not None:
        engine.register("raw_test", staged.raw_test, [c for c in keep if c in staged.raw_test.kinds])
    staged_features = stage_features(engine, cfg, o, staged, tmp)
    bar = tqdm(total=8, desc="prepare", unit=" step", disable=None if progress is None else not progress)
    try:
        return _run(engine, steps, o, cfg, staged, tmp, version, bar, staged_features)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the engine's own error type: a file it could not read?
        bad = translate(e)
        if bad is e:
            raise
        raise bad from None
    finally:
        bar.close()


def _run(engine: Engine, steps: Steps, o: Options, cfg: DataConfig, staged: Staged, tmp: Path, version: int,
         bar: tqdm, staged_features: Dict[str, StagedFeatures]) -> dict:
    start = time.perf_counter()
    dropped, kept, n_raw, n_clean = _check_source(engine, steps, cfg, staged, bar)
    for name, sql, *view in steps.tables():
        if name == "split" and o.split == "temporal":
            n = engine.fetchall("SELECT count(*) FROM pairs")[0][0]
            sql = steps.tables(int(round(n * (1.0 - cfg.test_fraction))))[1][1]
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        (engine.create_view if view else engine.create_table)(name, sql)
        logger.debug("step %s: %.2fs", name, time.perf_counter() - t0)
        bar.update(1)
    _count_repeats(engine, steps, cfg, staged, dropped, kept, n_clean)
    counts = _check_split(engine, steps, cfg, staged, dropped)
    bar.set_postfix_str("write")
    engine.write_parquet(steps.train_rows(), tmp / "train", cfg.row_group_size)
    engine.write_parquet(steps.test_rows(), tmp / "test", cfg.row_group_size)
    for part in ("train", "test"):
        cut_row_groups(tmp / part, cfg.row_group_size)
    counts["train_interactions"] = write_pieces(tmp, "train")
    write_pieces(tmp, "test")
    hash_stats = _write_vocabularies(engine, steps, cfg, tmp, counts)
    features = write_features(engine, steps, staged_features, cfg, tmp, counts)
    oov = oov_figures(engine, steps, cfg, counts)
    for name, role, sql in steps.counts():
        counts_npy(engine.batches(sql), counts["num_users" if role == "user" else "num_items"], tmp / f"{name}.npy")
    if o.valid_fraction <= 0:  # no validation rows: the fit counts are all the training counts
        shutil.copyfile(tmp / "item_counts_all.npy", tmp / "item_counts.npy")
        np.save(tmp / "valid_user_counts.npy", np.zeros(counts["num_users"], dtype=np.int64))
    test_counts = np.load(tmp / "test_user_counts.npy", mmap_mode="r")
    counts["test_users"] = int(np.count_nonzero(test_counts))
    missing = np.load(tmp / "test_missing_user_counts.npy", mmap_mode="r")
    unseen_users, unseen_user_rows = (int(x or 0) for x in engine.fetchall(steps.unseen_users())[0])
    # the test users with no test row that has a vector: all misses of the figure over all test rows
    counts["test_users_without_vectors"] = int(np.count_nonzero((test_counts == 0) & (missing > 0))) + unseen_users
    counts["test_interactions_without_vectors"] = int(missing.sum()) + unseen_user_rows
    if (tmp / "test_cold_user_counts.npy").exists():
        cold = np.load(tmp / "test_cold_user_counts.npy", mmap_mode="r")
        counts["test_cold_interactions"], counts["test_cold_users"] = int(cold.sum()), int(np.count_nonzero(cold))
    counts["valid_interactions"] = int(np.load(tmp / "valid_user_counts.npy", mmap_mode="r").sum())
    bar.set_postfix_str(f"{n_raw / max(time.perf_counter() - start, 1e-9):,.0f} rows/s")
    bar.update(bar.total - bar.n)
    for reason, count in dropped.items():
        if count:
            logger.warning("%s: dropped %d rows (%s)", staged.source_name, count, reason.replace("_", " "))
    for reason, count in kept.items():
        if count:
            logger.info("%s: kept %d repeated interactions (%s; data.duplicates=keep)", staged.source_name, count,
                        reason.replace("_", " "))
    pieces = len(json.loads((tmp / "train" / "pieces.json").read_text()))
    manifest = {
        "version": version,
        "source": staged.source_name,
        "config": dataclasses.asdict(cfg),
        "split": cfg.split,
        "id_mapping": cfg.id_mapping,
        "schema": {"user_id": "string" if o.string_users else "int64",
                   "item_id": "string" if o.string_items else "int64",
                   "timestamp": o.timestamp, "weight": o.weight},
        "counts": {"raw_interactions": n_raw, **counts},
        "dropped": dropped,
        "kept": kept,
        "row_group_size": cfg.row_group_size,
        "train_row_groups": pieces,
    }
    if hash_stats:
        manifest["hash"] = hash_stats
    if features:
        manifest["features"] = features
    if oov:
        manifest["oov"] = oov
    return manifest


def oov_figures(engine: Engine, steps: Steps, cfg: DataConfig, counts: Dict[str, int]) -> Optional[Dict[str, Dict]]:
    """``data.oov_buckets``: for the item table, where its OOV rows start, how many rare ids and training
    interactions they took, how many test rows of unseen ids were hashed into them (logged)."""
    if not cfg.oov_buckets:
        return None
    out = {}
    for role, stem in (("item", "items"),):
        rare, rare_rows, test_rows = (int(x or 0) for x in engine.fetchall(steps.oov_counts(role))[0])
        first = counts[f"num_{stem}"] - cfg.oov_buckets
        used = int(engine.fetchall(f"SELECT count(DISTINCT row) FROM {stem} WHERE oov")[0][0])
        out[stem] = {"first_row": first, "buckets": cfg.oov_buckets, "min_count": cfg.min_count, "seed": cfg.seed,
                     "rare_ids": rare, "rare_interactions": rare_rows, "test_rows_of_unseen_ids": test_rows,
                     "empty_buckets": cfg.oov_buckets - used}
        if used < cfg.oov_buckets:
            logger.warning("%d of the %d OOV rows of the %s hold no rare id: untrained, their vectors are the initial "
                           "ones (fewer data.oov_buckets, or a larger data.min_count)", cfg.oov_buckets - used,
                           cfg.oov_buckets, stem)
        logger.info("OOV rows of the %s: %d rare ids (fewer than %d training interactions, %d interactions) share "
                    "rows %d..%d; %d test rows of %s unseen in training hashed into them", stem, rare, cfg.min_count,
                    rare_rows, first, first + cfg.oov_buckets - 1, test_rows, stem)
    return out


def _where(relation: Relation, f: str, row: int) -> str:
    return f"{f}, {relation.unit} {row}"


def _check_relation(engine: Engine, steps: Steps, cfg: DataConfig, relation: Relation, name: str) -> Tuple[int, int, int]:
    """(rows, rows with a null id, rows below min_rating) of one source relation; null ids
    (``data.null_ids=error``) and identity ids out of range refused, naming the file and row."""
    rows, nulls, below = engine.fetchall(steps.raw_counts(name))[0]
    nulls, below = int(nulls or 0), int(below or 0)
    if cfg.id_mapping == "identity":
        bad = engine.fetchall(steps.first_out_of_range(name))
        if bad:
            f, row, user, item, user_bad = bad[0]
            role, value, limit, key = (("user_id", user, cfg.num_users, "num_users") if user_bad
                                       else ("item_id", item, cfg.num_items, "num_items"))
            n = engine.fetchall(steps.out_of_range_in_file(name, f, bool(user_bad)))[0][0]
            raise DataError(f"{_where(relation, f, row)}: {ROLE_WORD[role]} id {value} (column "
                            f"{relation.label(role)!r}) is out of range [0, {limit}) of data.id_mapping=identity "
                            f"with data.{key}={limit} ({n} such rows in this file)")
    if nulls and cfg.null_ids == "error":
        f, row, user_null = engine.fetchall(steps.first_null(name))[0]
        role = "user_id" if user_null else "item_id"
        n = engine.fetchall(steps.nulls_in_file(name, f))[0][0]
        raise DataError(f"{_where(relation, f, row)}: null {ROLE_WORD[role]} id (column {relation.label(role)!r}); "
                        f"{n} rows of this file have a null user or item id (data.null_ids=drop drops them and counts "
                        "them)")
    if rows - nulls == 0:
        raise DataError(f"{relation.name}: no interactions (after dropping {nulls} rows with null ids)")
    if rows - nulls - below == 0:
        raise DataError(f"{relation.name}: no interactions with rating >= {cfg.min_rating} (data.min_rating): all "
                        f"{below} rows are below it")
    return int(rows), nulls, below


def _check_source(engine: Engine, steps: Steps, cfg: DataConfig, staged: Staged,
                  bar: tqdm) -> Tuple[Dict[str, int], Dict[str, int], int, int]:
    """(dropped, kept, raw rows, clean rows of ``raw``) after checking the source relations."""
    bar.set_postfix_str("check")
    rows, nulls, below = _check_relation(engine, steps, cfg, staged.raw, "raw")
    pre = staged.dropped
    dropped = {"null_ids": nulls + pre.get("null_ids", 0)}
    n_raw = rows + pre.get("null_ids", 0) + pre.get("below_min_rating", 0)
    if cfg.rating_column or "below_min_rating" in pre:
        dropped["below_min_rating"] = below + pre.get("below_min_rating", 0)
    if staged.raw_test is not None:
        _, test_nulls, test_below = _check_relation(engine, steps, cfg, staged.raw_test, "raw_test")
        dropped["test_null_ids"] = test_nulls + pre.get("test_null_ids", 0)
        if "below_min_rating" in dropped:
            dropped["test_below_min_rating"] = test_below
    if cfg.duplicates == "error":
        for name, relation in (("raw", staged.raw), ("raw_test", staged.raw_test)):
            if relation is None:
                continue
            n, pairs = engine.fetchall(steps.repeats(name))[0]
            if n > pairs:
                user, item = engine.fetchall(steps.first_repeat(name))[0]
                raise DataError(f"{relation.name}: {n - pairs} duplicate (user, item) interactions, the first: user "
                                f"{user!r}, item {item!r} (data.duplicates=drop keeps the first of each, "
                                "data.duplicates=keep keeps them all)")
    bar.update(1)
    return dropped, {}, n_raw, rows - nulls - below


def _count_repeats(engine: Engine, steps: Steps, cfg: DataConfig, staged: Staged, dropped: Dict[str, int],
                   kept: Dict[str, int], n_clean: int) -> None:
    """Repeated pairs: dropped (``drop``) or kept (``keep``), counted (``error`` refused them already)."""
    if cfg.duplicates == "drop" and staged.raw_test is None:  # the clean rows less the distinct pairs kept
        table = "split" if cfg.split == "random" else "pairs"
        dropped["duplicates"] = n_clean - int(engine.fetchall(f"SELECT count(*) FROM {table}")[0][0])
        return
    names = [("raw", "pairs", "duplicates")] if staged.raw_test is None else [
        ("raw", "pairs", "train_duplicates"), ("raw_test", "pairs_test", "test_duplicates")]
    for raw, pairs, key in names:
        n, distinct = (0, 0) if cfg.duplicates == "error" else engine.fetchall(steps.repeats(raw))[0]
        (dropped if cfg.duplicates == "drop" else kept)[key] = int(n - distinct)


def _check_split(engine: Engine, steps: Steps, cfg: DataConfig, staged: Staged,
                 dropped: Dict[str, int]) -> Dict[str, int]:
    """The split's counts; an empty training or test split, unseen test ids (``data.unseen_test=error``)
    refused. Unseen test rows are counted into `dropped`."""
    n_split, n_pairs = 0, 0
    if cfg.split == "temporal":
        n_split, n_pairs = engine.fetchall("SELECT (SELECT count(*) FROM split), (SELECT count(*) FROM pairs)")[0]
    if n_split != n_pairs:
        raise DataError(f"{staged.source_name}: {n_pairs - n_split} rows have no timestamp (column "
                        f"{staged.raw.label('timestamp')!r}); data.split=temporal needs one on every row")
    if engine.fetchall("SELECT count(*) FROM train")[0][0] == 0:
        raise DataError(f"{staged.source_name}: the training split is empty")
    n_test, unseen_users, unseen_items = engine.fetchall(steps.unseen())[0]
    n_test, unseen_users, unseen_items = int(n_test), int(unseen_users or 0), int(unseen_items or 0)
    if cfg.unseen_test == "error" and (unseen_users or unseen_items):
        parts = []
        for word, n in (("user", unseen_users), ("item", unseen_items)):
            if n:
                first = engine.fetchall(steps.first_unseen(word))[0][1]
                parts.append(f"{n} have {'an' if word == 'item' else 'a'} {word} never seen in training (the first: "
                             f"{word} {first!r})")
        raise DataError(f"{staged.test_name}: of {n_test} test interactions, {' and '.join(parts)}; no vector is "
                        "trained for them (data.unseen_test=drop drops them and counts them)")
    dropped.update(test_unseen_user=unseen_users, test_unseen_item=unseen_items)
    n_kept = n_test - unseen_users - unseen_items
    if n_kept == 0:
        why = (f" (data.split=random holds out floor(n * {cfg.test_fraction}) of each user's n interactions: "
               "no user has enough)" if cfg.split == "random" and n_test == 0 else "")
        raise DataError(f"{staged.test_name}: the test split is empty{why}; rows dropped: {dropped}")
    if cfg.id_mapping == "vocab":
        num_users, num_items = engine.fetchall(f"SELECT ({steps.num_rows('user')}), ({steps.num_rows('item')})")[0]
    else:
        num_users, num_items = cfg.num_users, cfg.num_items
    return {"num_users": int(num_users), "num_items": int(num_items), "test_interactions": n_kept}


def _write_vocabularies(engine: Engine, steps: Steps, cfg: DataConfig, tmp: Path,
                        counts: Dict[str, int]) -> Optional[Dict[str, Dict[str, float]]]:
    """users.parquet / items.parquet (vocab: the ids of the rows, in row order; identity: 0..N-1;
    hash: every id seen in training and its row); returns the hash collision figures (hash only)."""
    stats = {}
    for role, which, column in (("user", "users", "user_id"), ("item", "items", "item_id")):
        path = tmp / f"{which}.parquet"
        if cfg.id_mapping == "identity":
            n = counts["num_users" if role == "user" else "num_items"]
            with pq.ParquetWriter(path, pa.schema([(column, pa.int64())])) as writer:
                for start in range(0, n, 1 << 22):
                    writer.write_table(pa.table({column: pa.array(np.arange(start, min(n, start + (1 << 22))))}))
            continue
        engine.write_file(steps.vocab_rows(role), path)
        if cfg.id_mapping == "hash":
            ids, used, sharing = engine.fetchall(steps.collisions(role))[0]
            ids, used, sharing = int(ids or 0), int(used), int(sharing or 0)
            stats[which] = {"distinct_ids": ids, "rows_used": used,
                            "collision_rate": float(1.0 - used / ids) if ids else 0.0, "ids_sharing_a_row": sharing}
            logger.info("data.id_mapping=hash: %d distinct %s ids in %d rows used (of %d): collision rate %.4f",
                        ids, role, used, counts["num_users" if role == "user" else "num_items"],
                        stats[which]["collision_rate"])
    return stats or None
