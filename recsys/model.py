"""The dot-product model: user and item embedding tables (single-device code).

Tables are TorchRec ``EmbeddingBagCollection``s built on the meta device; sharding, the planner
and the fused optimizers are applied in ``recsys.parallelize``. A user's score for an item is the
dot product of the two vectors (of L2-normalised vectors when ``normalize``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.config import LossConfig, ModelConfig
from recsys.data.features import (HISTORY_FEATURE, ITEM_FEATURE, ITEM_HISTORY_FEATURE, SIDE_PREFIX, USER_FEATURE, Batch,
                                  FeatureSpec)
from recsys.loss import bpr_loss, sampled_softmax_loss

# The train pipeline traces forward() to find the sharded modules; the loss (collectives
# inside) is recorded as one call rather than traced through.
torch.fx.wrap("sampled_softmax_loss")
torch.fx.wrap("bpr_loss")

TABLE_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}
"""``model.table_dtype`` -> the storage type of the table weights (TorchRec's ``data_type``)."""


class FrozenPretrained(nn.Module):
    """Frozen pre-trained vectors of an id table under a trained linear map: ``map(pretrained(row))``.

    The vectors (dimension P, any) sit in a table of their own (``<table>_pretrained``: the id
    table's rows, looked up with its ids) in an ``EmbeddingBagCollection`` of its own, whose
    lookup runs under ``torch.no_grad()``. Why its rows never change: the sharding fuses the table
    optimizer into the lookup kernel's backward (FBGEMM updates the rows there, no gradient is
    kept), and a lookup made without grad records no autograd node, kernel or output
    all-to-all alike (TorchRec's communication ops hang their backward on a tensor that requires
    grad; under no_grad nothing is recorded), so the backward never reaches the kernel: no
    update, not even a zero one. ``nn.Linear(P, D, bias=False)`` is a dense parameter trained by
    the dense optimizer (``reset_parameters``: its start)."""

    def __init__(self, table: str, feature: str, rows: int, dim: int, embedding_dim: int, data_type: DataType,
                 device: torch.device) -> None:
        super().__init__()
        self.feature = feature
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=f"{table}_pretrained", embedding_dim=dim, num_embeddings=rows, feature_names=[feature],
            pooling=PoolingType.SUM, data_type=data_type)], device=device)
        self.map = nn.Linear(dim, embedding_dim, bias=False, device=device)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """The identity when P == D; else a seeded random orthogonal map (orthonormal columns when
        P < D: every vector keeps its norm and every dot product; orthonormal rows when P > D,
        scaled by sqrt(P / D) so that norms are kept on average)."""
        out_dim, in_dim = self.map.weight.shape
        if out_dim == in_dim:
            w = torch.eye(out_dim)
        else:
            g = torch.Generator().manual_seed(seed)
            q, r = torch.linalg.qr(torch.randn(max(out_dim, in_dim), min(out_dim, in_dim), generator=g,
                                               dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))  # the unique (Haar) orthogonal factor
            w = q if out_dim > in_dim else q.T * math.sqrt(in_dim / out_dim)
        self.map.weight.copy_(w.to(self.map.weight.dtype))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        with torch.no_grad():  # see the class docstring: what keeps the rows bit-identical
            pooled = self.ebc(features)[self.feature]
        return self.map(pooled)


