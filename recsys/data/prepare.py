"""Preparation: raw interactions -> a prepared dataset (contiguous rows, vocabularies, split).

The canonical input is Parquet with a user id column, an item id column (int or string ids),
an optional timestamp and an optional weight. ``prepare`` turns it into a directory::

    <root>/<name>-<hash>/
        train.parquet  test.parquet     columns: user (int64 row), item (int64 row)[, timestamp][, weight]
        users.parquet  items.parquet    the vocabularies: row i holds the raw id of embedding row i
                                        (data.id_mapping=hash: each raw id seen and its hashed ``row``)
        manifest.json                   counts, schema, split, rows dropped and why, "loader"

That is the layout of ``data.loader=memory`` (``recsys.data.dataset.Dataset.load`` reads it whole).
Large sources (``resolve_loader``: from ``data.stream_min_rows`` rows on) are prepared by
``recsys.data.stream_prepare`` in two streaming passes into Parquet row groups instead (train/,
test/, counts; see its docstring). ``prepare_everywhere`` is what a multi-rank job calls: rank 0
prepares (or reuses) the dataset while the others wait for its path.

Every dropped row is counted in the manifest and logged; the policies for bad rows (null ids,
duplicates, test rows unseen in training) are ``drop`` (counted) or ``error`` (refused, naming the
file and row). The input is read and checked in memory before anything is written; the directory
is then written under a temporary name and renamed, so a reader sees a complete dataset or none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.atomic import write_json_atomic, write_parquet_atomic
from recsys.config import Config, ConfigError, DataConfig, memory_reason
from recsys.data.hashing import collision_stats, hash_rows
from recsys.data.readers import DataError, read_columns, read_lightgcn, read_movielens
from recsys.data.stream_prepare import parquet_rows, prepare_stream
from recsys.data.synthetic import synthetic_table
from recsys.distributed import from_rank0

logger = logging.getLogger(__name__)

PREPARED_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Reading and validating raw interactions
# ---------------------------------------------------------------------------------------------


def id_limits(cfg: DataConfig) -> Optional[Tuple[int, int]]:
    """(num_users, num_items) that integer ids must stay below with ``id_mapping=identity``; else None."""
    return (cfg.num_users, cfg.num_items) if cfg.id_mapping == "identity" else None


def read_interactions(path: str, cfg: DataConfig) -> Tuple[pa.Table, Dict[str, int]]:
    """Read a Parquet or CSV file or directory (``cfg.name``) with the configured column mapping."""
    return read_columns(path, cfg.name, cfg.user_column, cfg.item_column, cfg.timestamp_column,
                        cfg.weight_column, cfg.rating_column, cfg.min_rating, cfg.separator, cfg.null_ids,
                        id_limits(cfg))


def _duplicates(table: pa.Table, policy: str, source: str) -> Tuple[pa.Table, int]:
    """Repeated (user, item) pairs under ``policy`` (data.duplicates): ``drop`` keeps the first
    occurrence (earliest timestamp when there is one), ``keep`` keeps all, ``error`` refuses them.
    Returns the table and the number of repeats (dropped or kept)."""
    n = len(table)
    if policy == "drop" and "timestamp" in table.column_names:
        table = table.sort_by([("timestamp", "ascending")])
    indexed = table.select(["user_id", "item_id"]).append_column("_row", pa.array(np.arange(len(table))))
    first = indexed.group_by(["user_id", "item_id"], use_threads=False).aggregate([("_row", "min")])
    keep = np.sort(first.column("_row_min").to_numpy())
    n_dup = n - len(keep)
    if n_dup and policy == "error":
        repeated = np.ones(n, dtype=bool)
        repeated[keep] = False
        row = int(np.argmax(repeated))
        raise DataError(f"{source}: {n_dup} duplicate (user, item) interactions, the first: user "
                        f"{table['user_id'][row].as_py()!r}, item {table['item_id'][row].as_py()!r} "
                        "(data.duplicates=drop keeps the first of each, data.duplicates=keep keeps them all)")
    if policy == "drop":
        return table.take(keep), n_dup
    return table, n_dup


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _holdout_mask(codes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per-user random holdout: True for floor(n * fraction) random rows of each user (code)."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(codes)), codes))
    sorted_codes = codes[order]
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(codes)) - starts[sorted_codes]
    held = np.zeros(len(codes), dtype=bool)
    held[order] = rank < np.floor(counts[sorted_codes] * fraction)
    return held


def _split_random(table: pa.Table, fraction: float, seed: int) -> Tuple[pa.Table, pa.Table]:
    """Per-user random holdout: floor(n * fraction) of each user's interactions go to test."""
    codes = pc.dictionary_encode(table["user_id"]).combine_chunks().indices.to_numpy()
    is_test = _holdout_mask(codes, fraction, seed)
    return table.filter(pa.array(~is_test)), table.filter(pa.array(is_test))


