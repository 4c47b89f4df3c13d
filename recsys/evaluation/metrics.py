"""Evaluating a model: Recall@K / NDCG@K of a (sharded) two-tower model and of the popularity
baseline on an ``EvalSplit``, and the per-epoch evaluation the training loop is given.

Every rank evaluates the split's users that are its own (``recsys.distributed.owned_share``: the
users of its rows of the user table, whose sets it read) with
the metric kernel (``recsys.evaluation.ranking``); the item vectors are computed a share per rank
and gathered (``recsys.evaluation.vectors``). Collective.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from recsys.config import EvalConfig
from recsys.data.eval_sets import EvalSets, EvalSplit, all_test_scale, as_item_sets
from recsys.data.features import SideFeatures
from recsys.distributed import owned_share
from recsys.evaluation.ranking import ranking_metric_sums, reduce_means
from recsys.evaluation.vectors import all_vectors, item_tower, tower_outputs, user_tower


def _means(sums: Dict[str, float], split: EvalSplit, device: torch.device) -> Dict[str, float]:
    """The means over the evaluated users; the ``all_`` figures (over all test interactions, those
    without a vector missed) moved to an ``all`` entry, averaged over every test user."""
    out = reduce_means(sums, device)
    every = {key[len("all_"):]: out.pop(key) * all_test_scale(split) for key in list(out) if key.startswith("all_")}
    if every:
        every["users"] = split.users_of + split.users_without_vectors
        out["all"] = every
    return out


def _missing(split: EvalSplit, local: np.ndarray, all_test: bool) -> Optional[np.ndarray]:
    return split.missing[local] if all_test and split.missing is not None else None


@torch.no_grad()
def evaluate_model(model, split: EvalSplit, ks: Sequence[int], device: torch.device,
                   options: EvalConfig, all_test: bool = False) -> Dict[str, float]:
    """Recall/NDCG of a two-tower model (plain or sharded, or anything with its ``embedding_dim``,
    ``user_vectors`` and ``item_vectors``), averaged over the split's evaluated users; the block
    sizes from `options` (``user_chunk``, ``item_chunk``, ``score_budget_mb``). With `all_test`
    (and a split that knows its missing interactions) also ``all``: the figures over all test
    interactions, those without a vector counted as misses. Collective."""
    dim, chunk, n = model.embedding_dim, options.user_chunk, split.num_items
    masked, relevant = as_item_sets(split.masked, n), as_item_sets(split.relevant, n)
    item_vecs = all_vectors(item_tower(model, split.features, device), n, dim, device, chunk)
    local, max_local = owned_share(np.asarray(split.users, dtype=np.int64), split.num_users)
    user_vecs = tower_outputs(user_tower(model, split.features, device), local, -(-max_local // chunk), chunk, dim,
                              device)
    sums = ranking_metric_sums(user_vecs, item_vecs, local, masked, relevant, ks, chunk, options.item_chunk,
                               options.score_budget_mb, _missing(split, local, all_test))
    return _means(sums, split, device)


def evaluate_popularity(item_counts: np.ndarray, split: EvalSplit, ks: Sequence[int], device: torch.device,
                        options: EvalConfig, all_test: bool = False) -> Dict[str, float]:
    """The most-popular-items baseline (item score = training count, training items masked), with
    the same evaluator and users as ``evaluate_model`` (any per-item score: `item_counts`)."""
    n = len(item_counts)
    masked, relevant = as_item_sets(split.masked, n), as_item_sets(split.relevant, n)
    local, _ = owned_share(np.asarray(split.users, dtype=np.int64), split.num_users)
    item_vecs = torch.from_numpy(np.asarray(item_counts, dtype=np.float32))[:, None].to(device)
    user_vecs = torch.ones(len(local), 1, device=device)
    sums = ranking_metric_sums(user_vecs, item_vecs, local, masked, relevant, ks, options.user_chunk,
                               options.item_chunk, options.score_budget_mb, _missing(split, local, all_test))
    return _means(sums, split, device)


def feature_popularity(side: SideFeatures, item_counts: np.ndarray) -> np.ndarray:
    """The popularity-within-features baseline's item scores: for each feature column, the mean
    training count of the items (with interactions) that share each of the item's values,
    averaged over the item's values, summed over the columns. The same score for every item,
    with or without interactions: what its features alone say of its popularity."""
    counts = np.asarray(item_counts, dtype=np.float64)
    scores = np.zeros(len(counts))
    for bag, size in zip(side.bags, side.sizes):
        lengths = bag.counts()
        rows = np.repeat(np.arange(len(lengths)), lengths)
        trained = side.has_id(rows)
        total = np.bincount(bag.indices[trained], weights=counts[rows[trained]], minlength=size)
        items = np.bincount(bag.indices[trained], minlength=size)
        value_mean = total / np.maximum(items, 1)
        scores += np.bincount(rows, weights=value_mean[bag.indices], minlength=len(counts)) / np.maximum(lengths, 1)
    return scores


def epoch_evaluator(sets: EvalSets, options: EvalConfig,
                    device: torch.device) -> Optional[Callable[[torch.nn.Module], Dict[str, Dict]]]:
    """What the training loop evaluates after each epoch: ``{"valid": ...}`` on the validation
    split (model selection, at ``options.valid_ks``) and, with ``eval.test_every_epoch``,
    ``{"test": ...}`` (a learning curve, never used to select). None when there is neither."""
    if sets.valid is None and not options.test_every_epoch:
        return None

    def evaluate(model) -> Dict[str, Dict]:
        out = {}
        if sets.valid is not None:
            out["valid"] = evaluate_model(model, sets.valid, options.valid_ks, device, options)
        if options.test_every_epoch:
            out["test"] = evaluate_model(model, sets.test, options.ks, device, options)
        return out

    return evaluate
