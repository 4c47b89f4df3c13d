"""Evaluation sets: what each evaluated user has in training (masked) and in test (relevant).

The evaluated users are those with test (or validation) items, or a seeded sample of at most
``eval.max_users`` of them (``sample_eval_users``: the same on every rank and every run). Each
rank keeps the sets of its own users among them (``recsys.distributed.owned_share``). The sets are
``ItemSets``: a CSR over all user rows for in-memory data (``CSRSets``) or, for streamed data,
the sets of the wanted users only, read in one pass over the prepared Parquet files
(``load_split_sets``) and kept as a CSR of unique pairs or a packed bitmap, whichever is smaller.
``EvalSplit`` bundles what one evaluation ranks; ``EvalSets`` the test and validation splits a
data source gives (``recsys.data.source``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys.data.dataset import CSR, gather_rows_csr
from recsys.data.features import Features
from recsys.data.readers import DataError

logger = logging.getLogger(__name__)

EVAL_SAMPLE_SEED = 0
"""Seed of the sample of evaluated users (``eval.max_users``): fixed, so that runs with different
training seeds or configurations are evaluated on the same users."""


# ---------------------------------------------------------------------------------------------
# The evaluated users
# ---------------------------------------------------------------------------------------------


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique of an integer array by a sort (numpy 2.4's np.unique is ~50x slower on 1M int64)."""
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def sample_eval_users(users: np.ndarray, max_users: int, seed: int = EVAL_SAMPLE_SEED) -> np.ndarray:
    """The evaluated users: all of `users` (the user rows that have test items) when there are at
    most `max_users` of them or `max_users` is 0, else a uniform sample of `max_users` of them
    without replacement drawn with `seed`. Sorted; the same on every rank and every run."""
    users = _sorted_unique(np.asarray(users, dtype=np.int64))
    if max_users <= 0 or len(users) <= max_users:
        return users
    return np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))


def eval_users(test_counts: np.ndarray, max_users: int, seed: int = EVAL_SAMPLE_SEED) -> np.ndarray:
    """`sample_eval_users` of the rows whose test count (``test_counts[row]``, e.g. a prepared
    streaming dataset's ``test_user_counts.npy``) is positive."""
    return sample_eval_users(np.flatnonzero(np.asarray(test_counts) > 0), max_users, seed)


def sampled_users(counts: np.ndarray, max_users: int, split: str) -> Tuple[np.ndarray, int]:
    """The evaluated users of a split (``eval_users``: all those with items in it, or a seeded
    sample of ``max_users`` of them, logged) and how many have items in it."""
    users, of = eval_users(counts, max_users), int(np.count_nonzero(counts))
    if len(users) < of:
        logger.info("evaluating %d of %d %s users (eval.max_users)", len(users), of, split)
    return users, of


# ---------------------------------------------------------------------------------------------
# Item sets: what is masked (training items) and what is relevant (test items)
# ---------------------------------------------------------------------------------------------


