"""Building a run: its data on every rank, its sharded model, and a trained one from a checkpoint.

``open_data`` prepares the dataset on rank 0 (or reuses it) and opens it on every rank with the
model's inputs; ``build_model`` builds the model on the meta device and shards it
(``recsys.parallelize``); ``load_trained`` does both for a checkpoint's recorded config and loads
the weights the run tested (``python -m recsys.evaluate`` / ``recsys.export``). These are the
builders the entry points share: they read the run's typed ``Config`` and hand typed arguments
to the components.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from recsys.config import Config, memory_reason
from recsys.data.prepare import data_config, prepare_everywhere
from recsys.data.source import DataSource, open_source
from recsys.model import build_task, feature_spec
from recsys.parallelize import PlacedPlan, init_distributed, init_tables, restore_weights, shard_model
from recsys.training.checkpoint import (check_compatible, config_from_meta, load_checkpoint, read_meta,
                                        resolve_checkpoint, table_shapes)
from recsys.training.pretrained import frozen_dims_of, pretrained_dims

logger = logging.getLogger("recsys.train")


def open_data(cfg: Config, data_dir: Optional[Path] = None, progress: Optional[bool] = None) -> DataSource:
    """The run's dataset on every rank: prepared by rank 0 as `cfg` says (``data.loader`` resolved
    for its model), or the prepared `data_dir`, opened with the model's inputs. Collective."""
    if data_dir is None or not (Path(data_dir) / "manifest.json").is_file():
        data_dir = prepare_everywhere(cfg, progress)
    return open_source(Path(data_dir), feature_spec(cfg.model, cfg.seed), data_config(cfg, quiet=True).loader,
                       memory_reason(cfg))


@dataclasses.dataclass
class ShardedModel:
    """The training module sharded over the process group, and what the loop needs with it."""

    dmp: Any
    """The ``DistributedModelParallel`` around the ``RetrievalTask`` (model and loss)."""
    optimizer: Any
    """The fused table optimizer combined with Adam for the dense parameters."""
    plan: PlacedPlan

    @property
    def model(self):
        """The (sharded) ``TwoTower``."""
        return self.dmp.module.model


def build_model(cfg: Config, num_users: int, num_items: int, device: torch.device, world: int,
                item_counts: Optional[np.ndarray] = None, initialise: bool = True,
                side_tables: Optional[Dict[str, List[Tuple[str, int]]]] = None,
                frozen_dims: Optional[Dict[str, int]] = None, negative_pool: Optional[int] = None) -> ShardedModel:
    """The model of `cfg` built on the meta device and sharded by the planner; with `initialise`,
    its tables filled with their sharding-independent initialisation (not needed when a checkpoint
    is loaded next). `item_counts` (training counts per item) gives the loss's logQ correction
    when ``loss.logq_correction``; `side_tables` the data's side-feature tables
    (``DataSource.side_tables``). The frozen pre-trained tables (``model.pretrained_frozen``) take
    their dimension from the vector files, read here on every rank, unless `frozen_dims` gives
    them (a checkpoint's model: the files are not needed again). `negative_pool`: the rows uniform
    negatives are drawn from (``DataSource.negative_rows``; None: all). Collective."""
    item_log_prob = None
    if cfg.loss.logq_correction and item_counts is not None:
        item_log_prob = torch.from_numpy(np.log(np.maximum(item_counts, 1) / item_counts.sum())).float().to(device)
    task = build_task(cfg.model, cfg.loss, num_users, num_items, item_log_prob, side_tables,
                      pretrained_dims(cfg.model) if frozen_dims is None else frozen_dims, negative_pool)
    o = cfg.optim
    # GPU memory the planner must leave free: the evaluation's item vectors (every rank scores its
    # users against all items) and its score blocks
    reserved = num_items * cfg.model.embedding_dim * 4 + 2 * cfg.eval.score_budget_mb * 2**20
    dmp, optimizer, plan = shard_model(task, device, o.name, o.lr, o.eps, o.dense_lr, cfg.train.sharding_types,
                                       max(cfg.train.batch_size // world, 1), o.stochastic_rounding, reserved)
    if initialise:
        init_tables(dmp, cfg.model.init_std, cfg.seed)
        dmp.module.model.reset_dense_parameters(cfg.seed)
    return ShardedModel(dmp, optimizer, plan)


@dataclasses.dataclass
class Trained:
    """A checkpoint's model, sharded over the current process group, in eval mode with the weights
    the run tests and exports (the best validated epoch's when it had a validation split)."""

    cfg: Config
    """The run's config, as the checkpoint recorded it."""
    meta: Dict[str, Any]
    path: Path
    """The checkpoint directory."""
    data: DataSource
    """The prepared dataset as training read it (prepared again from the recorded config if moved)."""
    sharded: ShardedModel
    device: torch.device

    @property
    def model(self):
        return self.sharded.model

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent


def load_trained(path: Path, device: str = "auto") -> Trained:
    """Build the run's model from its newest complete checkpoint (``path``: a run, checkpoints or
    checkpoint directory) and load it. Joins or creates the process group (collective)."""
    ckpt = resolve_checkpoint(Path(path))
    meta = read_meta(ckpt)
    cfg = config_from_meta(meta, ckpt)
    info = init_distributed(device)
    data = open_data(cfg, Path(meta.get("data", {}).get("path") or ""))
    sharded = build_model(cfg, data.num_users, data.num_items, info.device, info.world_size, initialise=False,
                          side_tables=data.side_tables(),
                          frozen_dims=frozen_dims_of(meta.get("model", {}).get("tables") or {}))
    check_compatible(meta, cfg.model.name, table_shapes(sharded.dmp), ckpt)
    _, best = load_checkpoint(ckpt, sharded.dmp, None, load_best=True)
    if best is not None:
        restore_weights(sharded.dmp, best)
    sharded.dmp.eval()
    return Trained(cfg, meta, ckpt, data, sharded, info.device)
