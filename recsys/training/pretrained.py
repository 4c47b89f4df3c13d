"""Pre-trained vectors: the id tables' rows start from given vectors (``model.pretrained_items``,
``model.pretrained_users``).

Each rank fills its own shards: it asks the dataset for the raw ids of its shards' rows
(``DataSource.id_rows``, a range of the vocabulary), reads the vector file for those ids only
(``recsys.data.vectors.vectors_for``: a row group at a time) and writes the matched rows in
place; unmatched rows keep the initialisation they had. With hashed ids (several ids per row)
a row gets the mean of its ids' vectors. The match rate is summed over ranks (each row counted
once, by the shard holding its first columns), logged and returned for metrics.json.

Frozen (``model.pretrained_frozen``): the vectors go into the table of their own
(``<table>_pretrained``, of the file's dimension; ``recsys.model.FrozenPretrained``) instead, its
unmatched rows zero, and the matched rows of the id table start at zero, so that a matched id
starts exactly from its mapped vector and an unmatched one from its usual id row. Each rank
writes the blocks it holds of either table (the two may be sharded differently).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import torch

from recsys.config import ModelConfig
from recsys.data.source import DataSource
from recsys.data.vectors import vector_dim, vector_files, vectors_for
from recsys.errors import DataError
from recsys.distributed import all_gather_objects
from recsys.parallelize import local_blocks, table_weights

logger = logging.getLogger("recsys.train")

TABLES = {"items": ("item", "item_id"), "users": ("user", "user_id")}
"""which -> (the id table's name in the model, the id column of a recsys export)."""
FROZEN_SUFFIX = "_pretrained"
"""The frozen table of id table ``item`` is ``item_pretrained`` (``recsys.model.FrozenPretrained``)."""


def pretrained_dims(mc: ModelConfig) -> Dict[str, int]:
    """The dimension of each frozen pre-trained table the model of `mc` has (``{"item": P, ...}``;
    none unless ``model.pretrained_frozen``), read from the vector files' schema or first vector:
    every rank reads it before the model is built. Without ``pretrained_frozen`` a file whose
    vectors are not of ``model.embedding_dim`` is refused (a one-line ``DataError``)."""
    dims = {}
    for which, path in (("items", mc.pretrained_items), ("users", mc.pretrained_users)):
        if not path:
            continue
        table, export_column = TABLES[which]
        dim = vector_dim(Path(path), export_column)
        if mc.pretrained_frozen:
            if dim is None:
                raise DataError(f"{path}: no vectors, so no dimension for the frozen table of "
                                f"model.pretrained_{which} (model.pretrained_frozen=true)")
            dims[table] = dim
        elif dim is not None and dim != mc.embedding_dim:
            raise DataError(f"{vector_files(Path(path))[0]}: column 'vector' has vectors of length {dim} but "
                            f"model.embedding_dim is {mc.embedding_dim} (model.pretrained_{which}): set "
                            "model.pretrained_frozen=true for a trained linear map")
    return dims


def frozen_dims_of(tables: Dict[str, list]) -> Dict[str, int]:
    """The frozen tables' dimensions of a model whose tables are `tables` (``table_shapes``, as a
    checkpoint records them): what ``pretrained_dims`` read from the files when it was trained."""
    return {name[: -len(FROZEN_SUFFIX)]: int(shape[1]) for name, shape in tables.items()
            if name.endswith(FROZEN_SUFFIX)}


def _disjoint(ranges) -> list:
    """Row ranges (first, count) merged into disjoint ones (two tables' shards may overlap)."""
    out: list = []
    for r0, nr in sorted(ranges):
        if out and r0 <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], r0 + nr - out[-1][0]))
        elif nr:
            out.append((r0, nr))
    return out


def local_ids(data: DataSource, which: str, shards: List[tuple]) -> Tuple[pa.Array, np.ndarray]:
    """(raw ids, their table rows) of the rows of this rank's `shards` (``local_blocks``) of a
    ``which`` (``users`` / ``items``) table: column shards of one row range share it, read once
    (the shards of two tables, sharded apart, may overlap: their ranges are merged)."""
    ranges = _disjoint({(r0, nr) for _, (r0, _), (nr, _) in shards})
    id_parts, row_parts = [], []
    for r0, nr in ranges:
        ids, rows = data.id_rows(which, r0, r0 + nr)
        id_parts.append(ids)
        row_parts.append(rows)
    if not id_parts:
        return data.id_rows(which, 0, 0)[0], np.zeros(0, dtype=np.int64)
    return pa.concat_arrays(id_parts), np.concatenate(row_parts)


