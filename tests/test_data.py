"""Preparation of raw interactions: vocabularies, splits, counted drops, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.config import DataConfig
from recsys.data.batches import BatchOptions, TrainBatches
from recsys.data.dataset import Dataset
from recsys.data.prepare import prepare
from recsys.errors import DataError
from recsys.exporter import read_vectors, write_export


def write(tmp_path, name, **cols):
    path = tmp_path / name
    pq.write_table(pa.table(cols), path)
    return str(path)


def parquet_cfg(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(name="parquet", root=str(tmp_path / "prepared"), path=path, **kw)


@pytest.mark.parametrize("user_ids,item_ids", [
    (["alice", "bob", "carol"], [10, 20, 30]),               # string users, int items
    ([1_000_000_007, 5, 42], ["sku-9", "sku-1", "sku-é"]),  # int users, string items
])
def test_vocabulary_round_trip(tmp_path, user_ids, item_ids):
    rng = np.random.default_rng(0)
    u = rng.integers(0, 3, 60)
    i = rng.integers(0, 3, 60)
    raw_users = pa.array([user_ids[k] for k in u])
    raw_items = pa.array([item_ids[k] for k in i])
    path = write(tmp_path, "log.parquet", user_id=raw_users, item_id=raw_items, timestamp=pa.array(np.arange(60)))
    out = prepare(parquet_cfg(tmp_path, path, duplicates="keep", test_fraction=0.2))
    ds = Dataset.load(out)
    users_vocab, items_vocab = ds.vocab("users"), ds.vocab("items")
    assert users_vocab.type == raw_users.type and items_vocab.type == raw_items.type
    # rows -> raw ids gives back the original interactions (train + test = the whole log)
    rows = list(zip(np.concatenate([ds.train_users, ds.test_users]), np.concatenate([ds.train_items, ds.test_items])))
    got = sorted((users_vocab[a].as_py(), items_vocab[b].as_py()) for a, b in rows)
    assert got == sorted(zip(raw_users.to_pylist(), raw_items.to_pylist()))
    # export -> raw ids: the vector written for raw id x is row vocab.index(x)'s vector
    user_vecs = np.arange(ds.num_users, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    item_vecs = np.arange(ds.num_items, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    exp = write_export(tmp_path / "export", users_vocab, user_vecs, items_vocab, item_vecs, False, "h")
    ids, vecs = read_vectors(exp, "items")
    assert pq.read_schema(exp / "items" / "part-00000.parquet").field("item_id").type == raw_items.type
    assert pq.read_schema(exp / "items" / "part-00000.parquet").field("vector").type == pa.list_(pa.float32(), 4)
    for raw, vec in zip(ids, vecs):
        assert items_vocab.to_pylist().index(raw) == vec[0]
    ids, vecs = read_vectors(exp, "users")
    assert ids == users_vocab.to_pylist() and vecs[:, 0].tolist() == list(range(ds.num_users))
    manifest = json.loads((exp / "manifest.json").read_text())
    assert manifest["dimension"] == 4 and manifest["num_items"] == ds.num_items


def test_random_holdout_and_counted_drops(tmp_path):
    users = [1] * 5 + [2] * 5 + [3, None, 1]
    items = list("abcde") * 2 + ["a", "a", "a"]  # (1, a) twice; one null user
    path = write(tmp_path, "log.parquet", user_id=pa.array(users, pa.int64()), item_id=pa.array(items))
    out = prepare(parquet_cfg(tmp_path, path, test_fraction=0.4, timestamp_column=None))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dropped"]["null_ids"] == 1 and m["dropped"]["duplicates"] == 1
    # users 1 and 2: 5 distinct items -> floor(2.0) = 2 test each; user 3: 1 item -> 0 test.
    # A held-out item that no training row has is dropped from test, and counted.
    assert m["counts"]["train_interactions"] == 7
    assert m["counts"]["test_interactions"] + m["dropped"]["test_unseen_item"] == 4
    ds = Dataset.load(out)
    assert len(ds.test_users) == m["counts"]["test_interactions"]
    assert 3 not in [ds.vocab("users")[u].as_py() for u in ds.test_users]
    assert prepare(parquet_cfg(tmp_path, path, test_fraction=0.4, timestamp_column=None)) == out  # reused


def test_temporal_split_and_unseen_test_rows(tmp_path):
    # The latest third by time is test; the test rows of an unseen user / item are dropped and counted.
    path = write(tmp_path, "log.parquet",
                 user_id=pa.array([2, 1, 1, 2, 1, 2, 2, 1, 3]), item_id=pa.array([3, 1, 2, 1, 3, 2, 4, 9, 1]),
                 timestamp=pa.array([9, 1, 2, 3, 5, 4, 6, 7, 8]))
    out = prepare(parquet_cfg(tmp_path, path, split="temporal", test_fraction=1 / 3))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dropped"]["test_unseen_user"] == 1 and m["dropped"]["test_unseen_item"] == 1
    assert m["counts"]["train_interactions"] == 6 and m["counts"]["test_interactions"] == 1
    ds = Dataset.load(out)
    assert ds.vocab("users")[ds.test_users[0]].as_py() == 2 and ds.vocab("items")[ds.test_items[0]].as_py() == 3
    with pytest.raises(DataError, match="needs a timestamp column"):
        prepare(parquet_cfg(tmp_path, path, split="temporal", timestamp_column="ts"))


def test_given_split(tmp_path):
    train = write(tmp_path, "train.parquet", user_id=pa.array(["u1", "u2", "u2"]), item_id=pa.array([1, 1, 2]))
    test = write(tmp_path, "test.parquet", user_id=pa.array(["u1", "u3", "u2"]), item_id=pa.array([2, 1, 7]))
    out = prepare(parquet_cfg(tmp_path, train, test_path=test, split="given"))
    m = json.loads((out / "manifest.json").read_text())
    # (u3, 1): an unseen user; (u2, 7): an unseen item, u2's only test row: neither has a vector
    assert m["counts"] == {"raw_interactions": 3, "num_users": 2, "num_items": 2, "train_interactions": 3,
                           "test_interactions": 1, "test_users": 1, "valid_interactions": 0,
                           "test_interactions_without_vectors": 2, "test_users_without_vectors": 2}
    assert m["dropped"]["test_unseen_user"] == 1 and m["dropped"]["test_unseen_item"] == 1


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"),
    ("not_parquet", "cannot be read as Parquet"),
    ("no_column", "missing item column 'item_id'"),
    ("float_ids", "ids must be integers or strings"),
])
def test_bad_input_names_file_and_column(tmp_path, case, match):
    if case == "missing":
        path = str(tmp_path / "nope.parquet")
    elif case == "not_parquet":
        path = str(tmp_path / "log.parquet")
        (tmp_path / "log.parquet").write_text("user,item\n1,2\n")
    elif case == "no_column":
        path = write(tmp_path, "log.parquet", user_id=pa.array([1]), item=pa.array([2]))
    else:
        path = write(tmp_path, "log.parquet", user_id=pa.array([1.5]), item_id=pa.array([2]))
    with pytest.raises(DataError, match=match) as err:
        prepare(parquet_cfg(tmp_path, path))
    assert path in str(err.value)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())  # no partial output


def test_batches_same_count_on_every_rank_and_independent_of_world_size():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 50, 1003), rng.integers(0, 40, 1003)

    def steps(world):
        per_rank = [list(TrainBatches(users, items, 40, BatchOptions(100, 8, 1, r, world), epoch=2)) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == 10
        return [(np.concatenate([p[s].user_ids for p in per_rank]), np.concatenate([p[s].item_ids[:100 // world] for p in per_rank]),
                 np.concatenate([p[s].item_ids[100 // world:] for p in per_rank])) for s in range(10)]

    one, two = steps(1), steps(2)
    for a, b in zip(one, two):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    again = steps(1)
    np.testing.assert_array_equal(one[3][0], again[3][0])  # reproducible from the seed


def test_history_features_bags_dropout_and_target_exclusion():
    from recsys.data.dataset import CSR
    from recsys.data.features import HISTORY_FEATURE, ITEM_FEATURE, Features

    history = CSR(np.array([0, 3, 3, 7]), np.array([5, 6, 7, 1, 2, 3, 4]))  # user 1 has no history
    users, positives, negatives = np.array([2, 0, 1]), np.array([3, 9, 8]), np.array([11, 12])
    items = np.concatenate([positives, negatives])
    # shared table: the bags ride in the item KJT, padded with empty bags to the item count
    b = Features(history, shared=True).batch(users, items)
    kjt = b.items.to_dict()
    assert kjt[ITEM_FEATURE].values().tolist() == items.tolist()
    assert kjt[HISTORY_FEATURE].lengths().tolist() == [4, 3, 0, 0, 0]
    assert kjt[HISTORY_FEATURE].values().tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert b.history_counts.tolist() == [4, 3, 0]
    # own table: the bags ride in the user KJT
    b = Features(history, shared=False).batch(users, items)
    assert b.users.to_dict()[HISTORY_FEATURE].lengths().tolist() == [4, 3, 0]
    # training batches: the positive (3 for user 2) leaves its bag; dropout thins bags at rate p
    b = Features(history, shared=False, exclude_target=True).batch(users, items, np.random.default_rng(0))
    assert b.users.to_dict()[HISTORY_FEATURE].values().tolist() == [1, 2, 4, 5, 6, 7]
    assert b.history_counts.tolist() == [3, 3, 0]
    big = CSR(np.array([0, 10_000]), np.arange(10_000))
    b = Features(big, shared=False, dropout=0.3).batch(np.array([0]), np.array([0]), np.random.default_rng(0))
    assert abs(b.history_counts.item() / 10_000 - 0.7) < 0.02
    # evaluation (no rng): the whole bag
    b = Features(big, shared=False, dropout=0.3).batch(np.array([0]), np.array([0]))
    assert b.history_counts.item() == 10_000


def test_given_split_applies_min_rating_to_both_files(tmp_path):
    train = write(tmp_path, "train.parquet", user_id=pa.array([1, 1, 2, 2]), item_id=pa.array([1, 2, 1, 3]),
                  r=pa.array([5.0, 2.0, 4.0, 5.0]))
    test = write(tmp_path, "test.parquet", user_id=pa.array([1, 2, 2]), item_id=pa.array([3, 2, 1]),
                 r=pa.array([4.0, 1.0, 5.0]))
    out = prepare(parquet_cfg(tmp_path, train, test_path=test, split="given", rating_column="r", min_rating=3.0))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dropped"]["below_min_rating"] == 1 and m["dropped"]["test_below_min_rating"] == 1
    ds = Dataset.load(out)
    users, items = ds.vocab("users").to_pylist(), ds.vocab("items").to_pylist()
    assert sorted((users[u], items[i]) for u, i in zip(ds.test_users, ds.test_items)) == [(1, 3), (2, 1)]


def test_timestamps_are_whole_seconds_floored(tmp_path):
    ts = pa.array([1_600_000_000_700_000, 1_600_000_001_200_000, 1_600_000_002_900_000], pa.timestamp("us"))
    path = write(tmp_path, "log.parquet", user_id=pa.array([1, 2, 1]), item_id=pa.array([1, 2, 2]), timestamp=ts)
    out = prepare(parquet_cfg(tmp_path, path, split="temporal", test_fraction=0.34))
    train = pa.concat_tables([pq.read_table(f) for f in sorted((out / "train").glob("part-*.parquet"))])
    assert sorted(train["timestamp"].to_pylist()) == [1_600_000_000, 1_600_000_001]
