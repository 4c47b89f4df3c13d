"""Data sources: a prepared dataset as training, evaluation and export read it.

A data source is what ``recsys.train``'s loop, ``recsys.evaluate.evaluate_run`` and
``recsys.export.export_checkpoint`` take from a prepared dataset (``recsys.data.prepare``), the
same way whether it is held in memory or streamed:

- sizes and counts: ``num_users``, ``num_items``, ``num_fit`` (training interactions less the
  validation holdout), ``has_valid``, ``manifest``; ``fit_item_counts()`` (logQ), ``item_counts()``
  (popularity), ``user_counts()``, ``steps_per_epoch(global_batch)``;
- ``id_rows(which)``: the raw id of each table row (what the export writes);
- ``features(model, include_valid)``: the model's inputs (users' history bags when it has them);
- ``setup(cfg, model, rank, world, device)``: the evaluation sets of this rank (``train_mask`` /
  ``test_csr``, ``fit_mask`` / ``valid_csr``), the evaluated users (``test_users`` /
  ``valid_users``: at most ``eval.max_users``, a seeded sample when there are more) and
  ``eval_info`` (users evaluated, of how many);
- ``batches(epoch, skip, max_batches)``: an epoch's training batches.

``InMemoryData`` holds the whole dataset in every rank's memory (``data.loader=memory``);
``StreamedData`` streams row groups and holds nothing that grows with the number of interactions
(``data.loader=stream``). ``open_data`` opens a prepared directory as the one it was prepared for;
``data_config`` resolves ``data.loader`` for a config (models with history bags need memory).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from recsys.config import Config, ConfigError, DataConfig
from recsys.data import Batch, Dataset, Features, TrainBatches, id_rows, resolve_loader
from recsys.evaluate import eval_users, load_split_sets, local_share
from recsys.loader import Pieces, StreamBatches, steps_per_epoch
from recsys.model import TwoTower, history_weights

logger = logging.getLogger(__name__)


def make_features(cfg: Config, dataset: Dataset, model: TwoTower, include_valid: bool,
                  training: bool = False) -> Features:
    """The model's inputs: the training history feeds the user tower while training and validating;
    the whole training split (validation holdout included) when testing and exporting."""
    mc = cfg.model
    item_history = None
    if model.item_history_weight > 0:
        item_history = dataset.item_history(include_valid, mc.item_history_max_len, cfg.seed)
    if not model.has_history:
        return Features(item_history=item_history)
    return Features(dataset.history(include_valid, mc.history_max_len), mc.share_item_table,
                    mc.history_dropout if training else 0.0, mc.history_exclude_target and training,
                    item_history)


def history_bags_reason(cfg: Config) -> Optional[str]:
    """Why the model of `cfg` cannot stream (None when it can): its user tower pools each user's
    training items, or its item tower each item's users (history bags, built from the whole
    dataset in memory). As the model is built (``recsys.model.history_weights``): an ``mf`` model
    has none, whatever ``model.history_weight`` says."""
    history, item_history = history_weights(cfg.model)
    if history > 0 or item_history > 0:
        return (f"model={cfg.model.name} with history bags (model.history_weight={history}, "
                f"model.item_history_weight={item_history}) needs each user's training items, held by the "
                "memory loader only")
    if cfg.model.stack_spectral_dim:
        return (f"model.stack_spectral_dim={cfg.model.stack_spectral_dim} (stacking the spectral closed form) "
                "needs the training pairs in memory, held by the memory loader only")
    return None


def data_config(cfg: Config) -> DataConfig:
    """``cfg.data`` with ``data.loader`` resolved (``auto`` -> ``memory`` or ``stream``): models
    with history bags need every user's items in memory, so they never stream."""
    return dataclasses.replace(cfg.data, loader=resolve_loader(cfg.data, history_bags_reason(cfg)))