def row_means(target: np.ndarray, vectors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(distinct rows, the mean of their vectors, float64): `vectors[k]` goes to row `target[k]`
    (hashed ids: several ids per row, averaged)."""
    rows_hit, inverse = np.unique(target, return_inverse=True)
    means = np.zeros((len(rows_hit), vectors.shape[1]), dtype=np.float64)
    np.add.at(means, inverse, vectors)
    means /= np.bincount(inverse, minlength=len(rows_hit))[:, None]
    return rows_hit, means


def write_rows(shards: List[tuple], rows: np.ndarray, values: np.ndarray) -> None:
    """Write `values` (one full-width row each) into the table rows `rows` of this rank's `shards`."""
    for tensor, (r0, c0), (nr, nc) in shards:
        here = (rows >= r0) & (rows < r0 + nr)
        if here.any():
            index = torch.from_numpy(rows[here] - r0).to(tensor.device)
            tensor[index] = torch.from_numpy(values[here][:, c0 : c0 + nc]).to(device=tensor.device,
                                                                               dtype=tensor.dtype)


def counted_once(shards: List[tuple]):
    """(count(rows), rows of the ranges counted): the rows of `rows` that this rank counts, each row
    counted once over ranks, by the shard holding its first columns (column shards repeat rows)."""
    firsts = sorted({(r0, nr) for _, (r0, c0), (nr, _) in shards if c0 == 0})

    def count(rows: np.ndarray) -> int:
        return int(sum(((rows >= r0) & (rows < r0 + nr)).sum() for r0, nr in firsts))

    return count, sum(nr for _, nr in firsts)


@torch.no_grad()
def init_pretrained(model: torch.nn.Module, data: DataSource, which: str, path: Path, frozen: bool = False) -> Dict:
    """Write the vectors of the file at `path` into the ``which`` (``items`` / ``users``) id table of
    a (sharded) model, each rank its own shards; `frozen`: into its frozen pre-trained table, the
    matched id rows zeroed (module docstring). Collective. Returns the figures (all ranks')."""
    table, export_column = TABLES[which]
    weights = table_weights(model)
    weight = weights[table + FROZEN_SUFFIX if frozen else table]  # where the vectors go
    dim = weight.size(1)
    shards = local_blocks(weight)
    id_shards = local_blocks(weights[table]) if frozen else []  # frozen: the matched id rows are zeroed
    wanted, all_rows = local_ids(data, which, shards + id_shards)
    # every rank reads the whole file (no rows here too): a bad file fails on every rank alike
    found = vectors_for(Path(path), wanted, dim, export_column)
    rows_hit, means = row_means(all_rows[found.positions], found.vectors)
    if frozen:  # unmatched ids: a zero pre-trained row, the map adds nothing
        for tensor, _, _ in shards:
            tensor.zero_()
    write_rows(shards, rows_hit, means)
    for tensor, (r0, _), (nr, _) in id_shards:  # frozen: matched ids start from their mapped vector alone
        here = (rows_hit >= r0) & (rows_hit < r0 + nr)
        if here.any():
            tensor[torch.from_numpy(rows_hit[here] - r0).to(tensor.device)] = 0
    counted, rows_counted = counted_once(shards)
    matched, file_rows, repeated = counted(rows_hit), found.file_rows, counted(all_rows[found.repeated])
    parts = all_gather_objects((matched, rows_counted, repeated, file_rows))  # a rank may hold no shard
    total_matched, total_rows = sum(p[0] for p in parts), sum(p[1] for p in parts)
    figures = {"path": str(path), "rows": total_rows, "rows_matched": total_matched,
               "match_rate": round(total_matched / max(total_rows, 1), 6), "file_rows": max(p[3] for p in parts),
               "repeated_ids": sum(p[2] for p in parts), "dim": dim, "frozen": frozen}
    logger.info("pre-trained %s: %d of %d rows (%.1f%%) start from the %d vectors of %s%s%s", which, total_matched,
                total_rows, 100 * figures["match_rate"], figures["file_rows"], path,
                f" (frozen, dimension {dim}, under a trained linear map)" if frozen else "",
                f" ({figures['repeated_ids']} ids given more than once: the first vector used)"
                if figures["repeated_ids"] else "")
    return figures


def init_all_pretrained(model: torch.nn.Module, data: DataSource, mc: ModelConfig) -> Optional[Dict]:
    """``model.pretrained_items`` / ``pretrained_users`` into the model's id tables (or their frozen
    tables, ``model.pretrained_frozen``); their figures (None when neither is set). Collective."""
    out = {}
    for which, path in (("items", mc.pretrained_items), ("users", mc.pretrained_users)):
        if path:
            out[which] = init_pretrained(model, data, which, Path(path), mc.pretrained_frozen)
    return out or None
