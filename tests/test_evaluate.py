"""The evaluator against a brute-force numpy computation of the same metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.config import EvalConfig
from recsys.data.dataset import CSR
from recsys.data.eval_sets import EvalSplit
from recsys.data.features import Features
from recsys.evaluation.metrics import evaluate_popularity
from recsys.evaluation.ranking import ranking_metric_sums, reduce_means


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
def test_metrics_match_brute_force(brute_force, chunk):
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


def test_popularity_baseline_matches_brute_force(brute_force):
    rng = np.random.default_rng(1)
    num_users, num_items = 50, 40
    train, test = random_split(num_users, num_items, rng)
    counts = np.zeros(num_items)
    for s in train:
        counts[list(s)] += 1
    counts += rng.random(num_items) * 0.1  # no ties: the ranking is unique
    expected = brute_force(np.tile(counts, (num_users, 1)), train, test, [5, 10])
    test_csr = to_csr(test, num_users)
    split = EvalSplit(np.flatnonzero(test_csr.counts()), num_users, num_items, Features(), to_csr(train, num_users), test_csr)
    got = evaluate_popularity(counts, split, [5, 10], torch.device("cpu"), EvalConfig())
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_k_larger_than_catalogue_is_refused():
    with pytest.raises(ValueError, match="larger than the number of items"):
        ranking_metric_sums(torch.ones(1, 2), torch.ones(3, 2), np.array([0]), to_csr([set()], 1), to_csr([{1}], 1), [5])


# ---------------------------------------------------------------------------------------------
# Evaluation at scale: blocks of users x items, exact top K with ties, item sets, sampling
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from recsys.data.eval_sets import BitmapSets, CSRSets, eval_users, load_eval_sets, sample_eval_users
from recsys.distributed import owned_share, rank_bounds
from recsys.evaluation.ranking import block_shape


def _problem(seed, num_users, num_items, dim, integer=False, heavy_users=0):
    """Random vectors (integer-valued: many exact ties, also among group maxima) and a split
    where `heavy_users` users have almost every item masked (fewer unmasked items than K)."""
    rng = np.random.default_rng(seed)
    if integer == "three_values":  # every item scores 0, 1 or 2 x the user's scalar: hundreds tie at the top
        user_vecs = rng.choice([-2.0, -1.0, 1.0, 3.0], (num_users, 1)).astype(np.float32)
        item_vecs = rng.integers(0, 3, (num_items, 1)).astype(np.float32)
    elif integer:
        user_vecs = rng.integers(-2, 3, (num_users, dim)).astype(np.float32)
        item_vecs = rng.integers(-2, 3, (num_items, dim)).astype(np.float32)
    else:
        user_vecs = rng.standard_normal((num_users, dim)).astype(np.float32)
        item_vecs = rng.standard_normal((num_items, dim)).astype(np.float32)
    train, test = [], []
    for u in range(num_users):
        if u < heavy_users:
            items = rng.permutation(num_items)
            train.append(set(items[: num_items - 3].tolist()))
            test.append(set(items[num_items - 3 : num_items - 1].tolist()))
            continue
        items = rng.permutation(num_items)[: rng.integers(2, 40)]
        cut = rng.integers(1, len(items))
        train.append(set(items[:cut].tolist()))
        test.append(set(items[cut:].tolist()))
    return user_vecs, item_vecs, train, test


def _sums(user_vecs, item_vecs, users, train, test, ks, **kwargs):
    return ranking_metric_sums(torch.from_numpy(user_vecs[users]), torch.from_numpy(item_vecs), users, train, test,
                               ks, **kwargs)


@pytest.mark.parametrize("integer", [False, True, "three_values"])
def test_blocks_of_users_and_items_match_brute_force(brute_force, integer):
    # 2,000 items and K <= 20: the multi-level (group maxima) path; integer vectors: ties, broken
    # by the lower item row (three values: hundreds of groups tie on their maximum, so keeping
    # only K of them would lose low rows); the first 5 users have fewer unmasked items than K.
    num_users, num_items, ks = 60, 2000, [1, 5, 20]
    user_vecs, item_vecs, train, test = _problem(3, num_users, num_items, 4, integer, heavy_users=5)
    users = np.arange(num_users)
    expected = brute_force(user_vecs @ item_vecs.T, train, test, ks)
    train_csr, test_csr = to_csr(train, num_users), to_csr(test, num_users)
    reference = _sums(user_vecs, item_vecs, users, train_csr, test_csr, ks)
    for key, value in expected.items():
        assert reference[key] / num_users == pytest.approx(value, abs=1e-12), key
    for user_chunk, item_chunk in [(1, 0), (64, 1), (32, 3), (13, 19), (5, 250), (64, 1999), (2, 2000)]:
        got = _sums(user_vecs, item_vecs, users, train_csr, test_csr, ks, user_chunk=user_chunk, item_chunk=item_chunk)
        assert got == reference, (user_chunk, item_chunk)  # identical: a total order, sums in user order


@pytest.mark.parametrize("k_from_end", [0, 1, 5])
def test_k_close_to_the_number_of_items(brute_force, k_from_end):
    num_users, num_items = 30, 40
    user_vecs, item_vecs, train, test = _problem(4, num_users, num_items, 3, integer=True, heavy_users=3)
    ks = [num_items - k_from_end, 3]
    users = np.arange(num_users)
    expected = brute_force(user_vecs @ item_vecs.T, train, test, ks)
    for item_chunk in (0, 1, 6, 39):
        got = reduce_means(_sums(user_vecs, item_vecs, users, to_csr(train, num_users), to_csr(test, num_users), ks,
                                 user_chunk=4, item_chunk=item_chunk), torch.device("cpu"))
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (item_chunk, key)


def test_threads_do_not_change_the_sums():
    num_users, num_items, ks = 300, 700, [10, 50]
    user_vecs, item_vecs, train, test = _problem(5, num_users, num_items, 8)
    users = np.arange(num_users)
    args = (user_vecs, item_vecs, users, to_csr(train, num_users), to_csr(test, num_users), ks)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _sums(*args, user_chunk=16)
        torch.set_num_threads(3)
        three = _sums(*args, user_chunk=16)
        assert torch.get_num_threads() == 3  # restored after the worker threads ran single-threaded
    finally:
        torch.set_num_threads(threads)
    assert one == three


def test_block_shape_stays_within_the_budget():
    for num_items, user_chunk, item_chunk, budget in [(40981, 1024, 0, 256), (10_000_000, 1024, 0, 256),
                                                     (10_000_000, 1024, 0, 1), (5000, 1024, 0, 256),
                                                     (5000, 8, 0, 256), (1000, 1024, 100, 1)]:
        rows, width = block_shape(num_items, user_chunk, item_chunk, budget)
        assert 1 <= rows <= user_chunk and 1 <= width <= num_items
        assert rows * width * 4 <= budget << 20, (num_items, user_chunk, item_chunk, budget)
        if item_chunk:
            assert width == min(item_chunk, num_items)
    assert block_shape(40981, 1024) == (192, 40981)  # all items, about 32 MB, whole tiles of 64 users
    assert block_shape(10_000_000, 1024, 0, 256)[1] < 10_000_000  # items chunked with a running top K


def _pairs_of(lists):
    users = np.concatenate([[u] * len(s) for u, s in enumerate(lists)] + [np.zeros(0)]).astype(np.int64)
    items = np.concatenate([sorted(s) for s in lists] + [np.zeros(0)]).astype(np.int64)
    return users, items


def _bitmap(lists, users, num_items):
    bits = np.zeros((len(users), -(-num_items // 8)), dtype=np.uint8)
    for slot, u in enumerate(users):
        for i in lists[u]:
            bits[slot, i // 8] |= np.uint8(1 << (i % 8))
    return BitmapSets(bits, num_items, users)


def _subset_csr(lists, users, num_items):
    users_sub, items = _pairs_of([lists[u] for u in users])
    return CSRSets(CSR.from_pairs(users_sub, items, len(users)), num_items, users)


def test_bitmap_and_csr_sets_give_identical_results():
    num_users, num_items, ks = 80, 300, [5, 20]
    user_vecs, item_vecs, train, test = _problem(6, num_users, num_items, 6, integer=True, heavy_users=4)
    users = np.array(sorted(np.random.default_rng(0).choice(num_users, 50, replace=False)))
    full = _sums(user_vecs, item_vecs, users, to_csr(train, num_users), to_csr(test, num_users), ks)
    kinds = {"csr": (_subset_csr(train, users, num_items), _subset_csr(test, users, num_items)),
             "bitmap": (_bitmap(train, users, num_items), _bitmap(test, users, num_items))}
    for name, (train_sets, test_sets) in kinds.items():
        for u in users[[0, 7, -1]]:
            pos, items = train_sets.pairs(np.array([u]))
            assert set(items.tolist()) == train[u] and test_sets.counts(np.array([u]))[0] == len(test[u])
        for item_chunk in (0, 13):  # item blocks not aligned to bytes
            got = _sums(user_vecs, item_vecs, users, train_sets, test_sets, ks, user_chunk=9, item_chunk=item_chunk)
            assert got == full, (name, item_chunk)
    mixed = _sums(user_vecs, item_vecs, users, kinds["bitmap"][0], kinds["csr"][1], ks)
    assert mixed == full
    with pytest.raises(ValueError, match="not covered"):
        kinds["csr"][1].counts(np.array([int(np.setdiff1d(np.arange(num_users), users)[0])]))


def test_sample_of_evaluated_users_is_seeded_and_sorted():
    users = np.arange(0, 3000, 3)
    a, b = sample_eval_users(users, 100), sample_eval_users(users[::-1].copy(), 100)
    assert np.array_equal(a, b) and len(a) == 100 and np.all(np.diff(a) > 0) and np.isin(a, users).all()
    assert not np.array_equal(a, sample_eval_users(users, 100, seed=1))
    assert np.array_equal(sample_eval_users(users, 0), users) and np.array_equal(sample_eval_users(users, 5000), users)
    counts = np.zeros(3000, dtype=np.int64)
    counts[users] = 2
    assert np.array_equal(eval_users(counts, 100), a)
    # the evaluator scores the split's users: a sample of 10 counts 10
    rng = np.random.default_rng(2)
    train, test = random_split(60, 30, rng)
    test_csr = to_csr(test, 60)
    split = EvalSplit(eval_users(test_csr.counts(), 10), 60, 30, Features(), to_csr(train, 60), test_csr)
    assert evaluate_popularity(np.arange(30.0), split, [5], torch.device("cpu"), EvalConfig())["users"] == 10


@pytest.mark.parametrize("world", [1, 2, 3, 7, 20])
def test_owned_shares_cover_the_users_once(world):
    users = np.arange(0, 100, 7)
    shares = [owned_share(users, 100, rank, world) for rank in range(world)]
    assert np.array_equal(np.concatenate([s for s, _ in shares]), users)  # in order, each user once
    bounds = rank_bounds(100, world)  # each rank's users are those of its rows of the user table
    for rank, (share, largest) in enumerate(shares):
        assert ((share >= bounds[rank]) & (share < bounds[rank + 1])).all()
        assert largest == max(len(s) for s, _ in shares)


# ---- eval sets read from a streaming prepared dataset ---------------------------------------


def _write_prepared(root, train_users, train_items, valid, test_users, test_items, num_users, num_items,
                    rows_per_group=7, rows_per_file=20):
    """A tiny dataset in the streaming prepared layout (train/ and test/ Parquet files of several
    row groups, manifest.json)."""
    for part, columns in (("train", {"user": train_users, "item": train_items, "valid": valid}),
                          ("test", {"user": test_users, "item": test_items})):
        (root / part).mkdir(parents=True)
        n = len(columns["user"])
        for f, start in enumerate(range(0, n, rows_per_file)):
            table = pa.table({k: pa.array(v[start : start + rows_per_file]) for k, v in columns.items()})
            pq.write_table(table, root / part / f"part-{f:05d}.parquet", row_group_size=rows_per_group)
    (root / "manifest.json").write_text(json.dumps({"version": 1, "loader": "stream", "counts": {
        "num_users": num_users, "num_items": num_items, "train_interactions": len(train_users),
        "test_interactions": len(test_users)}}))


@pytest.mark.parametrize("num_items", [4000, 12])  # sparse: CSR of unique pairs; dense: a bitmap is smaller
def test_streamed_eval_sets_equal_the_in_memory_sets(tmp_path, num_items):
    rng = np.random.default_rng(7)
    num_users, n_train, n_test = 40, 900, 300
    tu, ti = rng.integers(0, num_users, n_train), rng.integers(0, num_items, n_train)
    tu, ti = np.concatenate([tu, tu[:50]]), np.concatenate([ti, ti[:50]])  # repeated pairs (an event log)
    valid = rng.random(len(tu)) < 0.2
    eu, ei = rng.integers(0, num_users, n_test), rng.integers(0, num_items, n_test)
    _write_prepared(tmp_path, tu, ti, valid, eu, ei, num_users, num_items)
    users = sample_eval_users(np.unique(eu), 25)

    def sets_of(u, i):  # reference: per-user sets of unique items, in memory
        out = [set() for _ in range(num_users)]
        for a, b in zip(u.tolist(), i.tolist()):
            out[a].add(b)
        return out

    cases = {"test": (sets_of(tu, ti), sets_of(eu, ei)),
             "valid": (sets_of(tu[~valid], ti[~valid]), sets_of(tu[valid], ti[valid]))}
    for split, (masked_ref, relevant_ref) in cases.items():
        masked, relevant = load_eval_sets(tmp_path, users, split, progress=False)
        kind = BitmapSets if num_items == 12 else CSRSets  # whichever is smaller
        assert isinstance(masked, kind) and isinstance(relevant, kind), (split, type(masked))
        for sets, ref in ((masked, masked_ref), (relevant, relevant_ref)):
            pos, items = sets.pairs(users)
            got = [set() for _ in users]
            for p_, i_ in zip(pos.tolist(), items.tolist()):
                got[p_].add(i_)
            assert got == [ref[u] for u in users], split
            assert np.array_equal(sets.counts(users), [len(ref[u]) for u in users])
        # the metrics through the streamed sets equal those through in-memory CSRs of the same pairs
        have = users[relevant.counts(users) > 0]
        user_vecs = rng.standard_normal((num_users, 5)).astype(np.float32)
        item_vecs = rng.standard_normal((num_items, 5)).astype(np.float32)
        ks = [3, 10]
        want = _sums(user_vecs, item_vecs, have, to_csr(masked_ref, num_users), to_csr(relevant_ref, num_users), ks)
        assert _sums(user_vecs, item_vecs, have, masked, relevant, ks, item_chunk=5) == want


def test_streamed_eval_sets_refuse_bad_input(tmp_path):
    from recsys.errors import DataError

    u, i = np.array([0, 1, 2]), np.array([0, 1, 9])
    _write_prepared(tmp_path, u, i, np.zeros(3, bool), u, np.array([0, 1, 2]), 3, 5)
    with pytest.raises(DataError, match=r"part-00000.parquet, row group 0: column 'item' has rows outside \[0, 5\)"):
        load_eval_sets(tmp_path, np.array([0, 1]), progress=False)
    (tmp_path / "train" / "part-00000.parquet").unlink()
    with pytest.raises(DataError, match="no Parquet files"):
        load_eval_sets(tmp_path, np.array([0]), progress=False)


def test_memory_of_streamed_sets_does_not_grow_with_interactions(tmp_path):
    # The same 20 x 50 id space, 10x more (repeated) interactions: the sets' size is the same.
    sizes = []
    for n, sub in ((2_000, "small"), (20_000, "large")):
        rng = np.random.default_rng(0)
        u, i = rng.integers(0, 20, n), rng.integers(0, 50, n)
        root = tmp_path / sub
        _write_prepared(root, u, i, np.zeros(n, bool), u[:100], i[:100], 20, 50, rows_per_group=500,
                        rows_per_file=5000)
        masked, _ = load_eval_sets(root, np.arange(20), progress=False)
        sizes.append(masked.nbytes())
    assert sizes[0] == sizes[1] <= 20 * 7


def test_all_scores_equal_rank_by_item_row(brute_force):
    # An all-zero model: every score ties; the top K are the K lowest unmasked item rows.
    num_users, num_items, ks = 20, 3000, [10, 50]
    _, _, train, test = _problem(8, num_users, num_items, 1)
    users = np.arange(num_users)
    expected = brute_force(np.zeros((num_users, num_items)), train, test, ks)
    got = reduce_means(_sums(np.zeros((num_users, 4), np.float32), np.zeros((num_items, 4), np.float32), users,
                             to_csr(train, num_users), to_csr(test, num_users), ks, item_chunk=1000),
                       torch.device("cpu"))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


class FixedTowers:
    """A model of fixed vectors: user row u -> users[u], item row i -> items[i]."""

    def __init__(self, users: np.ndarray, items: np.ndarray) -> None:
        self.users, self.items = torch.from_numpy(users), torch.from_numpy(items)
        self.embedding_dim, self.normalize = users.shape[1], False

    def user_vectors(self, batch):
        return self.users[batch.user_ids]

    def item_vectors(self, batch):
        return self.items[batch.item_ids]


def evaluate_on_this_rank(num_users: int, num_items: int, seed: int):
    """Model and popularity metrics of a random split, each rank scoring its own users."""
    from recsys.evaluation.metrics import evaluate_model
    from recsys.parallelize import destroy_distributed, init_distributed

    init_distributed("cpu")
    rng = np.random.default_rng(seed)
    train, test = random_split(num_users, num_items, rng)
    test_csr = to_csr(test, num_users)
    split = EvalSplit(np.flatnonzero(test_csr.counts()), num_users, num_items, Features(), to_csr(train, num_users),
                      test_csr)
    model = FixedTowers(rng.normal(size=(num_users, 5)).astype(np.float32),
                        rng.normal(size=(num_items, 5)).astype(np.float32))
    options = EvalConfig(ks=[5, 10], user_chunk=4)
    out = {"model": evaluate_model(model, split, [5, 10], torch.device("cpu"), options),
           "popularity": evaluate_popularity(rng.integers(0, 50, num_items).astype(np.float64), split, [5, 10],
                                             torch.device("cpu"), options)}
    destroy_distributed()
    return out


def test_two_ranks_evaluate_their_own_users_to_the_same_metrics(ranks):
    """Each rank scores the evaluated users of its rows of the user table: the means over ranks are
    those of one rank (the same per-user figures, summed in another order: float64, 1e-12)."""
    one, two = ranks(1, evaluate_on_this_rank, 61, 40, 0)[0], ranks(2, evaluate_on_this_rank, 61, 40, 0)
    assert two[0] == two[1]
    for kind in ("model", "popularity"):
        assert one[kind]["users"] == two[0][kind]["users"] > 0
        for key, value in one[kind].items():
            assert two[0][kind][key] == pytest.approx(value, abs=1e-12), (kind, key)
