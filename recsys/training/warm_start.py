"""Warm start with a grown vocabulary (``train.warm_start``): a run on a new dataset whose id tables
start from an earlier run's trained rows (daily retraining).

An id known to both runs keeps its trained row, mapped through both vocabularies: old row -> raw
id (the old run's prepared dataset) -> new row (this dataset). New ids keep the usual
initialisation; old ids the new dataset no longer has are counted. With hashed ids
(``data.id_mapping=hash``, on either side) a new row gets the mean of its ids' old vectors.
Every id-keyed table the two models share is carried: ``user`` and ``item``, and a two_tower's
``history`` (rows are items) and ``item_history`` (rows are users). With ``optimizer`` the fused
table optimizer's per-row state (row-wise Adagrad's ``momentum1``) of the carried rows comes too.
The old weights are the ones the old run tested and exported (its best validated epoch's when it
kept one); its optimizer state is always its last step's.

Design: (b) of the project's guide, a staging directory. No rank holds the world:

1. Each rank loads its own row share (``recsys.distributed.own_rows``) of every old table, and of
   its optimizer state, straight from the old DCP checkpoint into a row-wise ``ShardedTensor``
   made here (DCP reshards whatever plan wrote it; the old model is not built, so neither is its
   planner, its data or its loss), reads the raw ids of those rows from the old prepared dataset
   (``id_rows``, a row group at a time) and writes (raw id, vector[, momentum]) as one Parquet
   part into ``<run_dir>/.warm-start/<table>/``. It also counts which of its old ids the new
   dataset no longer has (streaming the new vocabulary), so the figures need no gather of ids.
2. After all ranks have written, each rank fills its own shards of the new tables with the
   matching code of the pre-trained vectors (``recsys.data.vectors.vectors_for``: the parts are
   streamed a row group at a time and only this rank's matches are kept;
   ``recsys.training.pretrained`` averages and writes them).
3. Rank 0 removes the staging directory (renamed away first, then deleted; a directory left by a
   killed run is removed at the next start). Each step ends with every rank learning whether any
   rank failed, so an error stops every rank alike and nothing is left behind.

Chosen over (a), an all-to-all of (new row, vector) pairs, because it reuses the tested matching
and hashed-id averaging of ``model.pretrained_*`` unchanged and needs no exchange of variable-size
buffers between ranks (every rank's memory is its old share and its own matches); the cost is
that every rank reads the staged parts (the old tables' size, once per rank), as every rank reads
a whole vector file for ``model.pretrained_*``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from recsys.config import ConfigError
from recsys.data.dataset import id_rows
from recsys.data.source import DataSource
from recsys.data.vectors import id_kind, ids_present, vectors_for
from recsys.distributed import all_gather_objects, rank_and_world, rank_bounds
from recsys.errors import CheckpointError, RecsysError
from recsys.parallelize import local_blocks, table_weights
from recsys.training.checkpoint import (SafeFileSystemReader, TensorOnlyLoadPlanner, read_meta,
                                        resolve_checkpoint)
from recsys.training.pretrained import counted_once, local_ids, row_means, write_rows

logger = logging.getLogger("recsys.train")

OPTION = "train.warm_start"
STAGING = ".warm-start"
"""The staging directory under the new run directory."""
TABLE_IDS = {"user": "users", "item": "items", "history": "items", "item_history": "users"}
"""Id-keyed table -> whose ids its rows are (the prepared dataset's ``users`` / ``items``)."""
ID_COLUMNS = {"users": "user_id", "items": "item_id"}
MOMENTUM = "momentum1"
"""Row-wise Adagrad's per-row state, as TorchRec names it (``<table>.momentum1``)."""


@dataclass
class OldTable:
    """A table of the old run to carry: its shape and where the checkpoint holds it."""

    name: str
    rows: int
    dim: int
    weight_key: str
    weight_dtype: torch.dtype
    momentum_key: Optional[str] = None
    momentum_copies: int = 1
    """Rows of momentum per table row: a column-wise sharded table keeps one per column shard
    (their mean is the state of the whole row)."""


@dataclass
class OldRun:
    """The old run as the warm start reads it: its checkpoint, prepared dataset and tables."""

    checkpoint: Path
    data_path: Path
    tables: List[OldTable] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    """Tables of only one of the two models (not carried), in words."""


def _fail(path: Any, reason: str) -> ConfigError:
    return ConfigError(f"{OPTION}={path}: {reason}")


def read_old_run(path: Path, model_name: str, tables: Dict[str, List], new_data: Path, optimizer: bool) -> OldRun:
    """Check the old run at `path` (a run directory or one of its checkpoints) against the model
    built now (`model_name`, `tables`: ``table_shapes``) and the new dataset at `new_data`: a
    complete checkpoint, the same model name, the same dims, its prepared dataset still there with
    ids of the same kind, and the optimizer state when `optimizer`. One-line ``ConfigError``
    naming the option otherwise. No communication."""
    try:
        ckpt = resolve_checkpoint(Path(path))
        meta = read_meta(ckpt)
    except CheckpointError as e:
        raise _fail(path, f"no complete checkpoint to start from ({e})") from None
    saved = meta.get("model") or {}
    if saved.get("name") != model_name:
        raise _fail(path, f"the old run's model.name={saved.get('name')}, this run's {model_name}: "
                          "a warm start carries the tables of the same model")
    data_path = Path((meta.get("data") or {}).get("path") or "")
    old_tables = saved.get("tables") or {}
    try:
        index = SafeFileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    except Exception as e:
        raise _fail(path, f"checkpoint {ckpt}: unreadable index ({type(e).__name__}: {e})") from None
    prefix = "best." if meta.get("has_best") else "model."  # the weights the old run tested and exported
    run = OldRun(ckpt, data_path)
    for name in sorted(set(old_tables) | set(tables)):
        if name not in TABLE_IDS:
            continue
        if name not in tables or name not in old_tables:
            run.skipped.append(f"{name} ({'only the old run' if name in old_tables else 'only this run'} has it)")
            continue
        rows, dim = int(old_tables[name][0]), int(old_tables[name][1])
        if dim != tables[name][1]:
            raise _fail(path, f"table {name} has dimension {dim} there and {tables[name][1]} here "
                              "(model.embedding_dim must match)")
        weight_key = next((k for k in index if k.startswith(prefix) and k.endswith(f"embedding_bags.{name}.weight")),
                          None)
        if weight_key is None:
            raise _fail(path, f"checkpoint {ckpt} holds no weights of table {name}")
        table = OldTable(name, rows, dim, weight_key, index[weight_key].properties.dtype)
        if optimizer:
            key = next((k for k in index if k.startswith("optim.state.")
                        and k.endswith(f"embedding_bags.{name}.weight.{name}.{MOMENTUM}")), None)
            if key is None:
                raise _fail(path, f"train.warm_start_optimizer=true but checkpoint {ckpt} holds no row-wise "
                                  f"optimizer state of table {name} (its optim.name was not rowwise_adagrad?)")
            size = int(index[key].size[0])
            if size % rows or len(index[key].size) != 1:
                raise _fail(path, f"checkpoint {ckpt}: the optimizer state of table {name} has shape "
                                  f"{list(index[key].size)}, not a multiple of its {rows} rows")
            table.momentum_key, table.momentum_copies = key, size // rows
        run.tables.append(table)
    for which in sorted({TABLE_IDS[t.name] for t in run.tables}):
        old_file, new_file = data_path / f"{which}.parquet", Path(new_data) / f"{which}.parquet"
        if not old_file.is_file():
            raise _fail(path, f"the old run's prepared dataset {data_path} has no {which}.parquet (moved or "
                              "removed?): its vocabulary maps the old rows to raw ids")
        column = ID_COLUMNS[which]
        old_type = pq.read_schema(old_file).field(column).type
        new_type = pq.read_schema(new_file).field(column).type
        if id_kind(old_type) != id_kind(new_type):
            raise _fail(path, f"the old run's {which} ids are {old_type}, this dataset's {new_type}: they "
                              "cannot be matched")
    if not run.tables:
        raise _fail(path, "the two models share no id table")
    return run


def _row_share(rows: int, width: int, copies: int, dtype: torch.dtype) -> ShardedTensor:
    """A ShardedTensor of `copies` x `rows` rows (of `width` columns; 0: a vector) on the CPUs, each
    rank holding its own rows (``rank_bounds``) of every copy: what DCP loads this rank's share into."""
    rank, world = rank_and_world()
    bounds = rank_bounds(rows, world)
    tail = [width] if width else []
    metas, local = [], []
    for r in range(world):
        lo, hi = int(bounds[r]), int(bounds[r + 1])
        if hi == lo:
            continue
        for j in range(copies):
            meta = ShardMetadata(shard_offsets=[j * rows + lo] + [0] * len(tail), shard_sizes=[hi - lo] + tail,
                                 placement=f"rank:{r}/cpu")
            metas.append(meta)
            if r == rank:
                local.append(Shard(torch.empty([hi - lo] + tail, dtype=dtype), meta))
    properties = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                                  memory_format=torch.contiguous_format, pin_memory=False)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, ShardedTensorMetadata(metas, torch.Size([rows * copies] + tail), properties))


