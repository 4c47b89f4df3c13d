"""Data: raw interactions -> a prepared dataset (contiguous rows, vocabularies, split) -> batches.

The canonical input is Parquet with a user id column, an item id column (int or string ids),
an optional timestamp and an optional weight. ``prepare`` turns it into a directory::

    <root>/<name>-<hash>/
        train.parquet  test.parquet     columns: user (int64 row), item (int64 row)[, timestamp][, weight]
        users.parquet  items.parquet    the vocabularies: row i holds the raw id of embedding row i
        manifest.json                   counts, schema, split, rows dropped and why

Every dropped row is counted in the manifest and logged. The directory is written under a
temporary name and renamed, so a reader sees a complete dataset or none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys.config import DataConfig

logger = logging.getLogger(__name__)

PREPARED_VERSION = 1
USER_FEATURE = "user"
ITEM_FEATURE = "item"


class DataError(ValueError):
    """Input that cannot be used; the message names the file, the column and the reason."""


# ---------------------------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------------------------


def write_json_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Synthetic data: planted latent structure and power-law item popularity
# ---------------------------------------------------------------------------------------------


def generate_synthetic(
    path: Path,
    num_users: int,
    num_items: int,
    num_interactions: int,
    latent_dim: int,
    popularity_exponent: float,
    seed: int,
    affinity: float = 3.0,
    user_chunk: int = 2048,
) -> None:
    """Write a seeded implicit-feedback log as Parquet (user_id int64, item_id string, timestamp).

    Each user draws items without replacement from softmax(log popularity + affinity * u.v)
    (Gumbel top-k), where u, v are planted latent vectors: a dot-product model can learn the
    structure, a popularity ranking cannot. Raw ids are deliberately not contiguous: user ids
    are large integers, item ids are strings.
    """
    rng = np.random.default_rng(seed)
    user_vec = rng.standard_normal((num_users, latent_dim)).astype(np.float32) / latent_dim**0.25
    item_vec = rng.standard_normal((num_items, latent_dim)).astype(np.float32) / latent_dim**0.25
    log_pop = (-popularity_exponent * np.log(rng.permutation(num_items) + 1.0)).astype(np.float32)

    mean = num_interactions / num_users
    counts = rng.lognormal(mean=np.log(mean) - 0.5 * 0.6**2, sigma=0.6, size=num_users)
    counts = np.clip(np.rint(counts * num_interactions / counts.sum()), 2, num_items // 2).astype(np.int64)

    raw_user_ids = np.sort(rng.choice(10 * num_users + 1000, size=num_users, replace=False)).astype(np.int64) + 100_000
    users, items = [], []
    for start in range(0, num_users, user_chunk):
        stop = min(start + user_chunk, num_users)
        logits = log_pop + affinity * (user_vec[start:stop] @ item_vec.T)
        logits += rng.gumbel(size=logits.shape).astype(np.float32)
        k = int(counts[start:stop].max())
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        keep = np.arange(k)[None, :] < counts[start:stop, None]
        users.append(np.repeat(np.arange(start, stop), counts[start:stop]))
        items.append(top[keep])
    user_rows = np.concatenate(users)
    item_rows = np.concatenate(items)
    timestamps = rng.integers(1_600_000_000, 1_632_000_000, size=len(user_rows))
    item_names = np.array([f"item_{i:07d}" for i in range(num_items)], dtype=object)
    table = pa.table(
        {
            "user_id": pa.array(raw_user_ids[user_rows], pa.int64()),
            "item_id": pa.array(item_names[item_rows], pa.string()),
            "timestamp": pa.array(timestamps, pa.int64()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(table, path)


# ---------------------------------------------------------------------------------------------
# Reading and validating raw interactions
# ---------------------------------------------------------------------------------------------


def _id_type_ok(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def read_interactions(path: str, cfg: DataConfig) -> Tuple[pa.Table, Dict[str, int]]:
    """Read a Parquet file or directory into a table with columns user_id, item_id[, timestamp][, weight].

    Returns the table and the counts of dropped rows (null ids)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory (data.path)")
    try:
        dataset = ds.dataset(str(p), format="parquet", exclude_invalid_files=False)
        files = dataset.files
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{p}: cannot be read as Parquet: {e}") from None
    if not files:
        raise DataError(f"{p}: directory holds no Parquet files")
    schema = dataset.schema
    columns = {"user_id": cfg.user_column, "item_id": cfg.item_column}
    for role, col in columns.items():
        if col not in schema.names:
            raise DataError(f"{p}: missing {role} column {col!r} (has {schema.names}); set data.{role.split('_')[0]}_column")
        if not _id_type_ok(schema.field(col).type):
            raise DataError(f"{p}: column {col!r} has type {schema.field(col).type}; ids must be integers or strings")
    if cfg.timestamp_column and cfg.timestamp_column in schema.names:
        columns["timestamp"] = cfg.timestamp_column
    if cfg.weight_column:
        if cfg.weight_column not in schema.names:
            raise DataError(f"{p}: missing weight column {cfg.weight_column!r} (has {schema.names})")
        columns["weight"] = cfg.weight_column
    try:
        table = dataset.to_table(columns=list(columns.values()))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{p}: cannot be read as Parquet: {e}") from None
    table = table.rename_columns(list(columns.keys()))
    if "timestamp" in columns and pa.types.is_timestamp(table.schema.field("timestamp").type):
        table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                                 table.column("timestamp").cast(pa.int64()))
    for name in ("user_id", "item_id"):
        if pa.types.is_large_string(table.schema.field(name).type):
            table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(pa.string()))
    valid = pc.and_(pc.is_valid(table["user_id"]), pc.is_valid(table["item_id"]))
    n_null = len(table) - pc.sum(valid).as_py() if len(table) else 0
    if n_null:
        logger.warning("%s: dropped %d rows with a null user or item id", p, n_null)
        table = table.filter(valid)
    if len(table) == 0:
        raise DataError(f"{p}: no interactions (after dropping {n_null} rows with null ids)")
    return table, {"null_ids": int(n_null)}