def open_data(cfg: Config, path: Path):
    """The prepared dataset at `path` as the loop reads it: ``StreamedData`` when it was prepared
    for streaming (its manifest says ``loader: stream``), else ``InMemoryData``."""
    manifest = json.loads((path / "manifest.json").read_text())
    return StreamedData(cfg, path, manifest) if manifest.get("loader") == "stream" else InMemoryData(cfg, path)


def _sampled(counts: np.ndarray, max_users: int, split: str) -> Tuple[np.ndarray, int]:
    """The evaluated users of a split (``eval_users``: all those with items in it, or a seeded
    sample of ``max_users`` of them, logged) and how many have items in it."""
    users, of = eval_users(counts, max_users), int(np.count_nonzero(counts))
    if len(users) < of:
        logger.info("evaluating %d of %d %s users (eval.max_users)", len(users), of, split)
    return users, of


class InMemoryData:
    """``data.loader=memory``: the whole prepared dataset in every rank's memory; each epoch is a
    seeded permutation of all fit interactions (``TrainBatches``: the global batch of a step does
    not depend on the world size)."""

    def __init__(self, cfg: Config, path: Path) -> None:
        self.cfg, self.dataset = cfg, Dataset.load(path)
        self.manifest, self.has_valid = self.dataset.manifest, self.dataset.has_valid
        self.num_users, self.num_items = self.dataset.num_users, self.dataset.num_items
        self.fit_users, self.fit_items = self.dataset.fit_pairs()
        self.num_fit = len(self.fit_users)
        self.test_users = self.valid_users = None  # set by setup
        self.eval_info: Dict = {}

    def fit_item_counts(self) -> np.ndarray:
        return self.dataset.item_counts(include_valid=False)

    def item_counts(self) -> np.ndarray:
        return self.dataset.item_counts()

    def user_counts(self) -> np.ndarray:
        return np.bincount(self.dataset.train_users, minlength=self.num_users)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_fit // global_batch

    def id_rows(self, which: str):
        """(raw ids, their table rows) of ``users`` / ``items`` (``recsys.data.id_rows``: what the export writes)."""
        return self.dataset.id_rows(which)

    def features(self, model: TwoTower, include_valid: bool = True, training: bool = False) -> Features:
        """The model's inputs (``make_features``): with the validation holdout in the histories
        (testing, exporting) or without (training, validating)."""
        return make_features(self.cfg, self.dataset, model, include_valid, training)

    def setup(self, cfg: Config, model: TwoTower, rank: int, world: int, device: torch.device) -> None:
        """The model's inputs and the evaluation sets (users' histories when the model has them);
        the evaluated users: all with test / validation items, or a seeded sample of
        ``eval.max_users`` of them."""
        d = self.dataset
        self.rank, self.world = rank, world
        self.train_features, self.fit_features, self.full_features = (self.features(model, False, True),
                                                                      self.features(model, False),
                                                                      self.features(model, True))
        self.train_mask, self.test_csr = d.train_csr(), d.test_csr()
        self.valid_csr = d.valid_csr() if d.has_valid else None
        self.fit_mask = d.train_csr(include_valid=False) if d.has_valid else None
        self.test_users, of = _sampled(self.test_csr.counts(), cfg.eval.max_users, "test")
        self.valid_users = None
        if self.valid_csr is not None:
            self.valid_users, _ = _sampled(self.valid_csr.counts(), cfg.eval.max_users, "validation")
        self.eval_info = {"eval_users": len(self.test_users), "eval_users_of": of}

    def batches(self, epoch: int, skip: int, max_batches: int) -> Iterator[Batch]:
        """The epoch's batches from the (skip+1)-th on, at most `max_batches` counting the skipped."""
        cfg = self.cfg
        it = iter(TrainBatches(self.fit_users, self.fit_items, self.num_items, cfg.train.batch_size,
                               cfg.loss.num_negatives, self.rank, self.world, cfg.seed, epoch,
                               max_batches=max_batches, features=self.train_features))
        for _ in range(skip):  # the same batches, negatives and RNG draws as before: discarded
            next(it)
        return it


