"""Sampled softmax over in-batch negatives gathered from every rank plus uniform negatives.

Each rank holds B positives (user vector, item vector) and N uniformly sampled items. The
candidates of every row are the positive items of all ranks (W*B) followed by the uniform
negatives of all ranks (W*N), gathered with an autograd-aware all-gather so that gradients flow
back to the rank that looked an item up. The loss of one rank is the mean over its rows; the
mean of the ranks' losses is the loss of the single-process global batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from recsys.distributed import rank_and_world

# torch 2.13 renamed all_gather_tensor(_autograd) to all_gather_single(_autograd); 2.11 has the old names.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def gather_rows(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Concatenate `x` of every rank along dim 0 (same shape on every rank)."""
    rank, world = rank_and_world()
    if world == 1:
        return x
    if differentiable:
        return _all_gather_autograd(x, gather_dim=0, group=dist.group.WORLD)
    return _all_gather(x, gather_dim=0, group=dist.group.WORLD).wait()


def sampled_softmax_loss(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    user_ids: torch.Tensor,
    item_ids: torch.Tensor,
    temperature: float,
    mask_accidental_hits: bool = True,
    item_log_prob: Optional[torch.Tensor] = None,
    num_items: int = 0,
    margin: float = 0.0,
) -> torch.Tensor:
    """Mean softmax cross-entropy of this rank's rows over all ranks' candidates.

    Args:
        user_vecs: [B, D] this rank's user vectors.
        item_vecs: [B + N, D] the B positive item vectors followed by N uniform negatives.
        user_ids, item_ids: rows of the same ([B], [B + N]); used to mask accidental hits.
        temperature: logits are scores / temperature.
        mask_accidental_hits: mask candidates equal to the row's positive item, and in-batch
            candidates that belong to another row of the same user (known positives).
        item_log_prob: [num_items] log of each item's share of training interactions; when
            given, the logQ correction subtracts log(expected count of the candidate among the
            sampled candidates): popularity-proportional for in-batch ones, uniform for the rest.
        num_items: catalogue size (needed with item_log_prob).
        margin: subtracted from each row's positive score (before the temperature).
    """
    rank, world = rank_and_world()
    b = user_vecs.shape[0]
    n = item_vecs.shape[0] - b
    pos_all = gather_rows(item_vecs[:b], differentiable=True)
    pos_ids = gather_rows(item_ids[:b], differentiable=False)
    if n > 0:
        neg_all = gather_rows(item_vecs[b:], differentiable=True)
        neg_ids = gather_rows(item_ids[b:], differentiable=False)
        candidates = torch.cat([pos_all, neg_all])
        candidate_ids = torch.cat([pos_ids, neg_ids])
    else:
        candidates, candidate_ids = pos_all, pos_ids
    logits = (user_vecs / temperature) @ candidates.T  # [B, W*B + W*N]; dividing [B, D] is cheaper
    labels = torch.arange(b, device=logits.device) + rank * b

    if item_log_prob is not None:
        in_batch = item_log_prob[pos_ids] + math.log(world * b)
        correction = in_batch
        if n > 0:
            uniform = torch.full((world * n,), math.log(world * n) - math.log(num_items), device=logits.device)
            correction = torch.cat([in_batch, uniform])
        logits = logits - correction

    if margin:
        rows = torch.arange(b, device=logits.device)
        logits[rows, labels] -= margin / temperature
    if mask_accidental_hits:
        hit = candidate_ids[None, :] == item_ids[:b, None]
        all_users = gather_rows(user_ids, differentiable=False)
        hit[:, : world * b] |= all_users[None, :] == user_ids[:, None]
        hit[torch.arange(b, device=logits.device), labels] = False
        logits = logits.masked_fill_(hit, float("-inf"))  # in place: neither mm nor sub needs it back
    return F.cross_entropy(logits, labels)


def bpr_loss(user_vecs: torch.Tensor, item_vecs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BPR: -log sigmoid((s(u, pos) - s(u, neg)) / T), each row against one of the uniform negatives.

    `item_vecs` holds the B positives followed by N >= 1 negatives; row i uses negative i mod N.
    Local to the rank: no candidates are shared."""
    b = user_vecs.shape[0]
    n = item_vecs.shape[0] - b
    if n < 1:
        raise ValueError("bpr_loss needs at least one uniform negative per rank (loss.num_negatives)")
    neg = item_vecs[b:][torch.arange(b, device=item_vecs.device) % n]
    diff = (user_vecs * (item_vecs[:b] - neg)).sum(-1) / temperature
    return -F.logsigmoid(diff).mean()
