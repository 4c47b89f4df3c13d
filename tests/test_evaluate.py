"""The evaluator against a brute-force numpy computation of the same metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.data import CSR
from recsys.evaluate import evaluate_popularity, ranking_metric_sums, reduce_means


def brute_force(scores: np.ndarray, train: list, test: list, ks) -> dict:
    """Per-user loops in numpy: mask train items, full argsort, LightGCN-protocol metrics."""
    out = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg")}
    for u in range(scores.shape[0]):
        if not test[u]:
            continue
        s = scores[u].astype(np.float64).copy()
        s[list(train[u])] = -np.inf
        ranking = np.argsort(-s, kind="stable")
        for k in ks:
            top = ranking[:k]
            hits = [1.0 if i in test[u] else 0.0 for i in top]
            out[f"recall@{k}"].append(sum(hits) / len(test[u]))
            dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / np.log2(r + 2) for r in range(min(k, len(test[u]))))
            out[f"ndcg@{k}"].append(dcg / idcg)
    return {k: float(np.mean(v)) for k, v in out.items()}


def random_split(num_users, num_items, rng):
    train, test = [], []
    for _ in range(num_users):
        items = rng.permutation(num_items)[: rng.integers(0, 30)]
        cut = rng.integers(0, len(items) + 1)
        train.append(set(items[:cut].tolist()))
        test.append(set(items[cut:].tolist()))
    return train, test


def to_csr(lists, num_users):
    users = np.concatenate([[u] * len(s) for u, s in enumerate(lists)] + [np.zeros(0)]).astype(np.int64)
    items = np.concatenate([sorted(s) for s in lists] + [np.zeros(0)]).astype(np.int64)
    return CSR.from_pairs(users, items, num_users)


@pytest.mark.parametrize("chunk", [7, 1024])
def test_metrics_match_brute_force(chunk):
    rng = np.random.default_rng(0)
    num_users, num_items, dim, ks = 120, 90, 6, [1, 5, 20, 50]
    user_vecs = rng.standard_normal((num_users, dim)).astype(np.float32)
    item_vecs = rng.standard_normal((num_items, dim)).astype(np.float32)
    train, test = random_split(num_users, num_items, rng)
    assert any(not t for t in test) and any(len(t) > 20 for t in test)  # both edge cases occur
    expected = brute_force(user_vecs @ item_vecs.T, train, test, ks)
    users = np.array([u for u in range(num_users) if test[u]])
    sums = ranking_metric_sums(torch.from_numpy(user_vecs[users]), torch.from_numpy(item_vecs), users,
                               to_csr(train, num_users), to_csr(test, num_users), ks, user_chunk=chunk)
    got = reduce_means(sums, torch.device("cpu"))
    assert got["users"] == len(users)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_training_items_are_masked():
    # One user whose train items are the best-scored ones: with the mask they can't be hits.
    item_vecs = torch.arange(10, dtype=torch.float32)[:, None]
    user_vecs = torch.ones(1, 1)
    train = to_csr([{9, 8}], 1)
    test = to_csr([{7}], 1)
    sums = ranking_metric_sums(user_vecs, item_vecs, np.array([0]), train, test, [1])
    assert sums["recall@1"] == 1.0 and sums["ndcg@1"] == 1.0


def test_popularity_baseline_matches_brute_force():
    rng = np.random.default_rng(1)
    num_users, num_items = 50, 40
    train, test = random_split(num_users, num_items, rng)
    counts = np.zeros(num_items)
    for s in train:
        counts[list(s)] += 1
    counts += rng.random(num_items) * 0.1  # no ties: the ranking is unique
    expected = brute_force(np.tile(counts, (num_users, 1)), train, test, [5, 10])
    got = evaluate_popularity(counts, to_csr(train, num_users), to_csr(test, num_users), [5, 10], torch.device("cpu"))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_k_larger_than_catalogue_is_refused():
    with pytest.raises(ValueError, match="larger than the number of items"):
        ranking_metric_sums(torch.ones(1, 2), torch.ones(3, 2), np.array([0]), to_csr([set()], 1), to_csr([{1}], 1), [5])