class StreamedData:
    """``data.loader=stream``: nothing held grows with the number of interactions. Batches are
    streamed from the row groups (``recsys.loader.StreamBatches``; the order depends on the world
    size and ``data.num_workers``), the counts come from the prepare's ``*.npy``, and the
    evaluation sets are built for a seeded sample of at most ``eval.max_users`` test users."""

    def __init__(self, cfg: Config, path: Path, manifest: Dict) -> None:
        why = history_bags_reason(cfg)
        if why:
            raise ConfigError(f"{path} is prepared for streaming: {why}; use data.loader=memory")
        self.cfg, self.path, self.manifest = cfg, path, manifest
        counts = manifest["counts"]
        self.num_users, self.num_items = counts["num_users"], counts["num_items"]
        self.has_valid = counts["valid_interactions"] > 0
        self.pieces = Pieces.read(path)
        self.num_fit = self.pieces.total_fit
        self.test_users = self.valid_users = None  # set by setup
        self.eval_info: Dict = {}

    def fit_item_counts(self) -> np.ndarray:
        return np.load(self.path / "item_counts.npy")

    def item_counts(self) -> np.ndarray:
        return np.load(self.path / "item_counts_all.npy")

    def user_counts(self) -> np.ndarray:
        return np.load(self.path / "user_counts.npy")

    def valid_user_counts(self) -> np.ndarray:
        """Validation rows per user row (``valid_user_counts.npy`` of the streaming prepare)."""
        return np.load(self.path / "valid_user_counts.npy")

    def steps_per_epoch(self, global_batch: int) -> int:
        return steps_per_epoch(self.pieces, global_batch)

    def id_rows(self, which: str):
        """(raw ids, their table rows) of ``users`` / ``items`` (``recsys.data.id_rows``: what the export writes)."""
        return id_rows(self.path, which)

    def features(self, model: TwoTower, include_valid: bool = True, training: bool = False) -> Features:
        """The model's inputs: the ids only (a streamed model has no history bags)."""
        return Features()

    def setup(self, cfg: Config, model: TwoTower, rank: int, world: int, device: torch.device) -> None:
        """Model inputs (ids only) and the evaluation sets of the evaluated users (a seeded sample of at
        most ``eval.max_users`` of those with test / validation items), this rank's share of them,
        read in one pass over ``train/`` and one over ``test/`` (a progress bar on rank 0 with
        ``train.progress``)."""
        self.rank, self.world, self.pin = rank, world, device.type == "cuda"  # pinned memory on CUDA only
        self.fit_features = self.full_features = self.features(model)
        self.test_users, of = _sampled(np.load(self.path / "test_user_counts.npy"), cfg.eval.max_users, "test")
        wanted = {"test": local_share(self.test_users)[0]}
        self.valid_users = self.fit_mask = self.valid_csr = None
        if self.has_valid:
            self.valid_users, _ = _sampled(self.valid_user_counts(), cfg.eval.max_users, "validation")
            wanted["valid"] = local_share(self.valid_users)[0]
        sets = load_split_sets(self.path, wanted, progress=rank == 0 and cfg.train.progress)
        self.train_mask, self.test_csr = sets["test"]
        if self.has_valid:
            self.fit_mask, self.valid_csr = sets["valid"]
        self.eval_info = {"eval_users": len(self.test_users), "eval_users_of": of}

    def batches(self, epoch: int, skip: int, max_batches: int) -> Iterator[Batch]:
        cfg = self.cfg
        return iter(StreamBatches(self.pieces, self.num_items, cfg.train.batch_size, cfg.loss.num_negatives, self.rank,
                                  self.world, cfg.seed, epoch, cfg.data.num_workers, cfg.data.shuffle_buffer, skip=skip,
                                  max_batches=max_batches, pin_memory=self.pin))