def _drop_duplicates(table: pa.Table) -> Tuple[pa.Table, int]:
    """Keep the first occurrence (earliest timestamp when there is one) of each (user, item)."""
    n = len(table)
    if "timestamp" in table.column_names:
        table = table.sort_by([("timestamp", "ascending")])
    indexed = table.select(["user_id", "item_id"]).append_column("_row", pa.array(np.arange(len(table))))
    first = indexed.group_by(["user_id", "item_id"], use_threads=False).aggregate([("_row", "min")])
    keep = np.sort(first.column("_row_min").to_numpy())
    return table.take(keep), n - len(keep)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _split_random(table: pa.Table, fraction: float, seed: int) -> Tuple[pa.Table, pa.Table]:
    """Per-user random holdout: floor(n * fraction) of each user's interactions go to test."""
    codes = pc.dictionary_encode(table["user_id"]).combine_chunks().indices.to_numpy()
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(codes)), codes))
    sorted_codes = codes[order]
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(codes)) - starts[sorted_codes]
    is_test = np.zeros(len(codes), dtype=bool)
    is_test[order] = rank < np.floor(counts[sorted_codes] * fraction)
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


def _fingerprint(cfg: DataConfig) -> str:
    fields = dataclasses.asdict(cfg)
    fields.pop("root")
    for key in ("path", "test_path"):
        if fields[key]:
            p = Path(fields[key])
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            fields[key] = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    fields["version"] = PREPARED_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepared_dir(cfg: DataConfig) -> Path:
    stem = "synthetic" if cfg.name == "synthetic" else Path(cfg.path).name.split(".")[0] or "parquet"
    return Path(cfg.root) / f"{stem}-{_fingerprint(cfg)}"


def prepare(cfg: DataConfig) -> Path:
    """Prepare the dataset described by `cfg` (or reuse an identical earlier preparation)."""
    out = prepared_dir(cfg)
    if (out / "manifest.json").exists():
        logger.info("reusing prepared dataset %s", out)
        return out
    t0 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _prepare_into(cfg, tmp)
        manifest["prepare_s"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(manifest, tmp / "manifest.json")
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "manifest.json").exists():  # not a concurrent identical preparation
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("prepared dataset %s in %.1fs", out, time.perf_counter() - t0)
    return out


