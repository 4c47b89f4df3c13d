"""The dot-product model: user and item embedding tables (single-device code).

Tables are TorchRec ``EmbeddingBagCollection``s built on the meta device; sharding, the planner
and the fused optimizers are applied in ``recsys.parallelize``. A user's score for an item is the
dot product of the two vectors (of L2-normalised vectors when ``normalize``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data import ITEM_FEATURE, USER_FEATURE, Batch
from recsys.loss import sampled_softmax_loss

# The train pipeline traces forward() to find the sharded modules; the loss (collectives
# inside) is recorded as one call rather than traced through.
torch.fx.wrap("sampled_softmax_loss")


class TwoTower(nn.Module):
    """Matrix factorisation as a two-tower model: each tower is one id embedding table."""

    def __init__(self, num_users: int, num_items: int, embedding_dim: int, normalize: bool,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.normalize = normalize
        device = device or torch.device("meta")
        self.user_ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="user", embedding_dim=embedding_dim, num_embeddings=num_users,
                                       feature_names=[USER_FEATURE], pooling=PoolingType.SUM)],
            device=device,
        )
        self.item_ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="item", embedding_dim=embedding_dim, num_embeddings=num_items,
                                       feature_names=[ITEM_FEATURE], pooling=PoolingType.SUM)],
            device=device,
        )

    def user_vectors(self, users: KeyedJaggedTensor) -> torch.Tensor:
        v = self.user_ebc(users).values()
        return F.normalize(v, dim=-1) if self.normalize else v

    def item_vectors(self, items: KeyedJaggedTensor) -> torch.Tensor:
        v = self.item_ebc(items).values()
        return F.normalize(v, dim=-1) if self.normalize else v


class RetrievalTask(nn.Module):
    """The training task: the model plus its sampled-softmax loss, as the train pipeline wants it
    (``forward(batch) -> (loss, outputs)``)."""

    def __init__(self, model: TwoTower, temperature: float, mask_accidental_hits: bool,
                 item_log_prob: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.mask_accidental_hits = mask_accidental_hits
        # A plain attribute, not a buffer: nothing to broadcast or checkpoint.
        self.item_log_prob = item_log_prob
        self.num_items = 0 if item_log_prob is None else len(item_log_prob)

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor]]:
        user_vecs = self.model.user_vectors(batch.users)
        item_vecs = self.model.item_vectors(batch.items)
        loss = sampled_softmax_loss(user_vecs, item_vecs, batch.user_ids, batch.item_ids, self.temperature,
                                    self.mask_accidental_hits, self.item_log_prob, self.num_items)
        return loss, (loss.detach(),)
