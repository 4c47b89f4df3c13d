"""Pre-trained vectors: the id tables' rows start from given vectors (``model.pretrained_items``,
``model.pretrained_users``).

Each rank fills its own shards: it asks the dataset for the raw ids of its shards' rows
(``DataSource.id_rows``, a range of the vocabulary), reads the vector file for those ids only
(``recsys.data.vectors.vectors_for``: a row group at a time) and writes the matched rows in
place; unmatched rows keep the initialisation they had. With hashed ids (several ids per row)
a row gets the mean of its ids' vectors. The match rate is summed over ranks (each row counted
once, by the shard holding its first columns), logged and returned for metrics.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recsys.config import ModelConfig
from recsys.data.source import DataSource
from recsys.data.vectors import vectors_for
from recsys.distributed import all_gather_objects
from recsys.parallelize import table_weights

logger = logging.getLogger("recsys.train")

TABLES = {"items": ("item", "item_id"), "users": ("user", "user_id")}
"""which -> (the id table's name in the model, the id column of a recsys export)."""


@torch.no_grad()
def init_pretrained(model: torch.nn.Module, data: DataSource, which: str, path: Path) -> Dict:
    """Write the vectors of the file at `path` into the ``which`` (``items`` / ``users``) id table of
    a (sharded) model, each rank its own shards. Collective. Returns the figures (all ranks')."""
    table, export_column = TABLES[which]
    weight = table_weights(model)[table]
    dim = weight.size(1)
    if isinstance(weight, ShardedTensor):
        shards = [(s.tensor, s.metadata.shard_offsets, s.metadata.shard_sizes) for s in weight.local_shards()]
    else:
        shards = [(weight, (0, 0), tuple(weight.size()))]
    matched = rows_counted = file_rows = repeated = 0
    if not shards:  # no rows here, but the same checks of the file as every rank (errors raised everywhere)
        file_rows = vectors_for(Path(path), data.id_rows(which, 0, 0)[0], dim, export_column).file_rows
    for tensor, (r0, c0), (nr, nc) in shards:
        ids, rows = data.id_rows(which, r0, r0 + nr)
        found = vectors_for(Path(path), ids, dim, export_column)
        file_rows, repeated = found.file_rows, repeated + found.repeated
        local = rows[found.positions] - r0
        sums = np.zeros((nr, dim), dtype=np.float64)
        np.add.at(sums, local, found.vectors)
        counts = np.bincount(local, minlength=nr)
        hit = np.flatnonzero(counts)
        values = (sums[hit] / counts[hit, None])[:, c0 : c0 + nc]
        if len(hit):
            index = torch.from_numpy(hit).to(tensor.device)
            tensor[index] = torch.from_numpy(values).to(device=tensor.device, dtype=tensor.dtype)
        if c0 == 0:  # each row once, whatever the column split
            matched += len(hit)
            rows_counted += nr
    parts = all_gather_objects((matched, rows_counted, repeated, file_rows))  # a rank may hold no shard
    total_matched, total_rows = sum(p[0] for p in parts), sum(p[1] for p in parts)
    figures = {"path": str(path), "rows": total_rows, "rows_matched": total_matched,
               "match_rate": round(total_matched / max(total_rows, 1), 6), "file_rows": max(p[3] for p in parts),
               "repeated_ids": sum(p[2] for p in parts)}
    logger.info("pre-trained %s: %d of %d rows (%.1f%%) start from the %d vectors of %s%s", which, total_matched,
                total_rows, 100 * figures["match_rate"], figures["file_rows"], path,
                f" ({figures['repeated_ids']} ids given more than once: the first vector used)"
                if figures["repeated_ids"] else "")
    return figures


def init_all_pretrained(model: torch.nn.Module, data: DataSource, mc: ModelConfig) -> Optional[Dict]:
    """``model.pretrained_items`` / ``pretrained_users`` into the model's id tables; their figures
    (None when neither is set). Collective."""
    out = {}
    for which, path in (("items", mc.pretrained_items), ("users", mc.pretrained_users)):
        if path:
            out[which] = init_pretrained(model, data, which, Path(path))
    return out or None
