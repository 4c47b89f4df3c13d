"""A prepared dataset in memory (``data.loader=memory``): rows, not raw ids.

``Dataset.load`` reads a prepared dataset (``recsys.data.layout``) whole: every training
interaction in time order (the prepared order when there are no timestamps) with its validation
flag, the test interactions, the manifest. ``CSR``
holds per-row lists (each user's items; each item's users). ``id_rows`` maps table rows back to
raw ids for both layouts (what the export writes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


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


def gather_rows_csr(csr: CSR, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(lengths, concatenated values) of the given CSR rows, vectorised."""
    starts, stops = csr.indptr[rows], csr.indptr[rows + 1]
    lengths = stops - starts
    total = int(lengths.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return lengths, csr.indices[np.repeat(starts, lengths) + offsets]


def _grouped(keys: np.ndarray, values: np.ndarray, num_rows: int, max_len: int, keep_last: bool) -> CSR:
    """CSR of `values` grouped by `keys` (their given order kept within a row), each row cut to
    its last (`keep_last`) or first `max_len` values (0: all)."""
    order = np.argsort(keys, kind="stable")
    values = values[order]
    counts = np.bincount(keys, minlength=num_rows)
    if max_len > 0:
        pos = np.arange(len(values)) - np.repeat(np.cumsum(counts) - counts, counts)
        values = values[pos >= np.repeat(counts, counts) - max_len] if keep_last else values[pos < max_len]
        counts = np.minimum(counts, max_len)
    return CSR(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), values.astype(np.int64))


@dataclass
class Dataset:
    """A prepared dataset in memory (rows, not raw ids).

    ``train_*`` hold every training interaction in time order (by timestamp when the data has
    one, else in file order); ``valid`` marks the ones held out for model selection (all False
    without ``data.valid_fraction``). The model trains on the others (``fit_pairs``)."""

    path: Path
    num_users: int
    num_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    valid: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray
    manifest: dict

    @staticmethod
    def load(path: Path) -> "Dataset":
        path = Path(path)
        manifest = json.loads((path / "manifest.json").read_text())
        train = _read_parts(path / "train")
        if "timestamp" in train.column_names:
            train = train.take(np.argsort(train["timestamp"].to_numpy(), kind="stable"))
        test = _read_parts(path / "test", columns=["user", "item"])
        valid = (train["valid"].to_numpy(zero_copy_only=False) if "valid" in train.column_names
                 else np.zeros(len(train), dtype=bool))
        return Dataset(
            path=path,
            num_users=manifest["counts"]["num_users"],
            num_items=manifest["counts"]["num_items"],
            train_users=train["user"].to_numpy(),
            train_items=train["item"].to_numpy(),
            valid=valid,
            test_users=test["user"].to_numpy(),
            test_items=test["item"].to_numpy(),
            manifest=manifest,
        )

    @property
    def has_valid(self) -> bool:
        return bool(self.valid.any())

    def fit_pairs(self) -> Tuple[np.ndarray, np.ndarray]:
        """(users, items) the model trains on: the training split less the validation holdout."""
        keep = ~self.valid
        return self.train_users[keep], self.train_items[keep]

    def train_csr(self, include_valid: bool = True) -> CSR:
        """Known interactions to mask when ranking (the test: all; the validation: fit only)."""
        if include_valid:
            return CSR.from_pairs(self.train_users, self.train_items, self.num_users)
        return CSR.from_pairs(*self.fit_pairs(), self.num_users)

    def valid_csr(self) -> CSR:
        return CSR.from_pairs(self.train_users[self.valid], self.train_items[self.valid], self.num_users)

    def test_csr(self) -> CSR:
        return CSR.from_pairs(self.test_users, self.test_items, self.num_users)

    def history(self, include_valid: bool, max_len: int = 0) -> CSR:
        """Each user's training items in time order, the most recent `max_len` (0: all)."""
        keep = np.ones(len(self.valid), dtype=bool) if include_valid else ~self.valid
        return _grouped(self.train_users[keep], self.train_items[keep], self.num_users, max_len, keep_last=True)

    def item_history(self, include_valid: bool, max_len: int = 0, seed: int = 0) -> CSR:
        """Each item's users (a fixed seeded random `max_len` of them when capped; 0: all)."""
        keep = np.ones(len(self.valid), dtype=bool) if include_valid else ~self.valid
        items, users = self.train_items[keep], self.train_users[keep]
        key = np.random.default_rng(seed).random(len(items)) if max_len > 0 else users
        order = np.argsort(key, kind="stable")  # random (capped) or user order within each item
        return _grouped(items[order], users[order], self.num_items, max_len, keep_last=False)

    def item_counts(self, include_valid: bool = True) -> np.ndarray:
        items = self.train_items if include_valid else self.fit_pairs()[1]
        return np.bincount(items, minlength=self.num_items)

    def vocab(self, which: str) -> pa.Array:
        """Raw ids of the embedding rows: ``which`` is ``users`` or ``items``. Not with
        ``data.id_mapping=hash`` (a row may hold several ids, or none): use ``id_rows``."""
        if self.manifest.get("id_mapping") == "hash":
            raise ValueError(f"{self.path}: data.id_mapping=hash has no row -> id vocabulary; use id_rows({which!r})")
        return id_rows(self.path, which)[0]

    def id_rows(self, which: str, lo: int = 0, hi: Optional[int] = None) -> Tuple[pa.Array, np.ndarray]:
        """(raw ids, their rows) of ``users`` or ``items``, table rows [lo, hi) (see ``id_rows``)."""
        return id_rows(self.path, which, lo, hi)


def _read_parts(directory: Path, columns: Optional[list] = None) -> pa.Table:
    """The Parquet parts of a prepared directory (``train/``, ``test/``) in order, as one table."""
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{directory}: no part-*.parquet files (not a prepared dataset of this version?)")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def id_rows(path: Path, which: str, lo: int = 0, hi: Optional[int] = None) -> Tuple[pa.Array, np.ndarray]:
    """(raw ids, their embedding rows) of a prepared dataset (either layout), ``which`` being
    ``users`` or ``items``, for the table rows [lo, hi) (None: to the end), sorted by row: vocab /
    identity: every row and its id; hash: every raw id seen in training whose hashed row is in
    the range (rows may repeat, or have no id). The vector of raw id ids[k] is row rows[k] of the
    table. Reads the file a row group at a time and keeps the range only: each rank of an export
    holds the ids of its own rows."""
    column = {"users": "user_id", "items": "item_id"}[which]
    pf = pq.ParquetFile(Path(path) / f"{which}.parquet")
    hashed = "row" in pf.schema_arrow.names
    hi = np.iinfo(np.int64).max if hi is None else hi
    ids, rows, start = [], [], 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        if hashed or (start < hi and start + n > lo):
            table = pf.read_row_group(group, columns=[column] + (["row"] if hashed else []))
            r = table["row"].to_numpy().astype(np.int64) if hashed else np.arange(start, start + n, dtype=np.int64)
            keep = (r >= lo) & (r < hi)
            ids.append(table[column].combine_chunks().filter(pa.array(keep)))
            rows.append(r[keep])
        start += n
    out_ids = pa.concat_arrays(ids) if ids else pa.array([], type=pf.schema_arrow.field(column).type)
    out_rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    if hashed:
        order = np.argsort(out_rows, kind="stable")
        out_ids, out_rows = out_ids.take(pa.array(order)), out_rows[order]
    return out_ids, out_rows