def _load_shares(run: OldRun) -> Dict[str, Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
    """This rank's rows of every old table (and their momentum), loaded from the checkpoint:
    {table: (first row, weights float32 [n, dim], momentum float32 [n] or None)}. Collective."""
    state: Dict[str, ShardedTensor] = {}
    for t in run.tables:
        state[t.weight_key] = _row_share(t.rows, t.dim, 1, t.weight_dtype)
        if t.momentum_key:
            state[t.momentum_key] = _row_share(t.rows, 0, t.momentum_copies, torch.float32)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(run.checkpoint)), planner=TensorOnlyLoadPlanner())
    except (Exception, dcp.CheckpointException) as e:
        first = str(e).strip().splitlines()
        raise _fail(run.checkpoint, f"its tables cannot be read ({type(e).__name__}: {first[-1] if first else ''})"
                    ) from None
    rank, world = rank_and_world()
    out = {}
    for t in run.tables:
        shards = state[t.weight_key].local_shards()
        lo = int(rank_bounds(t.rows, world)[rank])
        if not shards:
            out[t.name] = (lo, torch.zeros(0, t.dim), None if not t.momentum_key else torch.zeros(0))
            continue
        weights = shards[0].tensor.float()
        momentum = None
        if t.momentum_key:  # the copies of a column-wise table's state: their mean
            copies = [s.tensor for s in state[t.momentum_key].local_shards()]
            momentum = torch.stack(copies).double().mean(0).float() if len(copies) > 1 else copies[0]
        out[t.name] = (lo, weights, momentum)
    return out