class TwoTower(nn.Module):
    """A dot-product two-tower model over TorchRec embedding tables.

    The item tower is the item's id embedding. The user tower is the user's id embedding (matrix
    factorisation) or, with ``history_weight > 0``, the YouTube-DNN / SimpleX form::

        user = (1 - w) * id_embedding(user) + w * P(pool(item embeddings of the user's history))

    where pool is the mean (or sum) of a multi-hot bag (feature ``history``) looked up in the
    item table (``share_item_table``) or a table of its own, and P an optional linear layer.
    With ``item_history_weight > 0`` the item tower is built the same way from the users who
    interacted with the item (feature ``item_history``, a user context table of its own).
    Scores are dot products of the two towers' outputs (of L2-normalised outputs with
    ``normalize``): the exported vectors alone give the score.

    Side features (``side_tables``: per tower, each feature column's name and table size) add a
    table per column (``if_<column>`` in the item collection, ``uf_<column>`` in the user one),
    each row's bag of values pooled (``feature_pooling``: mean or sum) and weighted
    (``feature_weights``, default 1). ``feature_combine="sum"``: the tower's output is its id
    term plus the weighted pooled features; ``"concat"``: the id term and the pooled features
    concatenated, then a linear layer (initialised to the sum). A row without a training
    interaction gets an empty id bag from the data (``recsys.data.features.Features``): its
    vector comes from its features alone (new items and users of the feature files).

    ``table_dtype`` (``fp32`` or ``fp16``) is how every table's weights are stored: with ``fp16``
    the fused kernels (FBGEMM's table-batched embeddings, CPU and CUDA) keep the rows in half
    precision (half the memory and half the bytes per lookup) while the pooled lookups, the towers,
    the loss and the fused optimizer's state stay in float32; each update is computed in float32
    and rounded into the row (to nearest on CPU; stochastically on CUDA, FBGEMM's default, so
    updates smaller than the rounding step are not lost on average).

    ``pretrained_dims`` (``{"item": P, "user": P'}``, either or none): frozen pre-trained vectors
    of that dimension under a trained linear map added to the table's id embedding
    (``FrozenPretrained``, in ``self.pretrained``).
    """

    def __init__(self, num_users: int, num_items: int, embedding_dim: int, normalize: bool,
                 history_weight: float = 0.0, history_pooling: str = "mean", share_item_table: bool = True,
                 projection: bool = False, item_history_weight: float = 0.0,
                 device: Optional[torch.device] = None, table_dtype: str = "fp32",
                 side_tables: Optional[Dict[str, List[Tuple[str, int]]]] = None,
                 feature_weights: Optional[Dict[str, float]] = None, feature_pooling: str = "mean",
                 feature_combine: str = "sum", pretrained_dims: Optional[Dict[str, int]] = None) -> None:
        super().__init__()
        if table_dtype not in TABLE_DTYPES:
            raise ValueError(f"table_dtype must be one of {sorted(TABLE_DTYPES)}, got {table_dtype!r}")
        self.embedding_dim = embedding_dim
        self.normalize = normalize
        self.history_weight = history_weight
        self.history_pooling = history_pooling
        self.share_item_table = share_item_table
        self.item_history_weight = item_history_weight
        device = device or torch.device("meta")
        self.table_dtype = table_dtype
        has_history = history_weight > 0

        def table(name: str, rows: int, features: List[str]) -> EmbeddingBagConfig:
            return EmbeddingBagConfig(name=name, embedding_dim=embedding_dim, num_embeddings=rows,
                                      feature_names=features, pooling=PoolingType.SUM,
                                      data_type=TABLE_DTYPES[table_dtype])

        user_tables = [table("user", num_users, [USER_FEATURE])]
        item_features = [ITEM_FEATURE]
        if has_history and share_item_table:
            item_features.append(HISTORY_FEATURE)
        elif has_history:
            user_tables.append(table("history", num_items, [HISTORY_FEATURE]))
        side_tables = side_tables or {}
        self.side = {role: [name for name, _ in side_tables.get(role, [])] for role in ("user", "item")}
        self.feature_weights = dict(feature_weights or {})
        self.feature_pooling = feature_pooling
        self.feature_combine = feature_combine
        side = {role: [table(SIDE_PREFIX[role] + name, rows, [SIDE_PREFIX[role] + name])
                       for name, rows in side_tables.get(role, [])] for role in ("user", "item")}
        self.user_ebc = EmbeddingBagCollection(tables=user_tables + side["user"], device=device)
        item_tables = [table("item", num_items, item_features)]
        if item_history_weight > 0:
            item_tables.append(table("item_history", num_users, [ITEM_HISTORY_FEATURE]))
        self.item_ebc = EmbeddingBagCollection(tables=item_tables + side["item"], device=device)
        self.projection = nn.Linear(embedding_dim, embedding_dim, bias=False, device=device) if projection and has_history else None
        self.side_projection = nn.ModuleDict({
            role: nn.Linear((1 + len(names)) * embedding_dim, embedding_dim, bias=False, device=device)
            for role, names in self.side.items() if names and feature_combine == "concat"})
        rows = {"user": (num_users, USER_FEATURE), "item": (num_items, ITEM_FEATURE)}
        self.pretrained = nn.ModuleDict({
            t: FrozenPretrained(t, rows[t][1], rows[t][0], p, embedding_dim, TABLE_DTYPES[table_dtype], device)
            for t, p in sorted((pretrained_dims or {}).items())})

    @property
    def has_history(self) -> bool:
        return self.history_weight > 0

    def reset_dense_parameters(self, seed: int = 0) -> None:
        """Dense parts start as the identity (the pooled bag unchanged; the concatenated side
        features summed); the pre-trained maps as ``FrozenPretrained.reset_parameters`` says
        (seeded by `seed` and the table)."""
        with torch.no_grad():
            if self.projection is not None:
                self.projection.weight.copy_(torch.eye(self.embedding_dim, device=self.projection.weight.device))
            for linear in self.side_projection.values():
                eye = torch.eye(self.embedding_dim, device=linear.weight.device)
                linear.weight.copy_(eye.repeat(1, linear.weight.shape[1] // self.embedding_dim))
        for i, (_, term) in enumerate(sorted(self.pretrained.items())):
            term.reset_parameters(seed * 2 + i)

    def _id(self, table: str, kt: KeyedTensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """The id embeddings of `table` (``user`` / ``item``) in `kt`, plus the mapped frozen
        pre-trained vectors (looked up in `features`) when the table has them."""
        v = kt[USER_FEATURE if table == "user" else ITEM_FEATURE]
        if table in self.pretrained:
            v = v + self.pretrained[table](features)
        return v

    def _with_side(self, role: str, v: torch.Tensor, kt: KeyedTensor, counts: torch.Tensor) -> torch.Tensor:
        """A tower's id term `v` combined with its pooled side features (class docstring)."""
        names = self.side[role]
        if not names:
            return v
        n = v.shape[0]
        pooled = []
        for k, name in enumerate(names):
            p = kt[SIDE_PREFIX[role] + name][:n]
            if self.feature_pooling == "mean":
                p = p / counts[:n, k].clamp(min=1.0)[:, None]
            pooled.append(self.feature_weights.get(name, 1.0) * p)
        if self.feature_combine == "concat":
            return self.side_projection[role](torch.cat([v, *pooled], dim=1))
        return v + torch.stack(pooled).sum(0)

    def _combine(self, user_emb: torch.Tensor, pooled: Optional[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
        v = user_emb
        if pooled is not None:
            if self.history_pooling == "mean":
                pooled = pooled / counts.clamp(min=1.0)[:, None]
            if self.projection is not None:
                pooled = self.projection(pooled)
            v = (1.0 - self.history_weight) * user_emb + self.history_weight * pooled
        return v

    def _item(self, item_kt: KeyedTensor, n: int, counts: torch.Tensor, side_counts: torch.Tensor,
              features: KeyedJaggedTensor) -> torch.Tensor:
        v = self._id("item", item_kt, features)[:n]
        if self.item_history_weight > 0:
            pooled = item_kt[ITEM_HISTORY_FEATURE][:n] / counts.clamp(min=1.0)[:, None]
            v = (1.0 - self.item_history_weight) * v + self.item_history_weight * pooled
        return self._with_side("item", v, item_kt, side_counts)

    def _user(self, user_kt: KeyedTensor, pooled: Optional[torch.Tensor], batch: Batch) -> torch.Tensor:
        v = self._combine(self._id("user", user_kt, batch.users), pooled, batch.history_counts)
        return self._with_side("user", v, user_kt, batch.user_feature_counts)

    def finish(self, v: torch.Tensor) -> torch.Tensor:
        """A tower's raw output -> the vector that is scored and exported."""
        return F.normalize(v, dim=-1) if self.normalize else v

    def towers(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Raw (before ``finish``) user vectors [B, D] and item vectors [B + N, D] of a training
        batch, with one lookup per table collection."""
        user_kt = self.user_ebc(batch.users)
        item_kt = self.item_ebc(batch.items)
        b = batch.user_ids.shape[0]
        pooled = None
        if self.has_history:
            pooled = (item_kt if self.share_item_table else user_kt)[HISTORY_FEATURE][:b]
        return self._user(user_kt, pooled, batch), self._item(item_kt, batch.item_ids.shape[0],
                                                              batch.item_history_counts, batch.item_feature_counts,
                                                              batch.items)

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """Vectors of the batch's users (its items are ignored)."""
        user_kt = self.user_ebc(batch.users)
        pooled = None
        if self.has_history:
            b = batch.user_ids.shape[0]
            pooled = (self.item_ebc(batch.items) if self.share_item_table else user_kt)[HISTORY_FEATURE][:b]
        return self.finish(self._user(user_kt, pooled, batch))

    def item_vectors(self, batch: Batch) -> torch.Tensor:
        """Vectors of the batch's items."""
        return self.finish(self._item(self.item_ebc(batch.items), batch.item_ids.shape[0], batch.item_history_counts,
                                      batch.item_feature_counts, batch.items))


class RetrievalTask(nn.Module):
    """The training task: the model plus its loss, as the train pipeline wants it
    (``forward(batch) -> (loss, outputs)``)."""

    def __init__(self, model: TwoTower, loss: str = "sampled_softmax", temperature: float = 0.2,
                 mask_accidental_hits: bool = True, item_log_prob: Optional[torch.Tensor] = None,
                 margin: float = 0.0, l2: float = 0.0, negative_pool: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.temperature = temperature
        self.mask_accidental_hits = mask_accidental_hits
        # A plain attribute, not a buffer: nothing to broadcast or checkpoint.
        self.item_log_prob = item_log_prob
        # the rows uniform negatives are drawn from (their logQ is -log of it): all, or those trained
        self.num_items = negative_pool or (0 if item_log_prob is None else len(item_log_prob))
        self.margin = margin
        self.l2 = l2

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor]]:
        user_raw, item_raw = self.model.towers(batch)
        user_vecs, item_vecs = self.model.finish(user_raw), self.model.finish(item_raw)
        if self.loss == "bpr":
            loss = bpr_loss(user_vecs, item_vecs, self.temperature)
        else:
            loss = sampled_softmax_loss(user_vecs, item_vecs, batch.user_ids, batch.item_ids, self.temperature,
                                        self.mask_accidental_hits, self.item_log_prob, self.num_items, self.margin)
        if self.l2:
            loss = loss + self.l2 * (user_raw.pow(2).sum(-1).mean() + item_raw.pow(2).sum(-1).mean())
        return loss, (loss.detach(),)


def feature_spec(mc: ModelConfig, seed: int) -> FeatureSpec:
    """The bags the model of `mc` pools (``mf``: none, whatever the config's weights say), for the
    data source to build its inputs (`seed`: of the item-history sample)."""
    history_weight, item_history_weight = mc.history_weights
    return FeatureSpec(history=history_weight > 0, history_max_len=mc.history_max_len,
                       share_item_table=mc.share_item_table, history_dropout=mc.history_dropout,
                       history_exclude_target=mc.history_exclude_target, item_history=item_history_weight > 0,
                       item_history_max_len=mc.item_history_max_len, seed=seed)


def build_task(mc: ModelConfig, loss: LossConfig, num_users: int, num_items: int,
               item_log_prob: Optional[torch.Tensor] = None,
               side_tables: Optional[Dict[str, List[Tuple[str, int]]]] = None,
               pretrained_dims: Optional[Dict[str, int]] = None, negative_pool: Optional[int] = None) -> RetrievalTask:
    """The model of `mc` (tables on the meta device) wrapped with the loss of `loss`: what gets
    sharded and trained. The dry run (recsys.plan) builds the same module. `side_tables`: the
    data's side-feature tables (``DataSource.side_tables``); `pretrained_dims`: the dimension of
    each frozen pre-trained table (``model.pretrained_frozen``; read from the files);
    `negative_pool`: how many rows uniform negatives are drawn from (None: all item rows)."""
    history_weight, item_history_weight = mc.history_weights
    model = TwoTower(num_users, num_items, mc.embedding_dim, mc.normalize,
                     history_weight=history_weight,
                     history_pooling=mc.history_pooling, share_item_table=mc.share_item_table,
                     projection=mc.projection,
                     item_history_weight=item_history_weight,
                     table_dtype=mc.table_dtype, side_tables=side_tables, feature_weights=dict(mc.feature_weights),
                     feature_pooling=mc.feature_pooling, feature_combine=mc.feature_combine,
                     pretrained_dims=pretrained_dims)
    return RetrievalTask(model, loss.name, loss.temperature, loss.mask_accidental_hits, item_log_prob,
                         loss.margin, loss.l2, negative_pool)