def _prepare_into(cfg: DataConfig, out: Path) -> dict:
    dropped: Dict[str, int] = {}
    if cfg.name == "synthetic":
        raw = out / "raw.parquet"
        generate_synthetic(raw, cfg.num_users, cfg.num_items, cfg.num_interactions, cfg.latent_dim,
                           cfg.popularity_exponent, cfg.seed, cfg.affinity)
        source = str(raw)
        table = pq.read_table(raw)
        raw.unlink()
        dropped["null_ids"] = 0
    else:
        source = cfg.path
        table, dropped = read_interactions(cfg.path, cfg)
    n_raw = len(table) + dropped["null_ids"]

    if cfg.split == "given":
        test, test_dropped = read_interactions(cfg.test_path, cfg)
        dropped["test_null_ids"] = test_dropped["null_ids"]
        for name in ("user_id", "item_id"):
            if table.schema.field(name).type != test.schema.field(name).type:
                raise DataError(f"{cfg.test_path}: column {name!r} has type {test.schema.field(name).type} "
                                f"but the train file {cfg.path} has {table.schema.field(name).type}")
        test = test.select([c for c in test.column_names if c in table.column_names])
        table = table.select([c for c in table.column_names if c in test.column_names])
        if cfg.duplicates == "drop":
            table, dropped["train_duplicates"] = _drop_duplicates(table)
            test, dropped["test_duplicates"] = _drop_duplicates(test)
        train = table
    else:
        if cfg.duplicates == "drop":
            table, dropped["duplicates"] = _drop_duplicates(table)
        if cfg.split == "random":
            train, test = _split_random(table, cfg.test_fraction, cfg.seed)
        else:
            train, test = _split_temporal(table, cfg.test_fraction, source)

    # Vocabularies from the training split: row i of an embedding table <-> vocab[i].
    users_vocab = pc.unique(train["user_id"]).sort()
    items_vocab = pc.unique(train["item_id"]).sort()
    train_rows = {
        "user": pc.index_in(train["user_id"], value_set=users_vocab),
        "item": pc.index_in(train["item_id"], value_set=items_vocab),
    }
    test_user = pc.index_in(test["user_id"], value_set=users_vocab)
    test_item = pc.index_in(test["item_id"], value_set=items_vocab)
    unseen_user = pc.is_null(test_user)
    unseen_item = pc.and_(pc.is_null(test_item), pc.invert(unseen_user))
    dropped["test_unseen_user"] = int(pc.sum(unseen_user).as_py() or 0)
    dropped["test_unseen_item"] = int(pc.sum(unseen_item).as_py() or 0)
    seen = pc.and_(pc.is_valid(test_user), pc.is_valid(test_item))
    for reason, count in dropped.items():
        if count:
            logger.warning("%s: dropped %d rows (%s)", source, count, reason.replace("_", " "))

    def rows_table(user, item, source_table, mask=None) -> pa.Table:
        cols = {"user": pc.cast(user, pa.int64()), "item": pc.cast(item, pa.int64())}
        for extra in ("timestamp", "weight"):
            if extra in source_table.column_names:
                cols[extra] = source_table[extra]
        t = pa.table(cols)
        return t.filter(mask) if mask is not None else t

    train_t = rows_table(train_rows["user"], train_rows["item"], train)
    test_t = rows_table(test_user, test_item, test, seen)
    if len(train_t) == 0:
        raise DataError(f"{source}: the training split is empty")
    if len(test_t) == 0:
        raise DataError(f"{source}: the test split is empty after dropping {dropped}")
    write_parquet_atomic(train_t, out / "train.parquet")
    write_parquet_atomic(test_t, out / "test.parquet")
    write_parquet_atomic(pa.table({"user_id": users_vocab}), out / "users.parquet")
    write_parquet_atomic(pa.table({"item_id": items_vocab}), out / "items.parquet")
    return {
        "version": PREPARED_VERSION,
        "source": source,
        "config": dataclasses.asdict(cfg),
        "split": cfg.split,
        "schema": {"user_id": str(users_vocab.type), "item_id": str(items_vocab.type),
                   "timestamp": "timestamp" in train_t.column_names, "weight": "weight" in train_t.column_names},
        "counts": {
            "raw_interactions": n_raw,
            "num_users": len(users_vocab),
            "num_items": len(items_vocab),
            "train_interactions": len(train_t),
            "test_interactions": len(test_t),
            "test_users": len(pc.unique(test_t["user"])),
        },
        "dropped": dropped,
    }


# ---------------------------------------------------------------------------------------------
# The prepared dataset in memory
# ---------------------------------------------------------------------------------------------


@dataclass
class CSR:
    """Per-user item lists: items of user rows[i] are indices[indptr[i]:indptr[i+1]]."""

    indptr: np.ndarray
    indices: np.ndarray

    @staticmethod
    def from_pairs(users: np.ndarray, items: np.ndarray, num_users: int) -> "CSR":
        order = np.lexsort((items, users))
        counts = np.bincount(users, minlength=num_users)
        return CSR(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items[order].astype(np.int64))

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)


