"""Model inputs: the features of a batch of users and items, as TorchRec KeyedJaggedTensors.

A ``Batch`` carries the user features (``user`` ids; the ``history`` bag when it has a table of
its own) and the item features (``item`` ids; the ``history`` bag when it shares the item
table; the ``item_history`` bag), plus the same rows as dense tensors. ``Features`` builds
batches from rows, vectorised; ``FeatureSpec`` says which bags a model pools (built from the
model's config by ``recsys.model.feature_spec``) and ``make_features`` builds them from a
prepared dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys.data.dataset import CSR, Dataset, gather_rows_csr

USER_FEATURE = "user"
ITEM_FEATURE = "item"
HISTORY_FEATURE = "history"
ITEM_HISTORY_FEATURE = "item_history"
SIDE_PREFIX = {"item": "if_", "user": "uf_"}
"""A side-feature column ``c`` of the items is the feature (and table) ``if_c``, of the users ``uf_c``."""


@dataclass
class SideFeatures:
    """The side features of one role (``data.item_features`` / ``user_features``) as prepared:
    per column, each row's value codes (a CSR over the table's rows) and the column's table size;
    the training interactions of each row (a row with none has no trained id embedding: its
    vector comes from its features alone). The arrays are memory-mapped from the prepared
    dataset (``recsys.data.layout.feature_csr_npy``): a rank holds the pages of the rows it reads,
    not every id's values."""

    names: List[str]
    sizes: List[int]
    """Rows of each column's table (its distinct values, or the hash buckets)."""
    bags: List[CSR]
    counts: np.ndarray
    """Training interactions per row (validation ones included)."""
    held: Optional[np.ndarray] = None
    """Validation interactions per row (not trained on), when counted apart from `counts`."""
    id_rows_from: Optional[int] = None
    """Rows from here on always use their id embedding (the OOV rows)."""

    @property
    def tables(self) -> List[Tuple[str, int]]:
        return list(zip(self.names, self.sizes))

    def has_id(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` have a trained id embedding: a training interaction (validation ones
        excluded, they are not trained on), or an OOV row."""
        rows = np.asarray(rows)
        fit = np.asarray(self.counts[rows]) - (0 if self.held is None else np.asarray(self.held[rows]))
        has = fit > 0
        if self.id_rows_from is not None:
            has |= rows >= self.id_rows_from
        return has

    @staticmethod
    def load(path: Path, stem: str, counts: np.ndarray, held: Optional[np.ndarray] = None,
             id_rows_from: Optional[int] = None) -> "SideFeatures":
        """The prepared side features ``<stem>`` (``items`` / ``users``) of dataset `path`;
        `counts`, `held`, `id_rows_from`: the fields of the same names."""
        manifest = json.loads((Path(path) / "manifest.json").read_text())["features"][stem]
        names = [c["name"] for c in manifest["columns"]]
        directory = Path(path) / f"{stem}_features"
        bags = [CSR(np.load(directory / f"feature-{k}.indptr.npy", mmap_mode="r"),
                    np.load(directory / f"feature-{k}.codes.npy", mmap_mode="r")) for k in range(len(names))]
        return SideFeatures(names, [int(c["rows"]) for c in manifest["columns"]], bags, counts, held, id_rows_from)


def side_tables_of(manifest: Dict) -> Dict[str, List[Tuple[str, int]]]:
    """The side-feature tables (name, rows) of each role of a prepared dataset's manifest."""
    features = manifest.get("features", {})
    return {role: [(c["name"], int(c["rows"])) for c in features[stem]["columns"]]
            for role, stem in (("item", "items"), ("user", "users")) if stem in features}


def side_features(path: Path, manifest: Dict) -> Dict[str, SideFeatures]:
    """The side features a prepared dataset has: ``{"item": ..., "user": ...}`` (either may be
    absent), their arrays and the per-row training counts memory-mapped."""
    out = {}
    path = Path(path)
    if "items" in manifest.get("features", {}):  # item_counts.npy: the fit counts (validation rows excluded)
        oov = manifest.get("oov", {}).get("items")
        out["item"] = SideFeatures.load(path, "items", np.load(path / "item_counts.npy", mmap_mode="r"),
                                        id_rows_from=None if oov is None else oov["first_row"])
    if "users" in manifest.get("features", {}):
        out["user"] = SideFeatures.load(path, "users", np.load(path / "user_counts.npy", mmap_mode="r"),
                                        np.load(path / "valid_user_counts.npy", mmap_mode="r"))
    return out


@dataclass(frozen=True)
class FeatureSpec:
    """Which bags the model pools besides the ids, and how they are built."""

    history: bool = False
    """Each user's training items (the user tower's history bag)."""
    history_max_len: int = 0
    """Keep the most recent N items of each history (0: all)."""
    share_item_table: bool = True
    """The history bag is looked up in the item table (it rides in the item KJT) or in its own."""
    history_dropout: float = 0.0
    """Training only: drop each history item from a batch's bags with this probability."""
    history_exclude_target: bool = False
    """Training only: leave the positive being predicted out of its user's bag."""
    item_history: bool = False
    """Each item's users (the item tower's bag)."""
    item_history_max_len: int = 0
    """A fixed seeded random sample of at most N users per item (0: all)."""
    seed: int = 0
    """Seed of that sample."""

    @property
    def any_bag(self) -> bool:
        return self.history or self.item_history


@dataclass
class Batch(Pipelineable):
    """Model inputs for one rank's share of a step (or for a chunk of users or items to score).

    ``users`` holds feature ``user`` (B user rows) and, when the history has its own table,
    ``history``; ``items`` holds feature ``item`` (B positive rows followed by N negatives) and,
    when the history shares the item table, ``history`` (padded with empty bags to the same
    length). ``user_ids``/``item_ids`` are the same rows as dense tensors (the loss masks
    accidental hits with them); ``history_counts`` the length of each user's bag."""

    users: KeyedJaggedTensor
    items: KeyedJaggedTensor
    user_ids: torch.Tensor
    item_ids: torch.Tensor
    history_counts: torch.Tensor
    item_history_counts: torch.Tensor
    user_feature_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    """[users, side-feature columns]: the number of values of each row's bag (mean pooling)."""
    item_feature_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))

    _DENSE = ("user_ids", "item_ids", "history_counts", "item_history_counts", "user_feature_counts",
              "item_feature_counts")

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(self.users.to(device=device, non_blocking=non_blocking),
                     self.items.to(device=device, non_blocking=non_blocking),
                     *(getattr(self, n).to(device=device, non_blocking=non_blocking) for n in self._DENSE))

    def record_stream(self, stream: torch.Stream) -> None:
        self.users.record_stream(stream)
        self.items.record_stream(stream)
        for n in self._DENSE:
            getattr(self, n).record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(self.users.pin_memory(), self.items.pin_memory(), *(getattr(self, n).pin_memory() for n in self._DENSE))


class Features:
    """Builds model inputs (KJTs) from user/item rows, vectorised.

    Without a history this is matrix factorisation's single-hot ``user`` and ``item`` features.
    With one (a CSR of each user's items), each user row also carries the multi-hot ``history``
    bag, looked up in the item table (``shared``) or in a table of its own. With an
    ``item_history`` (a CSR of each item's users), each item row carries the ``item_history`` bag."""

    def __init__(self, history: Optional[CSR] = None, shared: bool = True, dropout: float = 0.0,
                 exclude_target: bool = False, item_history: Optional[CSR] = None,
                 side: Optional[Dict[str, SideFeatures]] = None) -> None:
        self.history = history
        self.item_history = item_history
        self.shared = shared
        self.dropout = dropout
        self.exclude_target = exclude_target
        self.side = side or {}

    def _side(self, role: str, rows: np.ndarray, features: list) -> np.ndarray:
        """Append the side-feature bags of `rows` (``if_*`` / ``uf_*``) to `features`; the id
        feature (first) of a row without a training interaction is an empty bag. Returns the
        counts [rows, columns]."""
        side = self.side.get(role)
        if side is None:
            return np.zeros((len(rows), 0), dtype=np.float32)
        key, _, ids = features[0]
        has = side.has_id(rows)
        features[0] = (key, has.astype(np.int64), ids[has])
        counts = np.zeros((len(rows), len(side.names)), dtype=np.float32)
        for k, (name, bag) in enumerate(zip(side.names, side.bags)):
            lengths, values = gather_rows_csr(bag, rows)
            features.append((SIDE_PREFIX[role] + name, lengths, values))
            counts[:, k] = lengths
        return counts

    def _bags(self, users: np.ndarray, targets: Optional[np.ndarray], rng: Optional[np.random.Generator]):
        lengths, values = gather_rows_csr(self.history, np.asarray(users, dtype=np.int64))
        if rng is None or (self.dropout == 0 and not self.exclude_target):
            return lengths, values
        # Training only: drop the row's own positive from its bag, and/or a random share of the bag.
        row = np.repeat(np.arange(len(users)), lengths)
        keep = np.ones(len(values), dtype=bool)
        if self.exclude_target and targets is not None:
            keep &= values != targets[row]
        if self.dropout > 0:
            keep &= rng.random(len(values)) >= self.dropout
        return np.bincount(row[keep], minlength=len(users)), values[keep]

    def batch(self, users: np.ndarray, items: np.ndarray, rng: Optional[np.random.Generator] = None) -> Batch:
        """Inputs for user rows `users` and item rows `items` (either may be empty).

        `rng` marks a training batch (the first len(users) items are the users' positives):
        history dropout and target exclusion apply only then."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        user_ids, item_ids = torch.from_numpy(users), torch.from_numpy(items)
        user_features = [(USER_FEATURE, np.ones(len(users), dtype=np.int64), users)]
        item_features = [(ITEM_FEATURE, np.ones(len(items), dtype=np.int64), items)]
        counts = np.zeros(len(users))
        item_counts = np.zeros(len(items))
        if self.history is not None:
            counts, values = self._bags(users, items[: len(users)], rng)
            # shared: the bag is looked up in the item table, so it rides in the item KJT
            (item_features if self.shared else user_features).append((HISTORY_FEATURE, counts, values))
        if self.item_history is not None:
            item_counts, values = gather_rows_csr(self.item_history, items)
            item_features.append((ITEM_HISTORY_FEATURE, item_counts, values))
        user_side = self._side("user", users, user_features)
        item_side = self._side("item", items, item_features)
        return Batch(_kjt(user_features), _kjt(item_features), user_ids, item_ids,
                     torch.from_numpy(np.asarray(counts, dtype=np.float32)),
                     torch.from_numpy(np.asarray(item_counts, dtype=np.float32)),
                     torch.from_numpy(user_side), torch.from_numpy(item_side))


def _kjt(features) -> KeyedJaggedTensor:
    """One KJT from (key, lengths, values) triples; shorter features are padded with empty rows
    so that every key has the same number of rows (the KJT's stride).

    The stride and each key's number of values are passed in, computed here on the host: without
    them TorchRec derives them from the lengths tensor, and once the batch is on the GPU that is
    a device-to-host copy (``.tolist()``) in the input all-to-all of every step."""
    stride = max(len(lengths) for _, lengths, _ in features)
    all_lengths = []
    for _, lengths, _ in features:
        padded = np.zeros(stride, dtype=np.int32)
        padded[: len(lengths)] = lengths
        all_lengths.append(padded)
    length_per_key = [int(lengths.sum()) for lengths in all_lengths]
    return KeyedJaggedTensor(keys=[k for k, _, _ in features],
                             values=torch.from_numpy(np.concatenate([v for _, _, v in features]).astype(np.int64)),
                             lengths=torch.from_numpy(np.concatenate(all_lengths)), stride=stride,
                             length_per_key=length_per_key,
                             offset_per_key=[0, *np.cumsum(length_per_key).tolist()])


def make_features(spec: FeatureSpec, dataset: Dataset, include_valid: bool, training: bool = False,
                  side: Optional[Dict[str, SideFeatures]] = None) -> Features:
    """The model's inputs from a dataset in memory: the bags of `spec` from the training split less
    the validation holdout (training, validating) or from the whole training split (testing,
    exporting: `include_valid`); dropout and target exclusion only while `training`; the side
    features `side` (``side_features``) as they are."""
    item_history = None
    if spec.item_history:
        item_history = dataset.item_history(include_valid, spec.item_history_max_len, spec.seed)
    if not spec.history:
        return Features(item_history=item_history, side=side)
    return Features(dataset.history(include_valid, spec.history_max_len), spec.share_item_table,
                    spec.history_dropout if training else 0.0, spec.history_exclude_target and training,
                    item_history, side)