class CSRSets:
    """Per-user item sets as a CSR: row ``i`` of `csr` holds the items of user row ``users[i]``
    (`users` sorted; None: row i is user row i, e.g. ``Dataset.test_csr()``). Items are kept as
    given (a repeated pair counts twice in `counts`, as in the in-memory data)."""

    def __init__(self, csr: CSR, num_items: int, users: Optional[np.ndarray] = None) -> None:
        self.csr = csr
        self.num_items = num_items
        self.users = users

    def _slots(self, users: np.ndarray) -> np.ndarray:
        if self.users is None:
            return users
        return _slots_of(self.users, users)

    def counts(self, users: np.ndarray) -> np.ndarray:
        """Items per user (0 for a user without items)."""
        slots = self._slots(users)
        return (self.csr.indptr[slots + 1] - self.csr.indptr[slots]).astype(np.int64)

    def users_with_items(self) -> np.ndarray:
        """The user rows with at least one item, sorted."""
        rows = np.flatnonzero(self.csr.counts() > 0)
        return rows if self.users is None else self.users[rows]

    def pairs(self, users: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(position in `users`, item) of the users' items, items ascending per user (as stored)."""
        lengths, items = gather_rows_csr(self.csr, self._slots(users))
        return np.repeat(np.arange(len(users)), lengths), items.astype(np.int64, copy=False)

    def nbytes(self) -> int:
        return int(self.csr.indptr.nbytes + self.csr.indices.nbytes)


class BitmapSets:
    """Per-user item sets as a packed bitmap: bit ``item`` (little-endian within each byte) of row
    ``i`` of `bits` (``len(users) x ceil(num_items / 8)`` bytes) is set when user row
    ``users[i]`` has the item. Used for dense sets, where it is smaller than a CSR."""

    def __init__(self, bits: np.ndarray, num_items: int, users: np.ndarray) -> None:
        self.bits = bits
        self.num_items = num_items
        self.users = users
        self._counts = np.bitwise_count(bits).sum(axis=1, dtype=np.int64) if len(bits) else np.zeros(0, np.int64)

    def counts(self, users: np.ndarray) -> np.ndarray:
        return self._counts[_slots_of(self.users, users)]

    def users_with_items(self) -> np.ndarray:
        return self.users[self._counts > 0]

    def dense(self, users: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Boolean ``len(users) x (stop - start)``: which of items start..stop-1 each user has."""
        rows = self.bits[_slots_of(self.users, users), start // 8 : -(-stop // 8)]
        unpacked = np.unpackbits(rows, axis=1, bitorder="little")
        offset = start % 8
        return unpacked[:, offset : offset + stop - start].view(bool)

    def pairs(self, users: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        pos, items = np.nonzero(self.dense(users, 0, self.num_items))
        return pos, items.astype(np.int64)

    def nbytes(self) -> int:
        return int(self.bits.nbytes)


ItemSets = Union[CSRSets, BitmapSets]
"""The interface `ranking_metric_sums` uses: ``counts(users)``, ``pairs(users)``,
``users_with_items()`` (plus ``dense`` for bitmaps, to mask without listing pairs)."""


def _slots_of(covered: np.ndarray, users: np.ndarray) -> np.ndarray:
    slots = np.searchsorted(covered, users)
    if len(users) and (slots.max() >= len(covered) or not np.array_equal(covered[slots], users)):
        missing = users[(slots >= len(covered)) | (covered[np.minimum(slots, len(covered) - 1)] != users)]
        raise ValueError(f"item sets: {len(missing)} user rows are not covered by these sets (the first: "
                         f"{int(missing[0])}); build them for the evaluated users")
    return slots


def as_item_sets(sets: Union[CSR, CSRSets, BitmapSets], num_items: int) -> ItemSets:
    """A CSR over all user rows (the in-memory data) as item sets; item sets unchanged."""
    return CSRSets(sets, num_items) if isinstance(sets, CSR) else sets


class _SetBuilder:
    """Unique (slot, item) pairs of some users, collected batch by batch in memory bounded by the
    final sets: a sorted array of unique keys (slot * num_items + item) merged with the pending
    ones whenever they outnumber it, switched to a packed bitmap as soon as the CSR it would
    make is larger than the bitmap (then each pair just sets its bit)."""

    def __init__(self, users: np.ndarray, num_items: int) -> None:
        self.users, self.num_items = users, num_items
        self.row_bytes = -(-num_items // 8)
        self.bitmap_bytes = len(users) * self.row_bytes
        self.unique = np.zeros(0, dtype=np.int64)
        self.pending: List[np.ndarray] = []
        self.num_pending = 0
        self.bits: Optional[np.ndarray] = None
        self.rows = 0

    def _csr_bytes(self, pairs: int) -> int:
        return pairs * (4 if self.num_items < 2**31 else 8) + 8 * (len(self.users) + 1)

    def add(self, slots: np.ndarray, items: np.ndarray) -> None:
        self.rows += len(slots)
        if self.bits is not None:
            np.bitwise_or.at(self.bits.reshape(-1), slots * self.row_bytes + (items >> 3),
                             np.left_shift(1, items & 7).astype(np.uint8))
            return
        self.pending.append(slots * self.num_items + items)
        self.num_pending += len(slots)
        if self.num_pending > max(len(self.unique), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        self.unique = _sorted_unique(np.concatenate([self.unique, *self.pending]))
        self.pending, self.num_pending = [], 0
        if self._csr_bytes(len(self.unique)) > self.bitmap_bytes:
            keys, self.unique = self.unique, np.zeros(0, dtype=np.int64)
            self.bits = np.zeros((len(self.users), self.row_bytes), dtype=np.uint8)
            slots, items = np.divmod(keys, self.num_items)
            np.bitwise_or.at(self.bits.reshape(-1), slots * self.row_bytes + (items >> 3),
                             np.left_shift(1, items & 7).astype(np.uint8))

    def finish(self) -> ItemSets:
        if self.bits is None:
            self._merge()
        if self.bits is not None:
            return BitmapSets(self.bits, self.num_items, self.users)
        slots, items = np.divmod(self.unique, self.num_items)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(slots, minlength=len(self.users)))]).astype(np.int64)
        dtype = np.int32 if self.num_items < 2**31 else np.int64
        return CSRSets(CSR(indptr, items.astype(dtype)), self.num_items, self.users)


def load_eval_sets(prepared_dir, users: np.ndarray, split: str = "test",
                   progress: Optional[bool] = None) -> Tuple[ItemSets, ItemSets]:
    """(masked, relevant) item sets of `users` from a streaming prepared dataset, for
    `ranking_metric_sums`: ``split="test"``: every training row (``train/``, validation rows
    included) and the ``test/`` rows; ``split="valid"``: the training rows not held out for
    validation and the held-out ones (``valid`` column of ``train/``). ``load_split_sets`` of
    one split."""
    return load_split_sets(prepared_dir, {split: users}, progress)[split]


def load_split_sets(prepared_dir, users: Dict[str, np.ndarray], progress: Optional[bool] = None,
                    cold_items: Optional[np.ndarray] = None) -> Dict[str, Tuple[ItemSets, ItemSets]]:
    """``load_eval_sets`` of several splits at once: `users` maps ``test`` and / or ``valid`` to
    their evaluated users; each split gets its (masked, relevant) item sets.

    Reads each Parquet row group once (one pass over ``train/`` for all the splits, one over
    ``test/`` for the test split), keeps the rows of each split's users (a boolean lookup by user
    row) and removes repeated pairs. Each set is a CSR of unique pairs or a packed bitmap,
    whichever is smaller: memory is bounded by the users' distinct pairs (and by users x items
    bits), not by the number of interactions. Under torchrun, pass this rank's `owned_share` of
    the evaluated users. A progress bar per pass unless `progress` is False (None: on a terminal).
    The split ``cold`` is the test split restricted to the items of `cold_items` (bool per item row)."""
    root = Path(prepared_dir)
    if not (root / "manifest.json").is_file():
        raise DataError(f"{root}: no manifest.json (not a complete prepared dataset)")
    manifest = json.loads((root / "manifest.json").read_text())
    num_users, num_items = int(manifest["counts"]["num_users"]), int(manifest["counts"]["num_items"])
    splits = {}  # split -> (its users, sorted; which user rows are wanted; mask builder; relevant builder)
    for split, wanted_users in users.items():
        if split not in ("test", "valid", "cold") or split == "cold" and cold_items is None:
            raise ValueError(f"load_eval_sets: split must be test, valid or cold (with cold_items), got {split!r}")
        wanted_users = _sorted_unique(np.asarray(wanted_users, dtype=np.int64))
        if len(wanted_users) and (wanted_users[0] < 0 or wanted_users[-1] >= num_users):
            raise ValueError(f"load_eval_sets: user rows must be in [0, {num_users}), got "
                             f"{wanted_users[0]}..{wanted_users[-1]}")
        wanted = np.zeros(num_users, dtype=bool)
        wanted[wanted_users] = True
        splits[split] = (wanted_users, wanted, _SetBuilder(wanted_users, num_items),
                         _SetBuilder(wanted_users, num_items))
    sources = [("train", ["user", "item"] + (["valid"] if "valid" in splits else []))]
    if "test" in splits or "cold" in splits:
        sources.append(("test", ["user", "item"]))
    for part, columns in sources:
        files = sorted((root / part).glob("*.parquet"))
        if not files:
            raise DataError(f"{root / part}: no Parquet files (is {root} a streaming prepared dataset?)")
        meta = [pq.ParquetFile(f) for f in files]
        with tqdm(total=sum(m.metadata.num_rows for m in meta), unit=" rows", unit_scale=True,
                  desc=f"eval sets: {part}", disable=None if progress is None else not progress) as bar:
            for path, pf in zip(files, meta):
                missing = [c for c in columns if c not in pf.schema_arrow.names]
                if missing:
                    raise DataError(f"{path}: column {missing[0]!r} is missing (has {pf.schema_arrow.names})")
                for group in range(pf.num_row_groups):
                    table = pf.read_row_group(group, columns=columns)
                    u = table["user"].to_numpy().astype(np.int64, copy=False)
                    i = table["item"].to_numpy().astype(np.int64, copy=False)
                    for name, values, limit in (("user", u, num_users), ("item", i, num_items)):
                        if len(values) and (values.min() < 0 or values.max() >= limit):
                            raise DataError(f"{path}, row group {group}: column {name!r} has rows outside "
                                            f"[0, {limit}) (manifest counts)")
                    for split, (wanted_users, wanted, mask, relevant) in splits.items():
                        if part == "test" and split == "valid":
                            continue
                        keep = wanted[u]
                        if part == "test" and split == "cold":
                            keep &= cold_items[i]
                        slots = np.searchsorted(wanted_users, u[keep])
                        if part == "test":
                            relevant.add(slots, i[keep])
                        elif split == "valid":
                            held = table["valid"].to_numpy(zero_copy_only=False)[keep]
                            mask.add(slots[~held], i[keep][~held])
                            relevant.add(slots[held], i[keep][held])
                        else:
                            mask.add(slots, i[keep])
                    bar.update(len(u))
    out = {}
    for split, (wanted_users, _, mask, relevant) in splits.items():
        out[split] = mask.finish(), relevant.finish()
        for name, builder, sets in (("masked", mask, out[split][0]), ("relevant", relevant, out[split][1])):
            logger.info("eval sets (%s, %d users): %s: %d rows of these users, %d unique pairs, kept as %s (%.1f MB)",
                        split, len(wanted_users), name, builder.rows, int(sets.counts(wanted_users).sum()),
                        type(sets).__name__, sets.nbytes() / 2**20)
    return out


# ---------------------------------------------------------------------------------------------
# What one evaluation ranks, and the splits of a data source
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalSplit:
    """What one evaluation ranks: the evaluated users, the model's inputs for them, the items
    masked when ranking (their known interactions) and the relevant ones."""

    users: np.ndarray
    """The evaluated user rows, sorted, the same on every rank (each rank scores its own:
    ``recsys.distributed.owned_share``)."""
    num_users: int
    """Rows of the user table (which users are a rank's own)."""
    num_items: int
    """Items ranked: all of them."""
    features: Features
    """The model's inputs (the validation split: histories without the holdout)."""
    masked: Union[CSR, "ItemSets"]
    """Items never ranked for a user: a CSR over all user rows, or sets covering this rank's own users."""
    relevant: Union[CSR, "ItemSets"]
    """The items to find: the same kinds."""
    missing: Optional[np.ndarray] = None
    """Test: per user row, the test interactions whose item has no vector (dropped by the
    preparation; never found): the figure over all test interactions counts them as misses.
    None: not known (a dataset prepared before it was counted)."""
    users_without_vectors: int = 0
    """Test: users with test interactions none of which has a vector (unseen users included)."""
    users_of: int = 0
    """Users with relevant items (the evaluated users are all of them or a sample)."""


def all_test_scale(split: EvalSplit) -> float:
    """The factor that turns the mean over the evaluated users of the ``all_`` figures into the
    mean over every user with test interactions: users_of / (users_of + users_without_vectors)
    (those users score 0; with a sample of users, the sample's mean stands for the users_of)."""
    return split.users_of / max(split.users_of + split.users_without_vectors, 1)


@dataclass
class EvalSets:
    """The evaluation splits of a data source (``DataSource.eval_sets``)."""

    test: EvalSplit
    """Test: histories and masks of the whole training split, the test items relevant."""
    valid: Optional[EvalSplit] = None
    """Validation (model selection): histories and masks without the holdout, the holdout
    relevant; None without a validation split."""
    cold: Optional[EvalSplit] = None
    """With item side features: the test interactions whose item has no training interaction
    (its vector from its features alone; ``data.split=cold_items``), ranked against all items;
    None when there are none."""
    info: Dict[str, int] = field(default_factory=dict)
    """``eval_users`` (evaluated test users) and ``eval_users_of`` (test users there are)."""