@dataclass
class Dataset:
    path: Path
    num_users: int
    num_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray
    manifest: dict

    @staticmethod
    def load(path: Path) -> "Dataset":
        path = Path(path)
        manifest = json.loads((path / "manifest.json").read_text())
        train = pq.read_table(path / "train.parquet", columns=["user", "item"])
        test = pq.read_table(path / "test.parquet", columns=["user", "item"])
        return Dataset(
            path=path,
            num_users=manifest["counts"]["num_users"],
            num_items=manifest["counts"]["num_items"],
            train_users=train["user"].to_numpy(),
            train_items=train["item"].to_numpy(),
            test_users=test["user"].to_numpy(),
            test_items=test["item"].to_numpy(),
            manifest=manifest,
        )

    def train_csr(self) -> CSR:
        return CSR.from_pairs(self.train_users, self.train_items, self.num_users)

    def test_csr(self) -> CSR:
        return CSR.from_pairs(self.test_users, self.test_items, self.num_users)

    def item_counts(self) -> np.ndarray:
        return np.bincount(self.train_items, minlength=self.num_items)

    def vocab(self, which: str) -> pa.Array:
        """Raw ids of the embedding rows: ``which`` is ``users`` or ``items``."""
        column = {"users": "user_id", "items": "item_id"}[which]
        return pq.read_table(self.path / f"{which}.parquet")[column].combine_chunks()


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch(Pipelineable):
    """One rank's share of a step: B (user, item) positives and N uniform negative items.

    ``users`` holds the B user rows (feature ``user``), ``items`` the B positive item rows
    followed by the N negatives (feature ``item``); ``user_ids``/``item_ids`` are the same rows
    as dense tensors (the loss masks accidental hits with them)."""

    users: KeyedJaggedTensor
    items: KeyedJaggedTensor
    user_ids: torch.Tensor
    item_ids: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            users=self.users.to(device=device, non_blocking=non_blocking),
            items=self.items.to(device=device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device=device, non_blocking=non_blocking),
            item_ids=self.item_ids.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.users.record_stream(stream)
        self.items.record_stream(stream)
        self.user_ids.record_stream(stream)
        self.item_ids.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(self.users.pin_memory(), self.items.pin_memory(),
                     self.user_ids.pin_memory(), self.item_ids.pin_memory())


def ids_kjt(key: str, ids: torch.Tensor) -> KeyedJaggedTensor:
    """A KJT with one id per row (a single-hot feature), built without per-row Python."""
    return KeyedJaggedTensor(keys=[key], values=ids, lengths=torch.ones(len(ids), dtype=torch.int32))


def make_batch(users: np.ndarray, items: np.ndarray, negatives: np.ndarray) -> Batch:
    user_ids = torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64))
    item_ids = torch.from_numpy(np.concatenate([items, negatives]).astype(np.int64))
    return Batch(ids_kjt(USER_FEATURE, user_ids), ids_kjt(ITEM_FEATURE, item_ids), user_ids, item_ids)


class TrainBatches:
    """Shuffled training batches of one epoch for one rank.

    All ranks draw the same seeded permutation of the interactions (and the same uniform
    negatives) and each takes its slice of every global batch, so every rank yields the same
    number of batches and the step-t global batch does not depend on the world size. The last `num_interactions % global_batch`
    interactions of each epoch's permutation (a different set every epoch) are not used.
    """

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        num_items: int,
        global_batch: int,
        num_negatives: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        max_batches: Optional[int] = None,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} is not divisible by the world size {world_size}")
        if num_negatives % world_size:
            raise ValueError(f"loss.num_negatives={num_negatives} is not divisible by the world size {world_size}")
        self.users, self.items, self.num_items = users, items, num_items
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.local_negatives = num_negatives // world_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        n = len(users) // global_batch
        self.num_batches = n if max_batches is None else min(n, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.users))
        neg_rng = np.random.default_rng([self.seed, self.epoch, 1])
        n = self.local_negatives
        for step in range(self.num_batches):
            start = step * self.global_batch + self.rank * self.local_batch
            idx = perm[start : start + self.local_batch]
            negatives = neg_rng.integers(0, self.num_items, size=n * self.world_size)[self.rank * n : (self.rank + 1) * n]
            yield make_batch(self.users[idx], self.items[idx], negatives)
