"""Synthetic interaction logs with planted structure: what the demo, the tests and the benchmarks train on.

One generative model for every size (``generate_stream``): a seeded event log (with repeats,
which the preparation handles like any source's: ``data.duplicates``) written as Parquet row
groups, in memory O(items + one row group) whatever the number of rows. Crossing
``data.stream_min_rows`` changes how the prepared rows are read, never the data.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys.data.hashing import mix64, seeded_key

GROUPS_PER_FILE = 16
"""Row groups per Parquet part file (the streamed raw log and the streaming preparation)."""


# ---------------------------------------------------------------------------------------------
# An event log in row groups
# ---------------------------------------------------------------------------------------------

GEN_CHUNK = 1 << 18
"""Rows generated (and written as one row group) at a time; fixed so the data do not depend on it."""
_FAVOURITES = (0.6, 0.3, 0.1)  # how a user's personal share divides over their 3 favourite clusters
_ACTIVITY = 1.25  # user index = floor(U * u ** _ACTIVITY): the lower indices are more active


def _coprime_step(n: int) -> int:
    """A multiplier coprime with n near n / golden ratio: i -> (a * i) mod n permutes [0, n)."""
    a = max(1, int(n * 0.6180339887)) | 1
    while math.gcd(a, n) != 1:
        a += 2
    return a


class _InverseCdf:
    """``np.searchsorted(keys, q, side="right")`` for sorted `keys` and queries in [lo, hi), by a
    guide table (the cutpoint method): each of `cells` equal cells of [lo, hi) points at the
    answer for its start, from which a vectorised forward scan finishes (a step or two on
    average): two memory accesses per query instead of a binary search's log2(len(keys))."""

    def __init__(self, keys: np.ndarray, lo: float, hi: float, cells: int) -> None:
        self.keys = np.append(keys, np.inf)  # the scan stops at the end
        self.lo, self.scale, self.cells = lo, cells / (hi - lo), cells
        starts = lo + (np.arange(cells) - 1e-6) / self.scale  # a hair early: the scan only moves forward
        self.guide = np.searchsorted(keys, starts, side="right")

    def __call__(self, q: np.ndarray) -> np.ndarray:
        cell = np.clip(((q - self.lo) * self.scale).astype(np.int64), 0, self.cells - 1)
        pos = self.guide[cell]
        todo = np.flatnonzero(self.keys[pos] <= q)
        while len(todo):
            pos[todo] += 1
            todo = todo[self.keys[pos[todo]] <= q[todo]]
        return pos


def generate_stream(path: Path, num_users: int, num_items: int, num_interactions: int, latent_dim: int,
                    popularity_exponent: float, affinity: float, seed: int, chunk_rows: int = GEN_CHUNK,
                    chunks_per_file: int = GROUPS_PER_FILE, progress: Optional[bool] = None) -> int:
    """Write a seeded synthetic event log of exactly ``num_interactions`` rows into the directory
    ``path`` (``part-00000.parquet``, ...; columns ``user_id`` int64, ``item_id`` int64,
    ``timestamp`` int64, rows in time order), one row group of ``chunk_rows`` rows at a time;
    memory O(num_items + chunk_rows), whatever the number of rows. Returns the number of rows.

    The planted structure: items fall in ``4 * latent_dim`` clusters (round robin over a seeded
    permutation) and have Zipf popularity (``popularity_exponent``); each user has three
    favourite clusters (a seeded hash of the user) and takes an item from them with probability
    affinity / (1 + affinity) (0.6 / 0.3 / 0.1 among the three, the item by popularity within
    the cluster), else an item by global popularity. A dot-product model can learn the clusters;
    popularity alone cannot. Users are drawn with skewed activity; raw ids are not contiguous.
    Sampling with replacement (an event log): a user may take an item several times.
    The directory is written under a temporary name and renamed when complete."""
    path = Path(path)
    rng = np.random.default_rng([seed, 0])
    num_clusters = max(1, min(4 * latent_dim, num_items))
    cluster = rng.permutation(num_items) % num_clusters  # every cluster has an item
    weight = (rng.permutation(num_items) + 1.0) ** -popularity_exponent
    order = np.argsort(cluster, kind="stable")  # items grouped by cluster
    sorted_cluster = cluster[order]
    cum = np.cumsum(weight[order])
    starts = np.searchsorted(sorted_cluster, np.arange(num_clusters))
    before = np.concatenate([[0.0], cum])[starts][sorted_cluster]  # cumulative weight before the cluster
    totals = np.bincount(sorted_cluster, weights=weight[order], minlength=num_clusters)[sorted_cluster]
    cluster_key = sorted_cluster + (cum - before) / totals  # in (c, c + 1] within cluster c
    last = np.r_[sorted_cluster[1:] != sorted_cluster[:-1], True]
    cluster_key[last] = sorted_cluster[last] + 1.0
    global_cdf = np.cumsum(weight) / weight.sum()
    in_cluster = _InverseCdf(cluster_key, 0.0, float(num_clusters), num_items)
    by_popularity = _InverseCdf(global_cdf, 0.0, 1.0, num_items)
    personal = affinity / (1.0 + affinity)
    component_cdf = np.cumsum([personal * f for f in _FAVOURITES])
    favourite_keys = np.array([seeded_key(seed, 100 + j) for j in range(len(_FAVOURITES))], dtype=np.uint64)
    user_step = _coprime_step(num_users)

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    num_chunks = -(-num_interactions // chunk_rows)
    writer = None
    try:
        with tqdm(total=num_interactions, unit=" rows", unit_scale=True, desc="synthetic log", disable=progress
                  if progress is None else not progress) as bar:
            for k in range(num_chunks):
                if k % chunks_per_file == 0:
                    if writer is not None:
                        writer.close()
                    writer = pq.ParquetWriter(tmp / f"part-{k // chunks_per_file:05d}.parquet", schema,
                                              compression="none", use_dictionary=False)  # read once: write fast
                start, stop = k * chunk_rows, min((k + 1) * chunk_rows, num_interactions)
                n = stop - start
                crng = np.random.default_rng([seed, 1, k])
                draws = crng.random((3, n))
                index = np.minimum((num_users * draws[0] ** _ACTIVITY).astype(np.int64), num_users - 1)
                user = (index * user_step) % num_users  # activity not tied to the id order
                component = np.searchsorted(component_cdf, draws[1], side="right")
                personal_rows = component < len(_FAVOURITES)
                item = np.empty(n, dtype=np.int64)
                u_hash = mix64(user[personal_rows].view(np.uint64), inplace=True)
                u_hash ^= favourite_keys[component[personal_rows]]
                fav = mix64(u_hash, inplace=True) % np.uint64(num_clusters)
                pos = in_cluster(fav.astype(np.float64) + draws[2][personal_rows])
                item[personal_rows] = order[np.minimum(pos, num_items - 1)]
                item[~personal_rows] = np.minimum(by_popularity(draws[2][~personal_rows]), num_items - 1)
                table = pa.table({
                    "user_id": 1_000_000_000 + (user * 2654435761) % (1 << 31),
                    "item_id": 7_000_000_000 + (item * 2246822519) % (1 << 31),
                    "timestamp": 1_600_000_000 + (np.arange(start, stop) * 32_000_000) // max(num_interactions, 1),
                }, schema=schema)
                writer.write_table(table, row_group_size=chunk_rows)
                bar.update(n)
        if writer is not None:
            writer.close()
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return num_interactions