def _split_temporal(table: pa.Table, fraction: float, source: str) -> Tuple[pa.Table, pa.Table]:
    """Global time cut-off: the latest `fraction` of the log (by timestamp) is the test set."""
    if "timestamp" not in table.column_names:
        raise DataError(f"{source}: data.split=temporal needs a timestamp column (data.timestamp_column)")
    order = np.argsort(table["timestamp"].to_numpy(), kind="stable")
    cut = int(round(len(order) * (1.0 - fraction)))
    return table.take(order[:cut]), table.take(order[cut:])


# ---------------------------------------------------------------------------------------------
# Prepare: raw -> prepared directory
# ---------------------------------------------------------------------------------------------


# DataConfig fields that only tell how the prepared data are read, or how the loader is chosen:
# not part of a prepared dataset's identity (the resolved loader is, for streamed datasets).
READ_ONLY_FIELDS = ("loader", "stream_min_rows", "row_group_size", "num_workers", "shuffle_buffer")


def _stream_unsupported(cfg: DataConfig) -> Optional[str]:
    """Why the streaming loader cannot prepare `cfg` (None when it can)."""
    if cfg.name not in ("synthetic", "parquet", "csv"):
        return f"data={cfg.name} is read in memory"
    if cfg.split != "random":
        return (f"data.split={cfg.split} needs the whole log in memory (streaming splits at random, per (user, item) "
                "pair)")
    if cfg.duplicates == "error":
        return "data.duplicates=error needs the whole log in memory to find repeated pairs"
    return None


def source_rows(cfg: DataConfig) -> Optional[int]:
    """Rows of the source as far as they are known without reading it: ``num_interactions`` of a
    synthetic source, the metadata row count of a Parquet file or directory; else None."""
    if cfg.name == "synthetic":
        return cfg.num_interactions
    if cfg.name == "parquet" and cfg.path:
        return parquet_rows(cfg.path)
    return None


def resolve_loader(cfg: DataConfig, memory_reason: Optional[str] = None, quiet: bool = False) -> str:
    """``memory`` or ``stream``: how the dataset of `cfg` is prepared and read (data.loader).

    ``auto`` streams a synthetic or Parquet source of at least ``data.stream_min_rows`` rows (the
    Parquet metadata's row count) when the configuration allows it, else reads it in memory.
    `memory_reason` (from the caller, e.g. a model that needs per-user histories) forces memory;
    with ``data.loader=stream`` it is a ``ConfigError``. Pass the result back as ``data.loader``
    (``dataclasses.replace``) so that ``prepare`` and ``prepared_dir`` agree with the caller."""
    if cfg.loader == "memory":
        return "memory"
    if cfg.loader == "stream":
        if memory_reason:
            raise ConfigError(f"data.loader=stream: {memory_reason}; use data.loader=memory")
        return "stream"
    rows = source_rows(cfg)
    if rows is None or rows < cfg.stream_min_rows:
        return "memory"
    why = memory_reason or _stream_unsupported(cfg)
    if why:
        if not quiet:
            logger.warning("%d source rows (data.stream_min_rows=%d), but the memory loader is used: %s", rows,
                           cfg.stream_min_rows, why)
        return "memory"
    return "stream"


