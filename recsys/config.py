"""Typed configuration: one dataclass per Hydra group, registered in Hydra's ConfigStore.

The YAML files under ``conf/<group>/`` extend these schemas (``defaults: [base_<group>]``), so a
misspelt key or a value of the wrong type fails when the config is composed, before any work.
Library code receives these dataclasses (or plain arguments), never a DictConfig. The checks
that need the world size or the data (``check_world_size``, ``check_data``) and the list of options
that a configuration does not use (``ignored_options``) are here too: one place for each.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from recsys.errors import ConfigError

__all__ = ["ConfigError"]  # raised by the checks below; defined with the other user errors in recsys.errors


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class FeatureFileConfig:
    """A side-feature table of items (``data.item_features``) or users (``data.user_features``):
    one row per id, each feature column a categorical scalar or a list (multi-hot) of integers or
    strings. Each column becomes an embedding table of the tower (recsys/data/side_features.py)."""

    path: Optional[str] = None
    """A Parquet or CSV file or a directory of them (CSV: scalar columns only, ``data.separator``);
    None: no side features."""
    id_column: Optional[str] = None
    """The id column; None: the interactions' (``data.item_column`` / ``data.user_column``)."""
    columns: List[str] = field(default_factory=list)
    """The feature columns (each an embedding table named after it)."""
    hash_buckets: int = 0
    """0: each column's distinct values get rows (a vocabulary built by the preparation, most
    frequent first); N > 0: values are hashed (seeded with ``data.seed``) into N rows per column."""

    def check(self, key: str) -> None:
        if self.path is None:
            _check(not self.columns, f"{key}.columns given without {key}.path")
            return
        _check(len(self.columns) > 0, f"{key}.path needs {key}.columns=[...] (the feature columns)")
        _check(len(set(self.columns)) == len(self.columns), f"{key}.columns repeats a column: {list(self.columns)}")
        for c in self.columns:
            _check(bool(re.fullmatch(r"[A-Za-z0-9_]+", str(c))),
                   f"{key}.columns: {c!r} must be letters, digits and _ (it names an embedding table)")
        _check(self.hash_buckets >= 0, f"{key}.hash_buckets must be >= 0, got {self.hash_buckets}")