def _together(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank, then every rank learns whether any rank failed: the failing rank
    raises its own error, the others the first rank's (a ``RecsysError`` as it is). Collective."""
    value, error = None, None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    told = all_gather_objects(None if error is None else
                              (error if isinstance(error, RecsysError) else None, f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    for rank, item in enumerate(told):
        if item is not None:
            raise item[0] if item[0] is not None else RuntimeError(f"warm start failed on rank {rank}: {item[1]}")
    return value


def _remove(path: Path) -> None:
    """Remove a directory at once (renamed away, then deleted)."""
    if path.exists():
        gone = path.with_name(path.name + ".removing")
        shutil.rmtree(gone, ignore_errors=True)
        os.rename(path, gone)
        shutil.rmtree(gone, ignore_errors=True)
    shutil.rmtree(path.with_name(path.name + ".removing"), ignore_errors=True)


def _stage(run: OldRun, staging: Path, new_data: Path) -> Dict[str, Tuple[int, int]]:
    """Write this rank's old rows as (raw id, vector[, momentum]) parts; {table: (old ids here,
    of them gone from the new dataset)}."""
    rank = rank_and_world()[0]
    shares = _load_shares(run)
    counts = {}
    for t in run.tables:
        lo, weights, momentum = shares[t.name]
        which = TABLE_IDS[t.name]
        column = ID_COLUMNS[which]
        ids, rows = id_rows(run.data_path, which, lo, lo + len(weights))
        values = weights.numpy()[rows - lo]
        if momentum is not None:
            values = np.concatenate([values, momentum.numpy()[rows - lo][:, None]], axis=1)
        width = t.dim + (1 if t.momentum_key else 0)
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
        directory = staging / t.name
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({column: ids, "vector": pa.FixedSizeListArray.from_arrays(flat, width)}),
                       directory / f"part-{rank:05d}.parquet", row_group_size=65_536)
        # ids distinct within a share (one id per vocabulary row; a hashed id has one row)
        present = ids_present(new_data / f"{which}.parquet", column, ids)
        counts[t.name] = (len(ids), int((~present).sum()))
    return counts


def _momentum_blocks(optimizer, table: str, rows: int) -> List[tuple]:
    """This rank's blocks of table `table`'s row-wise optimizer state in the (new) optimizer:
    (tensor, first row, rows); a column shard's state covers all rows of its shard."""
    for key, value in optimizer.state_dict()["state"].items():
        if key.endswith(f"embedding_bags.{table}.weight") and f"{table}.{MOMENTUM}" in value:
            state = value[f"{table}.{MOMENTUM}"]
            if isinstance(state, ShardedTensor):
                return [(s.tensor, s.metadata.shard_offsets[0] % rows, s.metadata.shard_sizes[0])
                        for s in state.local_shards()]
            if torch.is_tensor(state) and state.dim() == 1 and len(state) == rows:
                return [(state, 0, rows)]
            raise ConfigError(f"train.warm_start_optimizer: the optimizer state of table {table} is a "
                              f"{type(state).__name__}, which the warm start cannot write")
    raise ConfigError(f"train.warm_start_optimizer=true but this run's table optimizer keeps no row-wise state "
                      f"of table {table} (optim.name must be rowwise_adagrad)")


@torch.no_grad()
def _fill(model: torch.nn.Module, optimizer, data: DataSource, run: OldRun, staging: Path) -> Dict[str, Tuple]:
    """Each rank's new shards from the staged parts; {table: (rows carried, rows counted)}."""
    weights = table_weights(model)
    out = {}
    for t in run.tables:
        which = TABLE_IDS[t.name]
        shards = local_blocks(weights[t.name])
        wanted, all_rows = local_ids(data, which, shards)
        width = t.dim + (1 if t.momentum_key else 0)
        found = vectors_for(staging / t.name, wanted, width, ID_COLUMNS[which])
        rows_hit, means = row_means(all_rows[found.positions], found.vectors)
        write_rows(shards, rows_hit, means[:, : t.dim])
        if t.momentum_key and shards:  # (a rank holding no shard of the table holds none of its state)
            new_rows = weights[t.name].size(0)
            for tensor, r0, nr in _momentum_blocks(optimizer, t.name, new_rows):
                here = (rows_hit >= r0) & (rows_hit < r0 + nr)
                if here.any():
                    index = torch.from_numpy(rows_hit[here] - r0).to(tensor.device)
                    tensor[index] = torch.from_numpy(means[here][:, t.dim]).to(device=tensor.device,
                                                                                dtype=tensor.dtype)
        counted, rows_counted = counted_once(shards)
        out[t.name] = (counted(rows_hit), rows_counted)
    return out


def init_warm_start(model: torch.nn.Module, optimizer, data: DataSource, path: Path, model_name: str,
                    tables: Dict[str, List], run_dir: Path, with_optimizer: bool) -> Dict[str, Any]:
    """Start the (sharded) model's id tables, and with `with_optimizer` its fused optimizer's
    row-wise state, from the old run at `path` (see the module docstring). `tables`: the model's
    ``table_shapes``; `run_dir`: the new run's directory (the staging directory goes there).
    Collective. Returns the figures (all ranks'), by table."""
    run = _together(lambda: read_old_run(Path(path), model_name, tables, Path(data.path), with_optimizer))
    rank = rank_and_world()[0]
    staging = Path(run_dir) / STAGING
    try:
        _together(lambda: _remove(staging) if rank == 0 else None)  # a killed run's leftovers
        staged = _together(lambda: _stage(run, staging, Path(data.path)))
        filled = _together(lambda: _fill(model, optimizer, data, run, staging))
    finally:
        if rank == 0:  # every rank is past its reads (or failed): nothing reads the parts any more
            _remove(staging)
    parts = all_gather_objects((staged, filled))
    figures: Dict[str, Any] = {"from": str(run.checkpoint), "optimizer": bool(with_optimizer), "tables": {}}
    for t in run.tables:
        carried = sum(p[1][t.name][0] for p in parts)
        rows = sum(p[1][t.name][1] for p in parts)
        old_ids = sum(p[0][t.name][0] for p in parts)
        gone = sum(p[0][t.name][1] for p in parts)
        figures["tables"][t.name] = {"rows": rows, "rows_carried": carried, "rows_new": rows - carried,
                                     "old_rows": t.rows, "old_ids": old_ids, "old_ids_gone": gone}
        logger.info("warm start %s: %d of %d rows carried from %s, %d new; %d of the old run's %d ids are gone%s",
                    t.name, carried, rows, run.checkpoint, rows - carried, gone, old_ids,
                    " (with their optimizer state)" if t.momentum_key else "")
    for line in run.skipped:
        logger.info("warm start: table %s, not carried", line)
    return figures
