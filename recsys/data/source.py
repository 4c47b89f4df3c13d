"""Data sources: a prepared dataset as training, evaluation and export read it, whichever loader.

``open_source`` opens a prepared directory with the loader asked for and returns a
``DataSource``; training, the end of a run (``recsys.finish``) and the checkpoint readers use only
this interface, never asking which loader they have:

- sizes and counts: ``num_users``, ``num_items``, ``num_fit`` (training interactions less the
  validation holdout), ``has_valid``, ``manifest``; ``fit_item_counts()`` (logQ),
  ``item_counts()`` (popularity), ``user_counts()``, ``steps_per_epoch(global_batch)``;
- ``id_rows(which, lo, hi)``: the raw id of each table row of a range (what a rank exports);
- ``features(include_valid, training)``: the model's inputs (the bags of its ``FeatureSpec``, and
  the side features); ``side``: the side features (``data.item_features`` / ``user_features``),
  ``side_tables()`` their tables' names and sizes, for the model; ``negative_rows()``: the item
  rows uniform negatives are drawn from (None: all);
- ``eval_sets(max_users, progress)``: the test and validation ``EvalSets`` of this rank's share
  of the evaluated users (all with test / validation items, or a seeded sample of ``max_users``);
- ``batches(options, epoch, skip, max_batches)``: an epoch's training batches from the (skip+1)-th;
- ``pairs(include_valid, lo, hi)``: the training pairs of the users [lo, hi), for the closed form
  (each rank reads its own users').

``InMemorySource`` (``data.loader=memory``) holds the whole dataset in every rank's memory;
``StreamedSource`` (``data.loader=stream``) streams row groups and holds nothing that grows with
the number of interactions. How the two differ in what they can do is a property, not a type:
``order_depends_on_world_size`` (a streamed epoch's order does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Protocol, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import ConfigError
from recsys.data.batches import BatchOptions, TrainBatches
from recsys.data.dataset import CSR, Dataset, id_rows
from recsys.data.eval_sets import EvalSets, EvalSplit, load_split_sets, sampled_users
from recsys.data.features import Batch, Features, FeatureSpec, SideFeatures, make_features, side_features
from recsys.data.loader import Pieces, StreamBatches, steps_per_epoch
from recsys.distributed import owned_share


class DataSource(Protocol):
    """What the training loop, the evaluation and the export read from a prepared dataset."""

    path: Path
    manifest: Dict
    loader: str
    """``memory`` or ``stream``: how it was prepared (recorded in the run's metrics)."""
    num_users: int
    num_items: int
    num_fit: int
    has_valid: bool
    order_depends_on_world_size: bool
    """Whether an epoch's batches change with the world size (a resumed epoch on another world
    size then sees another order)."""

    side: Dict[str, SideFeatures]

    def side_tables(self) -> Dict[str, List[Tuple[str, int]]]: ...
    def negative_rows(self) -> Optional[np.ndarray]: ...
    def fit_item_counts(self) -> np.ndarray: ...
    def item_counts(self) -> np.ndarray: ...
    def user_counts(self) -> np.ndarray: ...
    def steps_per_epoch(self, global_batch: int) -> int: ...
    def id_rows(self, which: str, lo: int = 0, hi: Optional[int] = None) -> Tuple[pa.Array, np.ndarray]: ...
    def features(self, include_valid: bool = True, training: bool = False) -> Features: ...
    def eval_sets(self, max_users: int, progress: bool = False) -> EvalSets: ...
    def batches(self, options: BatchOptions, epoch: int, skip: int = 0,
                max_batches: Optional[int] = None) -> Iterator[Batch]: ...
    def pairs(self, include_valid: bool = True, lo: int = 0,
              hi: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]: ...


def open_source(path: Path, spec: FeatureSpec, loader: str = "memory",
                memory_reason: Optional[str] = None) -> DataSource:
    """The prepared dataset at `path` read by `loader` (``memory`` or ``stream``: the resolved
    ``data.loader``; both read the same prepared layout), with the model inputs of `spec`.
    `memory_reason` (``recsys.config.memory_reason``): why the run needs the data in memory;
    streaming is then refused."""
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    if loader != "stream":
        return InMemorySource(path, spec)
    if memory_reason:
        raise ConfigError(f"data.loader=stream: {memory_reason}; use data.loader=memory")
    return StreamedSource(path, manifest, spec)


def missing_counts(path: Path, manifest: Dict) -> Tuple[Optional[np.ndarray], int]:
    """(per user row, the test interactions without a vector; the test users with no test
    interaction that has one) of a prepared dataset: what the figure over all test interactions
    counts as misses. (None, 0) for a dataset prepared before they were counted."""
    f = Path(path) / "test_missing_user_counts.npy"
    if not f.exists() or "test_users_without_vectors" not in manifest["counts"]:
        return None, 0
    return np.load(f), int(manifest["counts"]["test_users_without_vectors"])


def cold_item_rows(path: Path, manifest: Dict) -> Optional[np.ndarray]:
    """With item side features: which item rows have no training interaction (their vectors come
    from their features alone; the OOV rows are not items of their own); None without item
    features. The same rows as the preparation's ``test_cold_user_counts``."""
    if "items" not in manifest.get("features", {}):
        return None
    cold = np.load(Path(path) / "item_counts_all.npy") == 0
    oov = manifest.get("oov", {}).get("items")
    if oov is not None:
        cold[oov["first_row"]:] = False
    return cold


def negative_rows(path: Path, manifest: Dict) -> Optional[np.ndarray]:
    """The item rows uniform negatives are drawn from: with side features or OOV rows (rows
    without a training interaction: new, held-out or unused), those with training interactions
    (validation ones excluded), so that no held-out item is trained on as a negative; else None
    (every row)."""
    if "items" not in manifest.get("features", {}) and "oov" not in manifest:
        return None
    return np.flatnonzero(np.load(Path(path) / "item_counts.npy") > 0)


class InMemorySource:
    """``data.loader=memory``: the whole prepared dataset in every rank's memory; each epoch is a
    seeded permutation of all fit interactions (``TrainBatches``: the global batch of a step does
    not depend on the world size)."""

    loader = "memory"
    order_depends_on_world_size = False

    def __init__(self, path: Path, spec: FeatureSpec) -> None:
        self.path, self.spec, self.dataset = Path(path), spec, Dataset.load(path)
        self.manifest, self.has_valid = self.dataset.manifest, self.dataset.has_valid
        self.num_users, self.num_items = self.dataset.num_users, self.dataset.num_items
        self.fit_users, self.fit_items = self.dataset.fit_pairs()
        self.num_fit = len(self.fit_users)
        self._features: Dict[Tuple[bool, bool], Features] = {}
        self.side = side_features(self.path, self.manifest)

    def side_tables(self) -> Dict[str, List[Tuple[str, int]]]:
        return {role: s.tables for role, s in self.side.items()}

    def fit_item_counts(self) -> np.ndarray:
        return self.dataset.item_counts(include_valid=False)

    def item_counts(self) -> np.ndarray:
        return self.dataset.item_counts()

    def user_counts(self) -> np.ndarray:
        return np.bincount(self.dataset.train_users, minlength=self.num_users)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_fit // global_batch

    def id_rows(self, which: str, lo: int = 0, hi: Optional[int] = None) -> Tuple[pa.Array, np.ndarray]:
        """(raw ids, their table rows) of ``users`` / ``items``, rows [lo, hi) (``recsys.data.dataset.id_rows``)."""
        return self.dataset.id_rows(which, lo, hi)

    def pairs(self, include_valid: bool = True, lo: int = 0,
              hi: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(users, items) of the training split (`include_valid`) or of its fit part, of the
        users [lo, hi) (None: to the end)."""
        users, items = ((self.dataset.train_users, self.dataset.train_items) if include_valid
                        else (self.fit_users, self.fit_items))
        if lo == 0 and (hi is None or hi >= self.num_users):
            return users, items
        keep = (users >= lo) & (users < (self.num_users if hi is None else hi))
        return users[keep], items[keep]

    def features(self, include_valid: bool = True, training: bool = False) -> Features:
        """The model's inputs (``make_features``, built once): with the validation holdout in the
        histories (testing, exporting) or without (training, validating)."""
        key = (include_valid, training)
        if key not in self._features:
            self._features[key] = make_features(self.spec, self.dataset, include_valid, training, self.side)
        return self._features[key]

    def eval_sets(self, max_users: int, progress: bool = False) -> EvalSets:
        """The test split (the whole training split masked) and the validation split (its fit part
        masked), for all users with test / validation items or a seeded sample of ``max_users``."""
        d = self.dataset
        test_csr = d.test_csr()
        users, of = sampled_users(test_csr.counts(), max_users, "test")
        train_csr = d.train_csr()
        test = EvalSplit(users, self.num_users, self.num_items, self.features(), train_csr, test_csr,
                         *missing_counts(self.path, self.manifest), users_of=of)
        valid = None
        if d.has_valid:
            valid_csr = d.valid_csr()
            valid = EvalSplit(sampled_users(valid_csr.counts(), max_users, "validation")[0], self.num_users,
                              self.num_items,
                              self.features(include_valid=False), d.train_csr(include_valid=False), valid_csr)
        cold = None
        cold_items = cold_item_rows(self.path, self.manifest)
        if cold_items is not None:
            keep = cold_items[d.test_items]
            cold_csr = CSR.from_pairs(d.test_users[keep], d.test_items[keep], self.num_users)
            if keep.any():
                cold_users, cold_of = sampled_users(cold_csr.counts(), max_users, "cold-item test")
                cold = EvalSplit(cold_users, self.num_users, self.num_items, self.features(), train_csr, cold_csr,
                                 users_of=cold_of)
        return EvalSets(test, valid, cold=cold, info={"eval_users": len(users), "eval_users_of": of})

    def negative_rows(self) -> Optional[np.ndarray]:
        return negative_rows(self.path, self.manifest)

    def batches(self, options: BatchOptions, epoch: int, skip: int = 0,
                max_batches: Optional[int] = None) -> Iterator[Batch]:
        """The epoch's batches from the (skip+1)-th on, at most `max_batches` counting the skipped."""
        it = iter(TrainBatches(self.fit_users, self.fit_items, self.num_items, options, epoch, max_batches,
                               self.features(include_valid=False, training=True)))
        for _ in range(skip):  # the same batches, negatives and RNG draws as before: discarded
            next(it)
        return it


class StreamedSource:
    """``data.loader=stream``: nothing held grows with the number of interactions. Batches are
    streamed from the row groups (``recsys.data.loader.StreamBatches``; the order depends on the
    world size and ``data.num_workers``), the counts come from the preparation's ``*.npy``, and
    the evaluation sets are read for this rank's share of the evaluated users."""

    loader = "stream"
    order_depends_on_world_size = True

    def __init__(self, path: Path, manifest: Dict, spec: FeatureSpec) -> None:
        if spec.any_bag:
            raise ConfigError("data.loader=stream: history bags need each user's training items, held by the memory "
                              "loader only; use data.loader=memory")
        self.path, self.manifest = Path(path), manifest
        counts = manifest["counts"]
        self.num_users, self.num_items = counts["num_users"], counts["num_items"]
        self.has_valid = counts["valid_interactions"] > 0
        self.pieces = Pieces.read(path)
        self.num_fit = self.pieces.total_fit
        self.side = side_features(self.path, manifest)
        self._features = Features(side=self.side)

    def side_tables(self) -> Dict[str, List[Tuple[str, int]]]:
        return {role: s.tables for role, s in self.side.items()}

    def negative_rows(self) -> Optional[np.ndarray]:
        return negative_rows(self.path, self.manifest)

    def fit_item_counts(self) -> np.ndarray:
        return np.load(self.path / "item_counts.npy")

    def item_counts(self) -> np.ndarray:
        return np.load(self.path / "item_counts_all.npy")

    def user_counts(self) -> np.ndarray:
        return np.load(self.path / "user_counts.npy")

    def steps_per_epoch(self, global_batch: int) -> int:
        return steps_per_epoch(self.pieces, global_batch)

    def id_rows(self, which: str, lo: int = 0, hi: Optional[int] = None) -> Tuple[pa.Array, np.ndarray]:
        """(raw ids, their table rows) of ``users`` / ``items``, rows [lo, hi) (``recsys.data.dataset.id_rows``)."""
        return id_rows(self.path, which, lo, hi)

    def pairs(self, include_valid: bool = True, lo: int = 0,
              hi: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(users, items) of the training split (`include_valid`) or of its fit part, of the
        users [lo, hi): one pass over the training row groups (``Pieces``), keeping those users'
        rows (what one rank's share of the closed form needs)."""
        hi = self.num_users if hi is None else hi
        users, items, files = [], [], {}
        columns = ["user", "item"] + (["valid"] if self.pieces.has_valid and not include_valid else [])
        for path, group in zip(self.pieces.files, self.pieces.row_groups):
            if path not in files:
                files[path] = pq.ParquetFile(path)
            table = files[path].read_row_group(int(group), columns=columns)
            u = table["user"].to_numpy()
            keep = (u >= lo) & (u < hi)
            if "valid" in columns:
                keep &= ~table["valid"].to_numpy(zero_copy_only=False)
            users.append(u[keep].astype(np.int64))
            items.append(table["item"].to_numpy()[keep].astype(np.int64))
        if not users:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(users), np.concatenate(items)

    def features(self, include_valid: bool = True, training: bool = False) -> Features:
        """The model's inputs: the ids and the side features (a streamed model has no history bags)."""
        return self._features

    def eval_sets(self, max_users: int, progress: bool = False) -> EvalSets:
        """The sets of this rank's own evaluated users (``owned_share``) (a seeded sample of at most
        `max_users` of those with test / validation items), read in one pass over ``train/`` and
        one over ``test/`` (with a progress bar when `progress`)."""
        test_users, of = sampled_users(np.load(self.path / "test_user_counts.npy"), max_users, "test")
        wanted = {"test": owned_share(test_users, self.num_users)[0]}
        valid_users = cold_users = None
        if self.has_valid:
            valid_users, _ = sampled_users(np.load(self.path / "valid_user_counts.npy"), max_users, "validation")
            wanted["valid"] = owned_share(valid_users, self.num_users)[0]
        cold_items = cold_item_rows(self.path, self.manifest)
        if cold_items is not None and (self.path / "test_cold_user_counts.npy").exists():
            cold_users, cold_of = sampled_users(np.load(self.path / "test_cold_user_counts.npy"), max_users,
                                                "cold-item test")
            if len(cold_users):
                wanted["cold"] = owned_share(cold_users, self.num_users)[0]
        sets = load_split_sets(self.path, wanted, progress=progress, cold_items=cold_items)
        test = EvalSplit(test_users, self.num_users, self.num_items, self._features, *sets["test"],
                         *missing_counts(self.path, self.manifest), users_of=of)
        valid = (EvalSplit(valid_users, self.num_users, self.num_items, self._features, *sets["valid"])
                 if self.has_valid else None)
        cold = (EvalSplit(cold_users, self.num_users, self.num_items, self._features, *sets["cold"], users_of=cold_of)
                if "cold" in sets else None)
        return EvalSets(test, valid, cold=cold, info={"eval_users": len(test_users), "eval_users_of": of})

    def batches(self, options: BatchOptions, epoch: int, skip: int = 0,
                max_batches: Optional[int] = None) -> Iterator[Batch]:
        return iter(StreamBatches(self.pieces, self.num_items, options, epoch, skip=skip, max_batches=max_batches,
                                  features=self._features))