@dataclass
class DataConfig:
    """Where interactions come from, how ids are mapped and how the log is split."""

    name: str = "synthetic"
    """``synthetic`` (generated, seeded); ``parquet`` or ``csv`` (a file or a directory of files with
    named columns); ``lightgcn`` (a directory with train.txt / test.txt, lines ``user item item ...``;
    the given split is kept); ``movielens`` (an ml-100k / ml-1m / ml-10m / ml-20m / ml-25m / latest
    directory or its ratings file)."""
    root: str = "data"
    """Directory where prepared datasets (Parquet + vocabularies + manifest) are written."""
    path: Optional[str] = None
    """The interactions (file or directory). With ``split=given``: the train file."""
    test_path: Optional[str] = None
    """``split=given``: the test interactions (same columns as ``path``)."""
    user_column: str = "user_id"
    item_column: str = "item_id"
    timestamp_column: Optional[str] = "timestamp"
    """Optional: used by ``split=temporal``; ignored when absent from the file."""
    weight_column: Optional[str] = None
    rating_column: Optional[str] = None
    """``parquet``/``csv``: a rating column; with ``min_rating`` only rows rated >= min_rating are kept."""
    min_rating: Optional[float] = None
    """Implicit feedback from ratings: keep interactions rated at least this (MovieLens: 4.0)."""
    separator: str = ","
    """``csv``: the field separator (one character)."""
    split: str = "random"
    """``random`` (per-user random holdout: each user's interactions in a seeded pseudo-random
    order, the first floor(n * test_fraction) held out; the same rows at every size, for every
    loader and engine), ``temporal`` (global time cut-off), ``given``, or ``cold_items`` (a
    seeded ``test_fraction`` of the items held out with all their interactions: new items, which
    get vectors from ``data.item_features`` alone; the evaluation then also reports them apart)."""
    test_fraction: float = 0.2
    """Share of each user's interactions (random), of the log by time (temporal) or of the items
    (cold_items) held out. With cold_items, ``valid_fraction`` still holds out a per-user share of
    the training interactions (of warm items) for model selection."""
    valid_fraction: float = 0.0
    """Share of each user's training interactions held out for model selection (epochs, early
    stopping); 0: no validation split. The test split is never used for selection."""
    duplicates: str = "drop"
    """Repeated (user, item) pairs: ``drop`` all but one (the earliest timestamp; among equal or
    missing timestamps the smallest weight; counted in the manifest's ``dropped``), ``keep`` them
    (counted in its ``kept``) or ``error`` (refuse the input, naming the first repeated pair in file
    order)."""
    null_ids: str = "drop"
    """Rows with a null user or item id: ``drop`` them (counted in the manifest's ``dropped``) or
    ``error`` (refuse the input, naming the file and row)."""
    unseen_test: str = "drop"
    """Test interactions whose user or item has no training interaction (no trained vector):
    ``drop`` them (counted as ``test_unseen_user`` / ``test_unseen_item``) or ``error``."""
    id_mapping: str = "vocab"
    """How raw ids become embedding rows. ``vocab``: any integer or string ids; the sorted distinct
    ids of the training split are the rows (``users.parquet``/``items.parquet`` map them back).
    ``identity``: integer ids that already are the rows, user ids in [0, ``num_users``) and item
    ids in [0, ``num_items``) (both required; the tables have exactly that many rows); a negative
    or larger id is refused with its file and row or line.
    ``hash``: ids of any type hashed (seeded with ``seed``) into ``num_users`` / ``num_items``
    rows, for unbounded id spaces; no vocabulary is needed to train, distinct ids sharing a row
    are counted (the collision rate is in the manifest and the log)."""
    min_count: int = 1
    """``data.oov_buckets > 0``: items with fewer training interactions than this are rare: they
    share the OOV rows instead of a row each (unless the item feature file gives them features)."""
    oov_buckets: int = 0
    """N > 0 (``id_mapping=vocab``): N hashed item rows after the others, shared by the rare items
    (a trained "rare item" vector); a test item never seen in training (and without features) is
    hashed into them too instead of being dropped, and so can a serving system (the export's
    ``oov/items/`` holds their vectors by bucket; ``recsys.data.hashing.oov_rows``). 0: every
    training item has a row; unseen ones have none. Items only: a user row is also what the
    evaluation ranks for, which rows shared by users would merge."""
    engine: str = "duckdb"
    """What prepares the data: ``duckdb`` (embedded, in process) or ``spark`` (a local Spark session
    here; on a cluster run ``spark-submit jobs/spark/prepare.py`` with the same overrides). Both
    write the same dataset (not part of its identity)."""
    engine_threads: int = 0
    """Threads of the preparation engine (0: all cores of the host)."""
    engine_memory: str = "50%"
    """Memory limit of the preparation engine: ``NN%`` of the host's memory or a size (``8GB``);
    beyond it the engine spills to disk in the staging directory."""
    loader: str = "auto"
    """How the prepared rows are read (one prepared dataset serves both): ``memory``: loaded into
    every rank's memory (every model). ``stream``: its row groups streamed (each rank reads a
    disjoint share, bounded shuffle buffer, loader workers); memory stays bounded whatever the
    number of interactions (models without history bags). ``auto``: ``stream`` when a synthetic
    or Parquet source has at least ``stream_min_rows`` rows."""
    stream_min_rows: int = 5_000_000
    """``loader=auto``: the number of source rows from which the streaming loader is used."""
    row_group_size: int = 1_048_576
    """Rows per Parquet row group of the prepared training and test files (the streaming loader's
    unit of reading and of the per-epoch shuffle of the read order). A multiple of 2,048 (DuckDB's
    vector) is written as is; other sizes are cut again after the engine, which costs a copy."""
    num_workers: int = 1
    """``loader=stream``: loader worker processes per rank (0: read in the training process)."""
    shuffle_buffer: int = 1_000_000
    """``loader=stream``: rows held by each worker's shuffle buffer (batches are drawn from it)."""
    seed: int = 0
    """Seed of the synthetic generator and of the random split (independent of training)."""
    num_users: int = 20_000
    """``synthetic``: number of users. ``id_mapping=identity`` / ``hash``: the number of user rows
    (the file sources' configs set 0: these modes then need it given)."""
    num_items: int = 5_000
    """``synthetic``: number of items. ``id_mapping=identity`` / ``hash``: the number of item rows."""
    num_interactions: int = 500_000
    """``synthetic``: approximate number of interactions (before the split)."""
    latent_dim: int = 16
    """``synthetic``: dimension of the planted user/item structure."""
    popularity_exponent: float = 1.0
    """``synthetic``: Zipf exponent of item popularity."""
    affinity: float = 3.0
    """``synthetic``: weight of the planted user-item affinity against log popularity."""
    item_features: FeatureFileConfig = field(default_factory=FeatureFileConfig)
    """Side features of the items (an id column + feature columns); items in it without a
    training interaction get rows too (vectors from their features alone, marked in the export)."""
    user_features: FeatureFileConfig = field(default_factory=FeatureFileConfig)
    """Side features of the users, the same way."""

    def __post_init__(self) -> None:
        for key, ff in (("data.item_features", self.item_features), ("data.user_features", self.user_features)):
            ff.check(key)
        names = ("synthetic", "parquet", "csv", "lightgcn", "movielens")
        _check(self.name in names, f"data.name must be one of {', '.join(names)}, got {self.name!r}")
        _check(self.split in ("random", "temporal", "given", "cold_items"),
               f"data.split must be random, temporal, given or cold_items, got {self.split!r}")
        _check(self.duplicates in ("drop", "keep", "error"),
               f"data.duplicates must be drop, keep or error, got {self.duplicates!r}")
        _check(self.null_ids in ("drop", "error"), f"data.null_ids must be drop or error, got {self.null_ids!r}")
        _check(self.unseen_test in ("drop", "error"), f"data.unseen_test must be drop or error, got {self.unseen_test!r}")
        _check(self.id_mapping in ("vocab", "identity", "hash"),
               f"data.id_mapping must be vocab, identity or hash, got {self.id_mapping!r}")
        _check(self.loader in ("auto", "memory", "stream"), f"data.loader must be auto, memory or stream, got {self.loader!r}")
        _check(self.engine in ("duckdb", "spark"), f"data.engine must be duckdb or spark, got {self.engine!r}")
        _check(self.engine_threads >= 0, f"data.engine_threads must be >= 0, got {self.engine_threads}")
        _check(self.row_group_size > 0, f"data.row_group_size must be positive, got {self.row_group_size}")
        _check(self.stream_min_rows >= 0, f"data.stream_min_rows must be >= 0, got {self.stream_min_rows}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.id_mapping == "hash":
            _check(self.num_users > 0 and self.num_items > 0,
                   "data.id_mapping=hash needs data.num_users and data.num_items (the table sizes) positive")
        _check(self.min_count >= 1, f"data.min_count must be >= 1, got {self.min_count}")
        _check(self.oov_buckets >= 0, f"data.oov_buckets must be >= 0, got {self.oov_buckets}")
        if self.min_count > 1:
            _check(self.oov_buckets > 0, f"data.min_count={self.min_count} sends rare ids to the OOV rows: set "
                   "data.oov_buckets > 0 (how many)")
        if self.oov_buckets:
            _check(self.min_count > 1, "data.oov_buckets: with data.min_count=1 no training item is rare, so the OOV "
                   "rows would never be trained (an unseen item would get an untrained vector): set data.min_count "
                   ">= 2")
        if self.oov_buckets:
            _check(self.id_mapping == "vocab", f"data.oov_buckets is for data.id_mapping=vocab (with "
                   f"{self.id_mapping} every id already has a row of its own or a hashed one)")
        if self.id_mapping == "identity":
            _check(self.name != "synthetic", "data=synthetic makes its own ids: data.id_mapping=identity is for files")
            _check(self.num_users > 0 and self.num_items > 0,
                   "data.id_mapping=identity needs data.num_users and data.num_items (the table sizes) positive")
        _check(0.0 < self.test_fraction < 1.0, f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        _check(0.0 <= self.valid_fraction < 1.0, f"data.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        _check(len(self.separator) == 1, f"data.separator must be one character, got {self.separator!r}")
        if self.name != "synthetic":
            _check(self.path is not None, f"data={self.name} needs data.path=FILE_OR_DIR")
        if self.name == "lightgcn":
            _check(self.split == "given", "data=lightgcn keeps the given train.txt/test.txt split (data.split=given)")
            _check(self.test_path is None, "data=lightgcn reads test.txt from data.path; do not set data.test_path")
        if self.split == "given" and self.name != "lightgcn":
            _check(self.path is not None and self.test_path is not None,
                   "data.split=given needs data.path (train) and data.test_path (test)")
        if self.name == "synthetic":
            _check(self.split != "given", "data=synthetic cannot use split=given")
            _check(self.num_users > 0 and self.num_items > 1, "data.num_users and data.num_items must be positive")
            _check(self.num_interactions >= self.num_users,
                   "data.num_interactions must be at least data.num_users (every user interacts)")
        if self.split == "cold_items":
            _check(self.id_mapping == "vocab", "data.split=cold_items needs data.id_mapping=vocab: with hashed or "
                   "identity rows a held-out item's row may be a trained one")


@dataclass
class ModelConfig:
    """The dot-product model: a user tower and an item tower over embedding tables."""

    name: str = "mf"
    """``mf``: matrix factorisation (id embeddings only); ``two_tower``: the user tower also pools
    a bag of the user's training items (YouTube-DNN / SimpleX form)."""
    embedding_dim: int = 64
    normalize: bool = True
    """Score with L2-normalised vectors (cosine); exported vectors are then normalised too."""
    init_std: float = 0.1
    """Standard deviation of the (sharding-independent) normal initialisation of the tables."""
    history_weight: float = 0.5
    """``two_tower``: user = (1 - w) * id embedding + w * pooled history (w in [0, 1]; 0: no
    history bag, the id embedding alone)."""
    history_pooling: str = "mean"
    """``two_tower``: ``mean`` or ``sum`` of the history bag."""
    history_max_len: int = 0
    """``two_tower``: keep only the most recent N items of each history (0: all)."""
    share_item_table: bool = True
    """``two_tower``: look the history up in the item table (else in a table of its own)."""
    projection: bool = False
    """``two_tower``: a linear layer (initialised to the identity) on the pooled history."""
    item_history_weight: float = 0.0
    """``two_tower``: item = (1 - w) * id embedding + w * mean context embedding of the item's users
    (0: the item tower is the id embedding alone)."""
    item_history_max_len: int = 64
    """``two_tower`` with item history: a fixed random sample of at most N users per item (0: all)."""
    history_dropout: float = 0.0
    """``two_tower``, training only: drop each history item from a batch's bags with this probability."""
    history_exclude_target: bool = False
    """``two_tower``, training only: leave the positive being predicted out of its user's bag."""
    init: str = "normal"
    """How the tables start: ``normal`` (seeded N(0, init_std^2) rows) or ``spectral`` (the
    closed-form low-pass filter of a truncated SVD of the normalised training interactions, see
    recsys/spectral.py; needs ``two_tower`` with ``history_weight=1``, ``share_item_table=false``,
    no item history, ``normalize=false``; ``embedding_dim`` singular vectors are kept)."""
    spectral_alpha: float = 0.0
    """``init=spectral`` and the stacked closed form: weight of the linear filter, context rows
    scaled by 1 + alpha s^2."""
    spectral_niter: int = 3
    """``init=spectral`` and the stacked closed form: power iterations of the randomised SVD."""
    spectral_refit: bool = True
    """``init=spectral`` with ``train.epochs=0`` and a validation split: the validation metrics are
    of tables computed from the fit part; the tables evaluated on the test split and exported are
    then recomputed from the whole training split (closed form: no epoch to select)."""
    stack_spectral_dim: int = 0
    """After training, concatenate the spectral closed form of this dimension to the trained
    towers (recsys/stack.py: user = [trained, w * c * unit spectral], item = [trained, spectral];
    still a dot product); 0: no stacking. Needs the in-memory loader."""
    stack_spectral_weights: List[float] = field(
        default_factory=lambda: [0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0])
    """``stack_spectral_dim > 0``: the weights w tried on the validation holdout (w = 0, the
    trained model alone, is always a candidate; when the best is the largest or smallest, the grid
    goes on by factors of 2 while that improves); one weight is used as given (no validation needed)."""
    table_dtype: str = "fp32"
    """Storage of the embedding table weights: ``fp32`` or ``fp16`` (half the memory; lookups and
    the fused optimizer update in fp32, the rows are stored rounded)."""
    pretrained_items: Optional[str] = None
    """A Parquet file (or directory of them) of raw item id + ``vector`` (another model's item
    embeddings, or a ``recsys`` export's ``items/``): the item id table's rows of the ids it has
    start from their vectors (of dimension ``embedding_dim``; any with ``pretrained_frozen``), then
    train as usual; the others get the usual initialisation. The match rate is logged and recorded
    in metrics.json."""
    pretrained_users: Optional[str] = None
    """The same for the user id table. Only the id tables start from vectors (a two_tower's own
    history table does not); a two_tower export's ``users/`` vectors already hold the history
    term, so seeding a history model's user ids from them counts the history twice."""
    pretrained_frozen: bool = False
    """With ``pretrained_items`` / ``pretrained_users``: keep each file's vectors frozen in a table
    of their own (of the file's dimension P, any P) under a trained linear map P -> ``embedding_dim``
    (dense, Adam at ``optim.dense_lr``): the id term becomes id row + map(pre-trained row). The
    matched ids' id rows start at zero (a matched id starts from its mapped vector), the others'
    as usual (their pre-trained row is zero). The map starts as the identity when P equals
    ``embedding_dim``, else as a seeded random orthogonal map scaled by sqrt(max(P / D, 1)) (norms
    kept: exactly when P < D, on average when P > D). Off: the vectors seed the id rows, fine-tuned
    (P must equal ``embedding_dim``)."""

    feature_pooling: str = "mean"
    """Side features (``data.item_features`` / ``user_features``): ``mean`` or ``sum`` of each
    feature's bag of values."""
    feature_weights: Dict[str, float] = field(default_factory=dict)
    """Side features: the weight of a feature column's pooled vector (default 1.0), given per column
    as a new key: ``+model.feature_weights.genre=0.5``; 0 leaves the column out. A name both
    feature files have applies to both towers."""
    feature_combine: str = "sum"
    """Side features: a tower's output is ``sum`` (the id embedding plus the weighted pooled
    features) or ``concat`` (the id embedding and the weighted pooled features concatenated, then
    a trained linear layer back to ``embedding_dim``). An id without a training interaction
    (a new item or user of the feature files) has no id term: its vector comes from its features."""

    @property
    def history_weights(self) -> Tuple[float, float]:
        """(history_weight, item_history_weight) of the model built: the configured ones for
        ``two_tower``, 0 for ``mf`` (id embeddings only, whatever the weights say)."""
        return (self.history_weight, self.item_history_weight) if self.name == "two_tower" else (0.0, 0.0)

    def __post_init__(self) -> None:
        _check(self.name in ("mf", "two_tower"), f"model.name must be mf or two_tower, got {self.name!r}")
        _check(self.embedding_dim > 0, f"model.embedding_dim must be positive, got {self.embedding_dim}")
        _check(self.init_std > 0, f"model.init_std must be positive, got {self.init_std}")
        _check(0.0 <= self.history_weight <= 1.0, f"model.history_weight must be in [0, 1], got {self.history_weight}")
        _check(self.history_pooling in ("mean", "sum"), f"model.history_pooling must be mean or sum, got {self.history_pooling!r}")
        _check(self.history_max_len >= 0, f"model.history_max_len must be >= 0, got {self.history_max_len}")
        _check(0.0 <= self.item_history_weight <= 1.0, f"model.item_history_weight must be in [0, 1], got {self.item_history_weight}")
        _check(self.item_history_max_len >= 0, f"model.item_history_max_len must be >= 0, got {self.item_history_max_len}")
        _check(0.0 <= self.history_dropout < 1.0, f"model.history_dropout must be in [0, 1), got {self.history_dropout}")
        _check(self.init in ("normal", "spectral"), f"model.init must be normal or spectral, got {self.init!r}")
        if self.init == "spectral":
            _check(self.name == "two_tower" and self.history_weight == 1.0 and not self.share_item_table
                   and self.item_history_weight == 0.0 and not self.normalize and not self.projection,
                   "model.init=spectral needs model=two_tower with model.history_weight=1.0, "
                   "model.share_item_table=false, model.item_history_weight=0, model.normalize=false and "
                   "model.projection=false (the user vector is the sum of its history's context rows)")
            _check(self.history_max_len == 0, "model.init=spectral sums each user's whole history: "
                   f"model.history_max_len must be 0, got {self.history_max_len}")
            _check(self.spectral_niter >= 0, f"model.spectral_niter must be >= 0, got {self.spectral_niter}")
        _check(self.feature_pooling in ("mean", "sum"), f"model.feature_pooling must be mean or sum, got {self.feature_pooling!r}")
        _check(self.feature_combine in ("sum", "concat"), f"model.feature_combine must be sum or concat, got {self.feature_combine!r}")
        for name, w in self.feature_weights.items():
            _check(w >= 0, f"model.feature_weights.{name} must be >= 0, got {w}")
        _check(self.table_dtype in ("fp32", "fp16"), f"model.table_dtype must be fp32 or fp16, got {self.table_dtype!r}")
        _check(self.init != "spectral" or not (self.pretrained_items or self.pretrained_users),
               "model.pretrained_items / pretrained_users start tables from given vectors; model.init=spectral "
               "computes them from the data: use one of the two")
        _check(not self.pretrained_frozen or bool(self.pretrained_items or self.pretrained_users),
               "model.pretrained_frozen=true freezes the vectors of model.pretrained_items / pretrained_users: "
               "set one of them (or leave model.pretrained_frozen=false)")
        _check(not (self.pretrained_frozen and self.pretrained_items and self.history_weights[0] > 0
                    and self.share_item_table),
               "model.pretrained_frozen=true with model.pretrained_items: the user history bag would pool the "
               "shared item table without the frozen pre-trained term (matched rows start at zero); set "
               "model.share_item_table=false (a history table of its own)")
        _check(self.stack_spectral_dim >= 0, f"model.stack_spectral_dim must be >= 0, got {self.stack_spectral_dim}")
        if self.stack_spectral_dim:
            weights = list(self.stack_spectral_weights)
            _check(len(weights) > 0, "model.stack_spectral_weights: give at least one weight")
            _check(all(w > 0 for w in weights),
                   f"model.stack_spectral_weights must be positive weights (w = 0 is always tried), got {weights}")
            _check(self.init != "spectral", "model.stack_spectral_dim stacks the spectral closed form onto trained "
                   "towers; with model.init=spectral the model is that closed form already")
            _check(self.spectral_niter >= 0, f"model.spectral_niter must be >= 0, got {self.spectral_niter}")


@dataclass
class LossConfig:
    """Sampled softmax over in-batch negatives from every rank plus uniform negatives."""

    name: str = "sampled_softmax"
    """``sampled_softmax`` or ``bpr`` (each positive against one uniform negative, the classic reference)."""
    temperature: float = 0.2
    """Logits are scores / temperature."""
    margin: float = 0.0
    """Additive margin: the positive's score is lowered by this before the softmax (AM-softmax;
    the cosine contrastive loss' margin idea)."""
    l2: float = 0.0
    """L2 penalty on the batch's embeddings before normalisation (per row, averaged)."""
    num_negatives: int = 256
    """Uniform negatives per step over all ranks (each rank samples num_negatives / world_size)."""
    logq_correction: bool = True
    """Subtract log of each candidate's sampling probability (popularity for in-batch ones)."""
    mask_accidental_hits: bool = True
    """Mask candidates that are the row's own item or another row of the same user."""

    def __post_init__(self) -> None:
        _check(self.name in ("sampled_softmax", "bpr"), f"loss.name must be sampled_softmax or bpr, got {self.name!r}")
        _check(self.l2 >= 0, f"loss.l2 must be >= 0, got {self.l2}")
        _check(self.temperature > 0, f"loss.temperature must be positive, got {self.temperature}")
        _check(self.num_negatives >= 0, f"loss.num_negatives must be >= 0, got {self.num_negatives}")


@dataclass
class OptimConfig:
    """Fused in-backward optimizer of the embedding tables, and the optimizer of dense parameters."""

    name: str = "rowwise_adagrad"
    """Table optimizer: ``rowwise_adagrad`` (CPU and GPU) or ``sgd``."""
    lr: float = 0.3
    eps: float = 1e-8
    dense_lr: float = 1e-3
    """Learning rate of Adam for dense parameters (none in ``mf``)."""
    stochastic_rounding: bool = True
    """fp16 tables on CUDA: round each update stochastically (FBGEMM's default: small updates are
    not lost on average); off: to nearest, as the CPU kernels always do."""

    def __post_init__(self) -> None:
        _check(self.name in ("rowwise_adagrad", "sgd"), f"optim.name must be rowwise_adagrad or sgd, got {self.name!r}")
        _check(self.lr > 0, f"optim.lr must be positive, got {self.lr}")


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 8
    max_steps: Optional[int] = None
    """Stop after this many steps (a cap for short runs); None: run all epochs."""
    batch_size: int = 1024
    """Global batch: interactions per step over all ranks (divisible by the world size)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    timeout_minutes: float = 120.0
    """How long a rank waits in a collective, e.g. for rank 0 to prepare the dataset: prepare a very
    large one first (``python -m recsys.prepare``) or raise this."""
    sharding_types: List[str] = field(default_factory=list)
    """Restrict the planner (e.g. [row_wise]); empty: the planner chooses."""
    prefetch_batches: int = 4
    """Batches built (and pinned, on CUDA) ahead of the step in a background thread, so that the
    step does not wait for numpy; 0: built in the training thread."""
    patience: int = 0
    """With a validation split: stop after this many validations without improvement (0: never
    stop early). The best validated weights are restored before the test evaluation and export."""
    log_every_steps: int = 20
    progress: bool = True
    """Show a tqdm progress bar (rank 0)."""
    checkpoint_every_steps: int = 1000
    """Write a checkpoint (``<run_dir>/checkpoints/step_N``: tables, dense weights, optimizer state,
    data position, RNG states, loop state) every N steps; 0: none during training."""
    checkpoint_every_minutes: float = 0.0
    """Also write one when this many minutes have passed since the last (0: no time trigger)."""
    checkpoint_at_end: bool = True
    """Write a checkpoint when training ends (``python -m recsys.evaluate`` / ``recsys.export`` read it)."""
    keep_checkpoints: int = 2
    """Keep the newest N complete checkpoints."""
    resume: str = "auto"
    """``auto``: continue from the newest complete checkpoint of the run directory, if any;
    ``never``: start afresh (the run directory must not hold another run); or a checkpoint (or run)
    directory to continue from (its tables must match this config)."""
    overwrite: bool = False
    """Replace a different run (another config) found in the run directory instead of refusing."""
    warm_start: Optional[str] = None
    """An earlier run (its directory, or one of its checkpoint directories) whose trained id tables
    this run starts from, on a new dataset (daily retraining): ids known to both runs keep their
    rows (old row -> raw id -> new row, through both prepared datasets' vocabularies; with hashed
    ids a row gets the mean of its ids' old vectors), new ids get the usual initialisation, ids
    gone are counted. Carries ``user``, ``item`` and a two_tower's ``history`` / ``item_history``
    tables present in both models (same model.name and embedding_dim). Only when the run starts
    afresh, not when it resumes its own checkpoint. The figures are in metrics.json (``warm_start``)."""
    warm_start_optimizer: bool = False
    """``warm_start``: also carry the fused table optimizer's per-row state (row-wise Adagrad's
    momentum) of the carried rows (new rows start with none)."""

    def __post_init__(self) -> None:
        _check(self.timeout_minutes > 0, f"train.timeout_minutes must be positive, got {self.timeout_minutes}")
        _check(self.prefetch_batches >= 0, f"train.prefetch_batches must be >= 0, got {self.prefetch_batches}")
        _check(self.epochs >= 0, f"train.epochs must be >= 0 (0: no training, e.g. model.init=spectral), got {self.epochs}")
        _check(self.checkpoint_every_steps >= 0, f"train.checkpoint_every_steps must be >= 0, got {self.checkpoint_every_steps}")
        _check(self.checkpoint_every_minutes >= 0, f"train.checkpoint_every_minutes must be >= 0, got {self.checkpoint_every_minutes}")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(bool(self.resume), "train.resume must be auto, never or a checkpoint directory")
        _check(not self.warm_start_optimizer or bool(self.warm_start),
               "train.warm_start_optimizer=true carries an earlier run's optimizer state: set train.warm_start too")
        _check(self.max_steps is None or self.max_steps > 0, f"train.max_steps must be positive, got {self.max_steps}")
        _check(self.batch_size > 0, f"train.batch_size must be positive, got {self.batch_size}")
        _check(self.patience >= 0, f"train.patience must be >= 0, got {self.patience}")
        _check(self.log_every_steps > 0, f"train.log_every_steps must be positive, got {self.log_every_steps}")
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {self.device!r}")
        known = {"table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise"}
        for t in self.sharding_types:
            _check(t in known, f"train.sharding_types: unknown sharding type {t!r} (known: {sorted(known)})")


@dataclass
class EvalConfig:
    """Exact full-corpus ranking metrics with each user's training items masked."""

    ks: List[int] = field(default_factory=lambda: [10, 20, 50])
    user_chunk: int = 1024
    """At most this many users per score block and per tower call (the evaluator takes fewer per
    block when fewer fit in ``score_budget_mb``, and about 32 MB worth on CPU, where larger
    blocks fall out of the cache)."""
    popularity: bool = True
    """Also evaluate the popularity baseline with the same evaluator."""
    select_metric: str = "recall@20"
    """With a validation split: the validation metric that picks the best epoch."""
    test_every_epoch: bool = False
    """Also record test metrics after every epoch (a learning curve to look at; never used to
    select anything)."""
    max_users: int = 100_000
    """Evaluate a random sample of at most this many of the users that have test items (0: all of
    them; the LightGCN benchmarks have fewer than 100,000, so all are evaluated). The sample's
    seed is fixed (``recsys.data.eval_sets.EVAL_SAMPLE_SEED``), not ``seed``: runs that differ in their
    training seed are evaluated on the same users."""
    item_chunk: int = 0
    """Items per score block (0: all items when 64 users x all items fit in ``score_budget_mb``,
    else as many as fit); the exact top K is kept running across the item blocks."""
    score_budget_mb: int = 256
    """Memory of the score blocks (float32, users x items) in MB, shared by the evaluation threads.
    Besides the blocks, every rank holds all item vectors (items x dim), its users' vectors and the
    evaluated users' item sets."""

    run_dir: Optional[str] = None
    """``python -m recsys.evaluate``: the training run (or one checkpoint directory of it) to
    evaluate (required there; training ignores it)."""

    @property
    def select_k(self) -> int:
        """The K of ``select_metric``."""
        return int(self.select_metric.partition("@")[2])

    @property
    def valid_ks(self) -> List[int]:
        """The Ks of the validation metrics: ``ks`` and the K of ``select_metric``."""
        return sorted(set(self.ks) | {self.select_k})

    def __post_init__(self) -> None:
        _check(len(self.ks) > 0 and all(k > 0 for k in self.ks), f"eval.ks must be positive integers, got {self.ks}")
        _check(self.user_chunk > 0, f"eval.user_chunk must be positive, got {self.user_chunk}")
        _check(self.max_users >= 0, f"eval.max_users must be >= 0, got {self.max_users}")
        _check(self.item_chunk >= 0, f"eval.item_chunk must be >= 0, got {self.item_chunk}")
        _check(self.score_budget_mb > 0, f"eval.score_budget_mb must be positive, got {self.score_budget_mb}")
        metric, _, k = self.select_metric.partition("@")
        _check(metric in ("recall", "ndcg") and k.isdigit() and int(k) > 0,
               f"eval.select_metric must be recall@K or ndcg@K, got {self.select_metric!r}")


@dataclass
class ExportConfig:
    """Vectors written with their raw ids, and the serving artefacts built from them.

    Used at the end of training (rank 0) and by ``python -m recsys.export export.run_dir=DIR``."""

    enabled: bool = True
    """Training: export the vectors at the end of the run."""
    dir: str = "export"
    """Relative to the run directory."""
    run_dir: Optional[str] = None
    """``python -m recsys.export``: the training run directory whose export is completed (required
    there; training ignores it)."""
    source: str = "auto"
    """``python -m recsys.export``: where the vectors come from: ``vectors`` (the run's exported
    Parquet files, checksums verified), ``checkpoint`` (recomputed from the run's newest complete
    checkpoint) or ``auto`` (the exported files when the run has them, else the checkpoint)."""
    npy: bool = False
    """Also write ``items.npy`` / ``users.npy`` (float32 [N, D]) and ``items_ids.npy`` /
    ``users_ids.npy`` (the raw ids: integers or unicode strings, loaded without pickle)."""
    faiss: str = "none"
    """A FAISS index of the item vectors, inner-product metric (cosine vectors are unit-norm):
    ``none``, ``flat`` (exact), ``ivf`` (IVF-Flat) or ``hnsw`` (HNSW-Flat)."""
    ivf_nlist: int = 0
    """``ivf``: inverted lists (k-means cells); 0: 4 sqrt(num_items), at most num_items / 39."""
    ivf_nprobe: int = 16
    """``ivf``: cells visited per query (stored in the index; capped at nlist)."""
    hnsw_m: int = 32
    """``hnsw``: neighbours per node of the graph (M)."""
    hnsw_ef_construction: int = 200
    """``hnsw``: candidate list size while building (efConstruction)."""
    hnsw_ef_search: int = 128
    """``hnsw``: candidate list size while searching (efSearch, stored in the index; FAISS uses at
    least K)."""
    ann_k: int = 100
    """The index's recall@K against exact search and its throughput are measured at this K
    (capped at the number of items)."""
    ann_sample_users: int = 1000
    """Number of users (a seeded sample; all if fewer) whose vectors are the measurement's queries."""
    ann_seed: int = 0
    """Seed of that sample."""

    def __post_init__(self) -> None:
        kinds = ("none", "flat", "ivf", "hnsw")
        _check(self.faiss in kinds, f"export.faiss must be one of {', '.join(kinds)}, got {self.faiss!r}")
        _check(self.source in ("auto", "vectors", "checkpoint"),
               f"export.source must be auto, vectors or checkpoint, got {self.source!r}")
        _check(self.ivf_nlist >= 0, f"export.ivf_nlist must be >= 0, got {self.ivf_nlist}")
        for name in ("ivf_nprobe", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ann_k", "ann_sample_users"):
            _check(getattr(self, name) > 0, f"export.{name} must be positive, got {getattr(self, name)}")


@dataclass
class LogConfig:
    """What a run leaves to look at besides metrics.json (written by rank 0 only)."""

    tensorboard: bool = False
    """Write TensorBoard scalars to <run_dir>/tensorboard: the loss every ``train.log_every_steps``
    steps, learning rate, interactions/s, and the eval metrics of each epoch and of the end."""
    plots: bool = True
    """At the end of the run: PNG plots in the run directory (loss and metrics over steps, item
    popularity, vector norms), embedded in its ``summary.md``."""


@dataclass
class PlanConfig:
    """The dry run (``python -m recsys.plan``): plan a cluster's sharding in one process, on any machine."""

    world_size: int = 8
    """Ranks (GPUs) of the job to plan for."""
    device: str = "cuda"
    """Device type of the job: ``cuda`` or ``cpu``. Only numbers are used; no device is touched."""
    local_world_size: int = 8
    """Ranks per node (GPUs per node); capped at ``world_size``."""
    hbm_gib: Optional[float] = None
    """GPU memory per rank in GiB; None: TorchRec's default (32 GiB). (``recsys.train`` plans with
    the memory of the GPU it runs on.) The planner keeps 15% of it for dense parts and activations."""
    ddr_gib: Optional[float] = None
    """Host memory per rank in GiB (tables on ``cpu``, UVM-offloaded tables on ``cuda``);
    None: TorchRec's default (128 GiB), as in ``recsys.train``."""
    num_users: int = 0
    """Rows of the user tables; 0: read from the prepared dataset (prepared now if needed)."""
    num_items: int = 0
    """Rows of the item tables; 0: read from the prepared dataset. Set both to plan without data."""
    verbose: bool = False
    """Also log TorchRec's own planner statistics table (per-rank perf, inputs and outputs)."""

    def __post_init__(self) -> None:
        _check(self.world_size >= 1, f"plan.world_size must be >= 1, got {self.world_size}")
        _check(self.device in ("cuda", "cpu"), f"plan.device must be cuda or cpu, got {self.device!r}")
        _check(self.local_world_size >= 1, f"plan.local_world_size must be >= 1, got {self.local_world_size}")
        for name in ("hbm_gib", "ddr_gib"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"plan.{name} must be positive, got {value}")
        _check(self.num_users >= 0 and self.num_items >= 0, "plan.num_users and plan.num_items must be >= 0")
        _check((self.num_users == 0) == (self.num_items == 0),
               "plan.num_users and plan.num_items go together: set both (no data is read) or neither")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    log: LogConfig = field(default_factory=LogConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        columns = set(self.data.item_features.columns) | set(self.data.user_features.columns)
        for name in self.model.feature_weights:
            _check(name in columns, f"model.feature_weights.{name}: no such feature column (data.item_features.columns "
                   f"/ data.user_features.columns: {sorted(columns)})")
        if self.data.split == "cold_items":
            _check(self.data.item_features.path is not None,
                   "data.split=cold_items holds items out with all their interactions: they get vectors from their "
                   "features alone, so it needs data.item_features.path and data.item_features.columns")
        if columns:
            _check(self.model.init != "spectral", "model.init=spectral computes id tables in closed form; it does not "
                   "take side features (data.item_features / data.user_features)")
        _check(self.train.epochs > 0 or self.model.init == "spectral",
               "train.epochs=0 trains nothing: it is for model.init=spectral (the closed-form tables)")
        _check(not self.train.warm_start or not (self.model.pretrained_items or self.model.pretrained_users
                                                 or self.model.init == "spectral"),
               "train.warm_start starts the tables from an earlier run; model.pretrained_items / pretrained_users "
               "and model.init=spectral start them otherwise: use one of them")
        if self.model.stack_spectral_dim and len(set(self.model.stack_spectral_weights)) > 1:
            _check(self.data.valid_fraction > 0,
                   "model.stack_spectral_weights: several weights are chosen among on the validation holdout: "
                   "set data.valid_fraction > 0 (or give one weight)")


# ---------------------------------------------------------------------------------------------
# Checks that need the world size or the data, and options a configuration does not use
# ---------------------------------------------------------------------------------------------


def memory_reason(cfg: Config) -> Optional[str]:
    """Why the model of `cfg` needs the dataset in memory (None when it can stream): its user tower
    pools each user's training items, or its item tower each item's users (history bags, built
    from the whole dataset). An ``mf`` model has no bag, whatever ``model.history_weight`` says.
    The spectral closed form streams (each rank reads its own users' training pairs)."""
    history, item_history = cfg.model.history_weights
    if history > 0 or item_history > 0:
        return (f"model={cfg.model.name} with history bags (model.history_weight={history}, "
                f"model.item_history_weight={item_history}) needs each user's training items, held by the "
                "memory loader only")
    return None


def check_world_size(cfg: Config, world: int, name: Optional[str] = None) -> None:
    """The global batch and the uniform negatives are split evenly over `world` ranks (`name`: how
    the message calls the world size)."""
    name = name or f"the world size {world}"
    _check(cfg.train.batch_size % world == 0, f"train.batch_size={cfg.train.batch_size} is not divisible by {name}")
    _check(cfg.loss.num_negatives % world == 0,
           f"loss.num_negatives={cfg.loss.num_negatives} is not divisible by {name}")


def check_data(cfg: Config, num_users: int, num_items: int, num_fit: Optional[int] = None,
               has_valid: Optional[bool] = None) -> None:
    """What the data's sizes must allow: K within the catalogue, an IVF index with fewer cells than
    items, a stacked closed form narrower than the tables, a batch no larger than the training
    interactions, a validation holdout to choose stacking weights on (the last two when `num_fit` /
    `has_valid` are known)."""
    kmax = max([*cfg.eval.ks, cfg.eval.select_k])
    _check(kmax <= num_items, f"eval.ks / eval.select_metric: K={kmax} is larger than the number of items ({num_items})")
    if cfg.export.enabled and cfg.export.faiss == "ivf":
        _check(cfg.export.ivf_nlist <= num_items,
               f"export.ivf_nlist={cfg.export.ivf_nlist} is larger than the number of items ({num_items})")
    _check(cfg.model.stack_spectral_dim <= min(num_users, num_items),
           f"model.stack_spectral_dim={cfg.model.stack_spectral_dim} is larger than the number of users ({num_users}) "
           f"or items ({num_items})")
    if has_valid is not None and cfg.model.stack_spectral_dim and len(set(cfg.model.stack_spectral_weights)) > 1:
        _check(has_valid, f"model.stack_spectral_weights: data.valid_fraction={cfg.data.valid_fraction} left no "
               "validation interaction (users with few items keep them all) to choose the weight on; raise it or "
               "give one weight")
    if num_fit is not None:
        _check(num_fit >= cfg.train.batch_size,
               f"train.batch_size={cfg.train.batch_size} is larger than the {num_fit} training interactions")


def ignored_options(cfg: Config, loader: str, has_valid: Optional[bool] = None) -> List[str]:
    """One line per option set away from its default that this configuration does not use, naming
    the option and why (``recsys.train`` logs each once): `loader` is ``data.loader`` resolved;
    `has_valid` whether the prepared data have a validation holdout (None: unknown)."""
    out: List[str] = []
    defaults = Config()

    def unused(group: str, names, why: str) -> None:
        for name in names:
            value = getattr(getattr(cfg, group), name)
            if value != getattr(getattr(defaults, group), name):
                shown = str(value).lower() if isinstance(value, bool) else value
                out.append(f"{group}.{name}={shown} does nothing: {why}")

    m, loss = cfg.model, cfg.loss
    bag_options = ("history_pooling", "history_max_len", "share_item_table", "projection", "history_dropout",
                   "history_exclude_target")
    if m.name == "mf":
        unused("model", ("history_weight", *bag_options, "item_history_weight", "item_history_max_len"),
               "model=mf has no history bag (model=two_tower has)")
    else:
        if m.history_weight == 0:
            unused("model", bag_options, "model.history_weight=0 (no history bag)")
        if m.item_history_weight == 0:
            unused("model", ("item_history_max_len",), "model.item_history_weight=0 (no item history bag)")
    if m.init != "spectral" and not m.stack_spectral_dim:
        unused("model", ("spectral_alpha", "spectral_niter"),
               "neither model.init=spectral nor model.stack_spectral_dim uses the spectral closed form")
    holdout = has_valid if has_valid is not None else cfg.data.valid_fraction > 0
    if not (m.init == "spectral" and cfg.train.epochs == 0 and holdout):
        unused("model", ("spectral_refit",), "only model.init=spectral with train.epochs=0 and a validation holdout "
                                              "refits the closed form")
    if not m.stack_spectral_dim:
        unused("model", ("stack_spectral_weights",), "model.stack_spectral_dim=0 (no stacking)")
    if loss.name == "bpr":
        for name, value in (("logq_correction", loss.logq_correction),
                            ("mask_accidental_hits", loss.mask_accidental_hits), ("margin", loss.margin)):
            if value:  # loss=bpr sets them off; the sampled softmax's defaults do nothing here
                shown = str(value).lower() if isinstance(value, bool) else value
                out.append(f"loss.{name}={shown} does nothing: loss=bpr scores each positive against one "
                           "uniform negative (no softmax over candidates)")
    if not (cfg.data.item_features.path or cfg.data.user_features.path):
        unused("model", ("feature_pooling", "feature_combine"),
               "no side features (data.item_features / data.user_features)")
    if cfg.optim.name == "sgd":
        unused("optim", ("eps",), "optim.name=sgd has no eps")
    if not (m.name == "two_tower" and m.history_weight > 0 and m.projection):
        unused("optim", ("dense_lr",), "the model has no dense parameter (only model.projection=true adds one)")
    d = cfg.data
    if loader == "memory":
        unused("data", ("num_workers", "shuffle_buffer", "row_group_size"),
               "the dataset is read in memory (they are options of data.loader=stream)")
    if d.loader != "auto":
        unused("data", ("stream_min_rows",), f"data.loader={d.loader} is not chosen by size")
    if d.name != "csv":
        unused("data", ("separator",), f"data={d.name} is not CSV")
    if d.test_path and d.split != "given":
        out.append(f"data.test_path={d.test_path} does nothing: data.split={d.split} makes the test split itself")
    if d.name != "synthetic":
        unused("data", ("num_interactions", "latent_dim", "popularity_exponent", "affinity"),
               f"data={d.name} reads files (they shape the synthetic data)")
    if d.weight_column:
        out.append(f"data.weight_column={d.weight_column} does nothing yet: the column is kept in the prepared "
                   "data, but the loss counts every interaction once")
    if has_valid is False and cfg.train.patience:
        out.append(f"train.patience={cfg.train.patience} does nothing: no validation split (data.valid_fraction)")
    e = cfg.export
    if not e.enabled:
        unused("export", ("npy", "faiss"), "export.enabled=false (python -m recsys.export adds them later)")
    elif e.faiss != "ivf":
        unused("export", ("ivf_nlist", "ivf_nprobe"), f"export.faiss={e.faiss} is not an IVF index")
    if e.enabled and e.faiss != "hnsw":
        unused("export", ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"), f"export.faiss={e.faiss} is not HNSW")
    if e.enabled and e.faiss == "none":
        unused("export", ("ann_k", "ann_sample_users", "ann_seed"), "export.faiss=none measures no index")
    return out


GROUPS = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
    "log": LogConfig,
    "plan": PlanConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=node)


def _parent_start_time() -> Optional[float]:
    """Start time (epoch seconds) of the parent process: torchrun, shared by its local ranks."""
    try:
        ticks = int(open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_id() -> str:
    """The run directory's name, identical on every rank of a job.

    ``RECSYS_RUN_ID`` when set (jobs/*.sh set it); under torchrun, the launcher's start time
    (and its rendezvous id on multi-node jobs); otherwise the current time."""
    if os.environ.get("RECSYS_RUN_ID"):
        return os.environ["RECSYS_RUN_ID"]
    stamp = time.time()
    if "LOCAL_RANK" in os.environ:
        stamp = _parent_start_time() or stamp
        rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if rdzv not in ("", "none") and int(os.environ.get("WORLD_SIZE", 1)) > int(os.environ.get("LOCAL_WORLD_SIZE", 1)):
            return time.strftime("%Y-%m-%d", time.localtime(stamp)) + f"/{rdzv}"
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(stamp))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("recsys_run_id"):
        OmegaConf.register_new_resolver("recsys_run_id", run_id, use_cache=True)
