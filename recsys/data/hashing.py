"""Integer arithmetic on raw ids that every engine computes identically.

The preparation runs on DuckDB or on Spark (``recsys.data.steps``); both must give the same
split and the same hashed rows. Each engine's own hash function differs, so none is used: a raw
id first becomes a non-negative integer *code* (an integer id is itself; a string id is the
first 60 bits of the MD5 of its UTF-8 bytes, a function both engines and Python share), and
everything else is arithmetic modulo the prime P = 2^31 - 1 on codes, with every intermediate
product below 2^62 (no overflow in a 64-bit signed integer, which DuckDB refuses and Spark's ANSI
mode refuses too):

    mix(x)            = ((x mod P)^2 mod P * 1103515245 + 12345) mod P
    split_key(u, i, s) = mix(mix(mix(r(u) + S(s)) + r(i)))        r(x) = x mod P (non-negative)
    cold_item_key(i, s) = mix(mix(r(i) + S3(s)))                   (data.split=cold_items)
    hash_row(x, s, N)  = (mix(mix(r(x) + S1(s)) + q(x)) * P + mix(mix(q(x) + S2(s)) + r(x))) mod N
                         q(x) = floor(x / P) mod P: the code's next 31 bits

``split_key`` orders each user's interactions for the per-user random holdout (and the rows of
the prepared training files); ``hash_row`` is ``data.id_mapping=hash``. This module is the
Python reference of those SQL expressions (tests compare the engines to it; a serving system
can hash a new id without an engine). ``mix64`` and ``seeded_key`` seed the synthetic generator.
"""

from __future__ import annotations

import hashlib
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

P = 2_147_483_647
"""The prime modulus (2^31 - 1): products of two residues stay below 2^62."""
_A, _B = 1_103_515_245, 12_345
_MASK = (1 << 64) - 1
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def seed_term(seed: int, purpose: int) -> int:
    """The residue that seeds one use (purpose 0: the split key, 1 and 2: hashed rows) of `seed`."""
    return (seed * 40_503 + purpose * 69_069 + 1) % P


def mix(x: np.ndarray) -> np.ndarray:
    """mix(x) on int64 arrays (or Python ints), exactly as the SQL of ``recsys.data.steps``."""
    r = x % P
    return (r * r % P * _A + _B) % P


def id_codes(ids) -> np.ndarray:
    """The non-negative-or-integer code of each raw id (Arrow array, no nulls): an integer id is
    itself (int64); a string id is the first 60 bits of the MD5 of its UTF-8 bytes."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if pa.types.is_integer(ids.type):
        return ids.cast(pa.int64()).to_numpy().copy()
    encoded = pc.dictionary_encode(ids)
    strings = encoded.dictionary.to_pylist()
    codes = np.fromiter((int(hashlib.md5(s.encode()).hexdigest()[:15], 16) for s in strings), np.int64, len(strings))
    return codes[encoded.indices.to_numpy()]


def _residues(codes: np.ndarray):
    codes = np.asarray(codes, dtype=np.int64)
    r = codes % P  # numpy's % is non-negative for a positive modulus, like ((x % P) + P) % P in SQL
    q = (codes // P) % P  # numpy's // floors
    return r, q


def split_key(user_codes: np.ndarray, item_codes: np.ndarray, seed: int) -> np.ndarray:
    """The seeded pseudo-random key of each (user, item) pair (int64 in [0, P))."""
    ru, _ = _residues(user_codes)
    ri, _ = _residues(item_codes)
    return mix(mix(mix(ru + seed_term(seed, 0)) + ri))


def cold_item_key(ids, seed: int) -> np.ndarray:
    """``data.split=cold_items``: an item is held out when this key, in [0, P), is below
    floor(test_fraction * P): mix(mix(r(code) + S3(seed))) of its code."""
    return mix(mix(id_codes(ids) % P + seed_term(seed, 3)))


def oov_rows(ids, first_row: int, buckets: int, seed: int) -> np.ndarray:
    """``data.oov_buckets``: the table row of ids that have no row of their own (rare in training,
    or never seen: a serving system's new ids): one of the `buckets` OOV rows from `first_row`
    (a prepared manifest's ``oov`` entry gives the three numbers)."""
    return first_row + rows_from_codes(id_codes(ids), seed, buckets)


def hash_rows(ids, seed: int, num_rows: int) -> np.ndarray:
    """The row of each raw id with ``data.id_mapping=hash`` (same id -> same row, in every engine,
    file and run)."""
    return rows_from_codes(id_codes(ids), seed, num_rows)


def rows_from_codes(codes: np.ndarray, seed: int, num_rows: int) -> np.ndarray:
    r, q = _residues(codes)
    hi = mix(mix(r + seed_term(seed, 1)) + q)
    lo = mix(mix(q + seed_term(seed, 2)) + r)
    return (hi * P + lo) % num_rows


def mix64(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """splitmix64's finaliser on uint64 (a bijection that scrambles every bit); a new array
    unless `inplace`. (The synthetic generator's hash; not used by the preparation.)"""
    x = x if inplace else x.copy()
    t = np.empty_like(x)
    for shift, mult in ((30, _C1), (27, _C2), (31, None)):
        np.right_shift(x, np.uint64(shift), out=t)
        x ^= t
        if mult is not None:
            x *= mult
    return x


def seeded_key(seed: int, purpose: int) -> np.uint64:
    """A 64-bit key for (seed, purpose) (the synthetic generator's)."""
    raw = (seed * 0x9E3779B97F4A7C15 + purpose * 0xD1B54A32D192ED03 + 0x2545F4914F6CDD1D) & _MASK
    return mix64(np.array([raw], dtype=np.uint64))[0]


def collision_stats(rows: np.ndarray) -> Dict[str, float]:
    """Collisions of hashed rows, one row per distinct id: ``collision_rate`` = 1 - rows_used /
    distinct_ids (the share of ids that do not get a row of their own); ``ids_sharing_a_row``:
    the ids whose row holds another id too."""
    used, counts = np.unique(rows, return_counts=True)
    n = len(rows)
    return {"distinct_ids": int(n), "rows_used": int(len(used)),
            "collision_rate": float(1.0 - len(used) / n) if n else 0.0,
            "ids_sharing_a_row": int(counts[counts > 1].sum())}