def _fingerprint(cfg: DataConfig, loader: str = "memory") -> str:
    fields = dataclasses.asdict(cfg)
    fields.pop("root")
    for key in READ_ONLY_FIELDS:
        fields.pop(key)
    if loader == "stream":
        fields["loader"] = loader
        fields["row_group_size"] = cfg.row_group_size
    for key in ("path", "test_path"):
        if fields[key]:
            p = Path(fields[key])
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            fields[key] = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    fields["version"] = PREPARED_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepared_dir(cfg: DataConfig, loader: Optional[str] = None) -> Path:
    """Where `cfg`'s dataset is prepared (`loader`: the resolved data.loader, resolved here if None)."""
    stem = "synthetic" if cfg.name == "synthetic" else Path(cfg.path).name.split(".")[0] or "parquet"
    return Path(cfg.root) / f"{stem}-{_fingerprint(cfg, loader or resolve_loader(cfg))}"


def prepare(cfg: DataConfig, progress: Optional[bool] = None) -> Path:
    """Prepare the dataset described by `cfg` (or reuse an identical earlier preparation).

    ``data.loader`` (``resolve_loader``) picks the layout: ``memory`` (train.parquet, test.parquet,
    ...; read whole by ``Dataset.load``) or ``stream`` (row groups, counts and vocabularies
    written by ``recsys.data.stream_prepare.prepare_stream`` in two passes over the source, never holding it;
    `progress`: its tqdm bars, None: on a terminal only).

    Memory: everything is read, checked and split in memory first, so bad input (a
    ``DataError``) leaves nothing on disk, not even ``data.root``. Stream: the schemas and then
    every row are checked in the first pass, before anything is written (the synthetic raw log
    apart); on bad input nothing is left either. The files are written into a temporary
    directory beside the final one, which is renamed into place once complete (manifest last).
    A prepare killed at any point leaves at most a ``.<name>.tmp-<pid>`` directory that no later
    run reuses (a later prepare removes it once its process is gone)."""
    loader = resolve_loader(cfg)
    if loader == "stream":
        why = _stream_unsupported(cfg)
        if why:  # data.loader=stream is refused by DataConfig already; a resolved auto never gets here
            raise ConfigError(f"data.loader=stream: {why}; use data.loader=memory")
    out = prepared_dir(cfg, loader)
    if (out / "manifest.json").exists():
        logger.info("reusing prepared dataset %s", out)
        return out
    if loader == "stream":
        return _prepare_streamed(cfg, out, progress)
    t0 = time.perf_counter()
    tables, manifest = _prepare_tables(cfg)
    manifest["prepare_s"] = round(time.perf_counter() - t0, 3)
    manifest["loader"] = "memory"
    out.parent.mkdir(parents=True, exist_ok=True)
    with _staged_dataset(out) as tmp:
        for name, table in tables.items():
            write_parquet_atomic(table, tmp / f"{name}.parquet")
        write_json_atomic(manifest, tmp / "manifest.json")
    logger.info("prepared dataset %s in %.1fs", out, time.perf_counter() - t0)
    return out


