"""Hashing raw ids: stable across files, ranks, processes and runs.

A 64-bit hash of each raw id (splitmix64's finaliser on integer ids, SipHash on the UTF-8 of
string ids) that does not depend on the file, the rank, the run or the batch. It gives the
streamed split (an interaction is test iff hash(user, item, seed) < test_fraction, so the repeats
of a pair land on one side) and, with ``data.id_mapping=hash``, the rows (hash(id, seed) mod the
table size; both preparations use the same function).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_MASK = (1 << 64) - 1
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_SIPHASH_KEY = "0123456789123456"  # SipHash's key for string ids (pandas' default, pinned here)
_ROWS, _SPLIT = 1, 2  # purposes of the seeded keys


def mix64(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """splitmix64's finaliser on uint64 (a bijection that scrambles every bit); a new array
    unless `inplace`."""
    x = x if inplace else x.copy()
    t = np.empty_like(x)
    for shift, mult in ((30, _C1), (27, _C2), (31, None)):
        np.right_shift(x, np.uint64(shift), out=t)
        x ^= t
        if mult is not None:
            x *= mult
    return x


def seeded_key(seed: int, purpose: int) -> np.uint64:
    """A 64-bit key for (seed, purpose)."""
    raw = (seed * 0x9E3779B97F4A7C15 + purpose * 0xD1B54A32D192ED03 + 0x2545F4914F6CDD1D) & _MASK
    return mix64(np.array([raw], dtype=np.uint64))[0]


def id_hash(ids) -> np.ndarray:
    """uint64 hash of each raw id (integer or string Arrow array, no nulls), seed-independent:
    integer ids through splitmix64 (int32 and int64 of one value agree), string ids through
    SipHash of their UTF-8 bytes (each distinct string of the batch hashed once)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if pa.types.is_integer(ids.type):
        return mix64(ids.cast(pa.int64()).to_numpy().view(np.uint64))  # a copy: Arrow's buffer stays
    encoded = pc.dictionary_encode(ids)
    strings = encoded.dictionary.to_numpy(zero_copy_only=False)
    hashes = mix64(pd.util.hash_array(strings, encoding="utf8", hash_key=_SIPHASH_KEY, categorize=False), True)
    return hashes[encoded.indices.to_numpy()]


def rows_from_hash(hashes: np.ndarray, seed: int, num_rows: int) -> np.ndarray:
    """Rows of ``data.id_mapping=hash``: hash(id, seed) mod num_rows (int64)."""
    x = mix64(hashes ^ seeded_key(seed, _ROWS), inplace=True)
    x %= np.uint64(num_rows)
    return x.view(np.int64)


def hash_rows(ids, seed: int, num_rows: int) -> np.ndarray:
    """The row of each raw id with ``data.id_mapping=hash`` (same id -> same row, in every file and run)."""
    return rows_from_hash(id_hash(ids), seed, num_rows)


def _pair_uniform(user_hash: np.ndarray, item_hash: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per (user, item) pair, seeded."""
    x = item_hash * _C2  # odd multiplier: a bijection, so (u, i) and (i, u) differ
    x ^= user_hash
    x ^= seeded_key(seed, _SPLIT)
    mix64(x, inplace=True)
    x >>= np.uint64(11)
    return x.astype(np.float64) * (1.0 / (1 << 53))


def split_masks(user_hash: np.ndarray, item_hash: np.ndarray, seed: int, test_fraction: float,
                valid_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """(is_test, is_valid) per row: test iff hash(user, item, seed) < test_fraction; validation iff
    a train row with hash(user, item, seed + 1) < valid_fraction. Every repeat of a pair falls
    on the same side."""
    is_test = _pair_uniform(user_hash, item_hash, seed) < test_fraction
    if valid_fraction <= 0:
        return is_test, np.zeros(len(is_test), dtype=bool)
    return is_test, ~is_test & (_pair_uniform(user_hash, item_hash, seed + 1) < valid_fraction)


def collision_stats(rows: np.ndarray) -> Dict[str, float]:
    """Collisions of hashed rows, one row per distinct id: ``collision_rate`` = 1 - rows_used /
    distinct_ids (the share of ids that do not get a row of their own); ``ids_sharing_a_row``:
    the ids whose row holds another id too."""
    used, counts = np.unique(rows, return_counts=True)
    n = len(rows)
    return {"distinct_ids": int(n), "rows_used": int(len(used)),
            "collision_rate": float(1.0 - len(used) / n) if n else 0.0,
            "ids_sharing_a_row": int(counts[counts > 1].sum())}