def _prepare_streamed(cfg: DataConfig, out: Path, progress: Optional[bool]) -> Path:
    """The streaming layout (recsys.data.stream_prepare), written into a temporary directory and renamed. On
    bad input (DataError) the temporary directory goes, and so do ``data.root`` and its parents
    that this call created, when empty."""
    t0 = time.perf_counter()
    root = out.parent
    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again on bad input
    root.mkdir(parents=True, exist_ok=True)
    try:
        with _staged_dataset(out) as tmp:
            manifest = prepare_stream(cfg, tmp, PREPARED_VERSION, progress)
            manifest["prepare_s"] = round(time.perf_counter() - t0, 3)
            write_json_atomic(manifest, tmp / "manifest.json")
    except DataError:
        for p in created:
            try:
                p.rmdir()  # only when empty
            except OSError:
                break
        raise
    logger.info("prepared dataset %s (streaming layout) in %.1fs", out, time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def _staged_dataset(out: Path) -> Iterator[Path]:
    """A fresh temporary directory ``.<name>.tmp-<host>-<pid>`` beside `out` (this host's stale ones
    removed first) to write the dataset into; renamed to `out` when the block ends (unless a
    concurrent identical preparation renamed its own first: then it is removed), removed when the
    block raises."""
    _remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "manifest.json").exists():  # not a concurrent identical preparation
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(out: Path) -> None:
    """Remove ``.<name>.tmp-<host>-<pid>`` directories left by a killed prepare on this host (their
    pid is gone). Other hosts' temporaries are left alone: data.root may be a shared file system."""
    for tmp in out.parent.glob(f".{out.name}.tmp-{socket.gethostname()}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            logger.info("removing %s, left by an interrupted preparation", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def _unseen(train: pa.Table, test: pa.Table, policy: str, source: str) -> Tuple[pa.Array, Dict[str, int]]:
    """Test rows whose user or item has no training interaction: counted, and refused with
    ``policy=error`` (data.unseen_test). Returns the mask of the rows to keep and the counts."""
    seen_user = pc.is_in(test["user_id"], value_set=pc.unique(train["user_id"]))
    seen_item = pc.is_in(test["item_id"], value_set=pc.unique(train["item_id"]))
    unseen_user = pc.invert(seen_user)
    unseen_item = pc.and_(pc.invert(seen_item), seen_user)
    counts = {"test_unseen_user": int(pc.sum(unseen_user).as_py() or 0),
              "test_unseen_item": int(pc.sum(unseen_item).as_py() or 0)}
    if policy == "error" and (counts["test_unseen_user"] or counts["test_unseen_item"]):
        parts = []
        for word, mask, n in (("user", unseen_user, counts["test_unseen_user"]),
                              ("item", unseen_item, counts["test_unseen_item"])):
            if n:
                row = int(np.argmax(mask.to_numpy(zero_copy_only=False)))
                parts.append(f"{n} have {'an' if word == 'item' else 'a'} {word} never seen in training (the first: {word} "
                             f"{test[f'{word}_id'][row].as_py()!r})")
        raise DataError(f"{source}: of {len(test)} test interactions, {' and '.join(parts)}; no vector is trained "
                        "for them (data.unseen_test=drop drops them and counts them)")
    return pc.and_(seen_user, seen_item), counts


def _read_source(cfg: DataConfig) -> Tuple[str, pa.Table, Optional[pa.Table], Dict[str, int]]:
    """(source name, its interactions, the given test split (LightGCN files) or None, rows dropped by reading)."""
    if cfg.name == "synthetic":
        table = synthetic_table(cfg.num_users, cfg.num_items, cfg.num_interactions, cfg.latent_dim,
                                cfg.popularity_exponent, cfg.seed, cfg.affinity)
        return "synthetic", table, None, {"null_ids": 0}
    if cfg.name == "lightgcn":
        table, given, dropped = read_lightgcn(cfg.path, id_limits(cfg))
        return cfg.path, table, given, dropped
    if cfg.name == "movielens":
        table, dropped = read_movielens(cfg.path, cfg.min_rating, cfg.null_ids, id_limits(cfg))
    else:
        table, dropped = read_interactions(cfg.path, cfg)
    return cfg.path, table, None, dropped


def _split(cfg: DataConfig, source: str, table: pa.Table, given: Optional[pa.Table], dropped: Dict[str, int],
           kept: Dict[str, int]) -> Tuple[pa.Table, pa.Table, str]:
    """(train, test, the test rows' source name) by ``data.split``, repeated pairs handled by
    ``data.duplicates`` (counted into `dropped` or `kept`)."""
    if cfg.split != "given":
        table, n_dup = _duplicates(table, cfg.duplicates, source)
        (dropped if cfg.duplicates == "drop" else kept)["duplicates"] = n_dup
        if cfg.split == "random":
            return (*_split_random(table, cfg.test_fraction, cfg.seed), source)
        return (*_split_temporal(table, cfg.test_fraction, source), source)
    if given is None:
        given, test_dropped = read_interactions(cfg.test_path, cfg)
        dropped["test_null_ids"] = test_dropped["null_ids"]
    test = given
    test_source = cfg.test_path or str(Path(cfg.path) / "test.txt")
    train_source = str(Path(cfg.path) / "train.txt") if cfg.name == "lightgcn" else cfg.path
    for name in ("user_id", "item_id"):
        if table.schema.field(name).type != test.schema.field(name).type:
            raise DataError(f"{test_source}: column {name!r} has type {test.schema.field(name).type} "
                            f"but the train file {cfg.path} has {table.schema.field(name).type}")
    test = test.select([c for c in test.column_names if c in table.column_names])
    table = table.select([c for c in table.column_names if c in test.column_names])
    table, n_train_dup = _duplicates(table, cfg.duplicates, train_source)
    test, n_test_dup = _duplicates(test, cfg.duplicates, test_source)
    (dropped if cfg.duplicates == "drop" else kept).update(train_duplicates=n_train_dup, test_duplicates=n_test_dup)
    return table, test, test_source


def _rows_table(cfg: DataConfig, table: pa.Table, users_vocab: pa.Array, items_vocab: pa.Array) -> pa.Table:
    """Interactions with raw ids -> table rows (``user``, ``item``; hashed, or the position in the
    vocabulary), the timestamp and weight kept."""
    if cfg.id_mapping == "hash":
        cols = {"user": pa.array(hash_rows(table["user_id"], cfg.seed, cfg.num_users)),
                "item": pa.array(hash_rows(table["item_id"], cfg.seed, cfg.num_items))}
    else:
        cols = {"user": pc.cast(pc.index_in(table["user_id"], value_set=users_vocab), pa.int64()),
                "item": pc.cast(pc.index_in(table["item_id"], value_set=items_vocab), pa.int64())}
    for extra in ("timestamp", "weight"):
        if extra in table.column_names:
            cols[extra] = table[extra]
    return pa.table(cols)


def _prepare_tables(cfg: DataConfig) -> Tuple[Dict[str, pa.Table], dict]:
    """The prepared dataset in memory: ({train, test, users, items} tables, manifest)."""
    kept: Dict[str, int] = {}
    source, table, given, dropped = _read_source(cfg)
    n_raw = len(table) + dropped["null_ids"] + dropped.get("below_min_rating", 0)
    train, test, test_source = _split(cfg, source, table, given, dropped, kept)
    if len(train) == 0:
        raise DataError(f"{source}: the training split is empty")

    # Rows of the embedding tables: the sorted distinct training ids (vocab), or the ids themselves
    # (identity: every row in [0, N) exists, whether or not it has training interactions), or
    # hash(id, seed) mod N (hash: users_vocab / items_vocab are then the distinct training ids,
    # written with their rows).
    if cfg.id_mapping == "identity":
        users_vocab = pa.array(np.arange(cfg.num_users), pa.int64())
        items_vocab = pa.array(np.arange(cfg.num_items), pa.int64())
    else:
        users_vocab = pc.unique(train["user_id"]).sort()
        items_vocab = pc.unique(train["item_id"]).sort()
    hashed = cfg.id_mapping == "hash"
    seen, unseen = _unseen(train, test, cfg.unseen_test, test_source)
    dropped.update(unseen)
    for reason, count in dropped.items():
        if count:
            logger.warning("%s: dropped %d rows (%s)", source, count, reason.replace("_", " "))
    for reason, count in kept.items():
        if count:
            logger.info("%s: kept %d repeated interactions (%s; data.duplicates=keep)", source, count,
                        reason.replace("_", " "))

    train_t = _rows_table(cfg, train, users_vocab, items_vocab)
    test_t = _rows_table(cfg, test.filter(seen), users_vocab, items_vocab)
    if cfg.valid_fraction > 0:
        # Model selection data: a per-user holdout carved from the training split (never the test).
        held = _holdout_mask(train_t["user"].to_numpy(), cfg.valid_fraction, cfg.seed + 1)
        train_t = train_t.append_column("valid", pa.array(held))
    if len(test_t) == 0:
        why = (f" (data.split=random holds out floor(n * {cfg.test_fraction}) of each user's n interactions: "
               "no user has enough)" if cfg.split == "random" and len(test) == 0 else "")
        raise DataError(f"{test_source}: the test split is empty{why}; rows dropped: {dropped}")
    tables = {"train": train_t, "test": test_t, "users": pa.table({"user_id": users_vocab}),
              "items": pa.table({"item_id": items_vocab})}
    extra = {}
    if hashed:
        extra["hash"] = {}
        for which, column, ids, n in (("users", "user_id", users_vocab, cfg.num_users),
                                      ("items", "item_id", items_vocab, cfg.num_items)):
            rows = hash_rows(ids, cfg.seed, n)
            tables[which] = pa.table({column: ids, "row": rows})
            extra["hash"][which] = stats = collision_stats(rows)
            logger.info("data.id_mapping=hash: %d distinct %s ids in %d rows used (of %d): collision rate %.4f",
                        stats["distinct_ids"], which[:-1], stats["rows_used"], n, stats["collision_rate"])
    return tables, {
        "version": PREPARED_VERSION,
        "source": source,
        "config": dataclasses.asdict(cfg),
        "split": cfg.split,
        "id_mapping": cfg.id_mapping,
        "schema": {"user_id": str(users_vocab.type), "item_id": str(items_vocab.type),
                   "timestamp": "timestamp" in train_t.column_names, "weight": "weight" in train_t.column_names},
        "counts": {
            "raw_interactions": n_raw,
            "num_users": cfg.num_users if hashed else len(users_vocab),
            "num_items": cfg.num_items if hashed else len(items_vocab),
            "train_interactions": len(train_t),
            "test_interactions": len(test_t),
            "test_users": len(pc.unique(test_t["user"])),
            "valid_interactions": int(pc.sum(train_t["valid"]).as_py() or 0) if "valid" in train_t.column_names else 0,
        },
        "dropped": dropped,
        "kept": kept,
        **extra,
    }


def loader_config(cfg: DataConfig, memory_reason: Optional[str] = None, quiet: bool = False) -> DataConfig:
    """`cfg` with ``data.loader`` resolved (``auto`` -> ``memory`` or ``stream``, see
    ``resolve_loader``): what ``prepare`` and ``prepared_dir`` then agree on. `memory_reason`:
    why the caller needs the dataset in memory (``recsys.config.memory_reason``), if it does."""
    return dataclasses.replace(cfg, loader=resolve_loader(cfg, memory_reason, quiet))


def data_config(cfg: Config, quiet: bool = False) -> DataConfig:
    """The run's data config with ``data.loader`` resolved for its model (history bags and stacking
    need the memory loader): the dataset that training, the dry run, ``recsys.prepare`` and the
    run hash of `cfg` all mean. `quiet`: do not log why a large source is read in memory."""
    return loader_config(cfg.data, memory_reason(cfg), quiet)


def prepare_everywhere(cfg: Config, progress: Optional[bool] = None) -> Path:
    """The run's dataset (``data_config``) resolved and prepared by rank 0 while the other ranks wait
    (``train.timeout_minutes``); its directory on every rank (a ``DataError`` or ``ConfigError`` on
    every rank)."""
    return Path(from_rank0(lambda: str(prepare(data_config(cfg), progress)), DataError, ConfigError))
