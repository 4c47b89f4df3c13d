"""Side features, new ids and the figure over all test interactions.

The model's vectors with feature tables are checked against a numpy reference built from the
gathered tables and the prepared feature files read back with pyarrow (1 and 2 ranks, row- and
table-wise); a trained run's export against the same reference from its checkpoint, cold items
(vectors from features alone) marked; the preparation against the Python references of the
hashes (held-out items, hashed values); the evaluator's figure over all test interactions
against numpy; bad feature files are one-line errors that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

TINY = ["+experiment=tiny", "train.progress=false", "log.plots=false"]
NEW_ITEMS = list(range(1000, 1020))
"""Ids of the feature file that no interaction has: new items."""
GENRES = 7


def item_raw_id(k: int) -> int:
    """The synthetic log's raw id of its item k (recsys/data/synthetic.py)."""
    return 7_000_000_000 + (k * 2246822519) % (1 << 31)


def write_item_features(path: Path, num_items: int = 200, extra=NEW_ITEMS) -> None:
    ids = [item_raw_id(k) for k in range(num_items)] + list(extra)
    genre = [None if i % 11 == 5 else f"g{i % GENRES}" for i in ids]  # a few without a genre
    tags = [[i % 3, 10 + i % 5] if i % 4 else ([] if i % 8 else None) for i in ids]
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "genre": pa.array(genre, pa.string()),
                             "tags": pa.array(tags, pa.list_(pa.int64()))}), path, row_group_size=50)


def write_user_features(path: Path, num_users: int = 500) -> None:
    ids = [1_000_000_000 + (k * 2654435761) % (1 << 31) for k in range(num_users)]
    pq.write_table(pa.table({"uid": ids, "country": [f"c{i % 4}" for i in ids]}), path)


def feature_overrides(tmp_path: Path, users: bool = True) -> list:
    items = tmp_path / "item_features.parquet"
    write_item_features(items)
    out = [f"data.item_features.path={items}", "data.item_features.columns=[genre,tags]"]
    if users:
        write_user_features(tmp_path / "user_features.parquet")
        out += [f"data.user_features.path={tmp_path / 'user_features.parquet'}", "data.user_features.id_column=uid",
                "data.user_features.columns=[country]", "data.user_features.hash_buckets=3"]
    return out


def reference_parts(prepared: Path, tables: dict, role: str):
    """The tower of `role` by hand, in parts: (has_id * id row, {column: mean of the rows of the
    row's values}), from the prepared files read back with pyarrow (float64)."""
    stem, table, prefix = ("items", "item", "if_") if role == "item" else ("users", "user", "uf_")
    manifest = json.loads((prepared / "manifest.json").read_text())
    counts = np.load(prepared / ("item_counts_all.npy" if role == "item" else "user_counts.npy"))
    ids = tables[table].astype(np.float64) * (counts > 0)[:, None]
    names = [c["name"] for c in manifest["features"][stem]["columns"]]
    pooled = {name: np.zeros_like(ids) for name in names}
    bags = {}
    for r in pq.read_table(prepared / f"{stem}_features.parquet").to_pylist():
        bags.setdefault((r["row"], r["feature"]), []).append(r["code"])
    for (row, k), codes in bags.items():
        pooled[names[k]][row] = tables[prefix + names[k]][codes].astype(np.float64).mean(0)
    return ids, pooled


def reference_vectors(prepared: Path, tables: dict, role: str, weights: dict, normalize: bool) -> np.ndarray:
    """has_id * id row + sum over columns of weight * mean of the value rows, L2-normalised."""
    ids, pooled = reference_parts(prepared, tables, role)
    out = ids + sum(weights.get(name, 1.0) * p for name, p in pooled.items())
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def vectors_rank(cfg):
    """On each rank: the model of `cfg` built and initialised; rank 0 returns the full tables, the
    item and user vectors of every row (through the sharded towers) and the dataset's path."""
    from recsys.evaluation.vectors import all_vectors, item_tower, user_tower
    from recsys.parallelize import destroy_distributed, gather_tables, init_distributed
    from recsys.training.setup import build_model, open_data

    info = init_distributed("cpu")
    data = open_data(cfg, progress=False)
    sharded = build_model(cfg, data.num_users, data.num_items, info.device, info.world_size,
                          side_tables=data.side_tables())
    model, dim = sharded.model, cfg.model.embedding_dim
    items = all_vectors(item_tower(model, data.features(), info.device), data.num_items, dim, info.device, 64)
    users = all_vectors(user_tower(model, data.features(), info.device), data.num_users, dim, info.device, 64)
    tables = {k: v.float().numpy() for k, v in gather_tables(sharded.dmp).items()}
    out = ({"tables": tables, "items": items.numpy(), "users": users.numpy(), "path": str(data.path)}
           if info.rank == 0 else None)
    destroy_distributed()
    return out


@pytest.mark.parametrize("world,sharding", [(1, []), (2, ["row_wise"]), (2, ["table_wise"])])
def test_feature_tables_through_the_sharded_model_equal_the_reference(ranks, config, tmp_path, world, sharding):
    cfg = config([*TINY, f"data.root={tmp_path / 'data'}", *feature_overrides(tmp_path),
                  f"train.sharding_types={sharding}", "+model.feature_weights.tags=0.5"])
    got = next(o for o in ranks(world, vectors_rank, cfg) if o)
    prepared = Path(got["path"])
    assert {"if_genre", "if_tags", "uf_country"} <= set(got["tables"])
    assert got["tables"]["uf_country"].shape[0] == 3  # hashed into 3 rows
    for role in ("item", "user"):
        want = reference_vectors(prepared, got["tables"], role, {"tags": 0.5}, normalize=True)
        # unit vectors from sums of a few float32 rows: a few float32 roundings of numbers below 1
        np.testing.assert_allclose(got[f"{role}s"], want, rtol=0, atol=8 * np.finfo(np.float32).eps)
    # the new items (no interaction) have rows, and their vectors come from their features alone
    vocab = pq.read_table(prepared / "items.parquet").column(0).to_pylist()
    assert set(NEW_ITEMS) <= set(vocab)
    counts = np.load(prepared / "item_counts_all.npy")
    assert all(counts[vocab.index(i)] == 0 for i in NEW_ITEMS)
    assert (counts > 0).sum() == 200  # the others: the log's items, each with features
    values = pq.read_table(prepared / "items_features.parquet")
    assert len(set(values["row"].to_pylist())) > 200


def test_concatenated_features_go_through_the_linear_layer(config, tmp_path, in_process):
    import torch

    from recsys.parallelize import gather_tables, init_distributed
    from recsys.training.setup import build_model, open_data

    cfg = config([*TINY, f"data.root={tmp_path / 'data'}", *feature_overrides(tmp_path, users=False),
                  "model.feature_combine=concat", "model.normalize=false"])

    def run():
        info = init_distributed("cpu")
        data = open_data(cfg, progress=False)
        model = build_model(cfg, data.num_users, data.num_items, info.device, 1, side_tables=data.side_tables()).model
        linear = model.side_projection["item"]
        with torch.no_grad():
            linear.weight.normal_(generator=torch.Generator().manual_seed(0))
        rows = np.arange(data.num_items)
        got = model.item_vectors(data.features().batch(np.zeros(0, np.int64), rows)).detach().numpy()
        return got, {k: v.float().numpy() for k, v in gather_tables(model).items()}, linear.weight.detach().numpy(), data

    got, tables, w, data = in_process(run)
    ids, pooled = reference_parts(Path(data.path), tables, "item")
    want = np.concatenate([ids, pooled["genre"], pooled["tags"]], axis=1) @ w.T.astype(np.float64)
    # sums of 3 x 16 float32 products of numbers of order 1: a few float32 roundings of the largest
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * np.finfo(np.float32).eps * np.abs(want).max())


def test_a_trained_run_exports_cold_items_from_their_features(two_ranks, train_here, tmp_path):
    """2 ranks, row-wise, data.split=cold_items: every exported vector equals the towers computed by
    hand from the checkpoint's tables; the items without a training interaction (held out, and the
    feature file's new ids) are marked; metrics.json has the cold-item and all-test figures."""
    import torch.distributed

    from recsys.exporter import read_vectors
    from recsys.parallelize import gather_tables
    from recsys.training.setup import load_trained

    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.root={tmp_path / 'data'}", *feature_overrides(tmp_path), "data.split=cold_items",
                 "train.sharding_types=[row_wise]", "train.max_steps=6", "+model.feature_weights.genre=2.0"]
    two_ranks(train_here, overrides, str(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["cold_items"]) == {"model", "feature_popularity"}
    assert metrics["cold_items"]["model"]["users"] == metrics["data"]["test_cold_users"] > 0
    assert set(metrics["test_all"]) == {"model", "popularity"}
    trained = load_trained(run_dir)
    try:
        tables = {k: v.float().numpy() for k, v in gather_tables(trained.sharded.dmp).items()}
        prepared = Path(trained.data.path)
    finally:
        torch.distributed.destroy_process_group()
    vocab = pq.read_table(prepared / "items.parquet").column(0).to_pylist()
    counts = np.load(prepared / "item_counts_all.npy")
    want = reference_vectors(prepared, tables, "item", {"genre": 2.0}, normalize=True)
    ids, vecs = read_vectors(run_dir / "export", "items")
    flags = pa.concat_tables([pq.read_table(f) for f in sorted((run_dir / "export" / "items").glob("*.parquet"))])
    rows = [vocab.index(i) for i in ids]
    np.testing.assert_allclose(vecs, want[rows], rtol=0, atol=8 * np.finfo(np.float32).eps)
    cold = {vocab[r] for r in np.flatnonzero(counts == 0)}
    assert set(NEW_ITEMS) <= cold
    assert {i for i, f in zip(flags["item_id"].to_pylist(), flags["from_features"].to_pylist()) if f} == cold
    manifest = json.loads((prepared / "manifest.json").read_text())
    test_items = {i for f in (prepared / "test").glob("*.parquet") for i in pq.read_table(f).column("item").to_pylist()}
    assert test_items <= {vocab.index(i) for i in cold}  # every test item is held out: cold
    assert manifest["counts"]["test_cold_interactions"] == manifest["counts"]["test_interactions"]


def test_cold_items_split_and_hashed_values_match_the_python_references(config, tmp_path):
    from recsys.data.hashing import cold_item_key, hash_rows, P
    from recsys.data.prepare import prepare

    cfg = config([*TINY, f"data.root={tmp_path / 'data'}", *feature_overrides(tmp_path), "data.split=cold_items",
                  "data.item_features.hash_buckets=5", "data.test_fraction=0.3", "data.seed=4"])
    prepared = Path(prepare(cfg.data))
    vocab = pq.read_table(prepared / "items.parquet").column(0)
    held = cold_item_key(vocab, 4) < int(0.3 * P)
    train_items = np.unique(np.concatenate([pq.read_table(f).column("item").to_numpy()
                                            for f in sorted((prepared / "train").glob("*.parquet"))]))
    test_items = np.unique(np.concatenate([pq.read_table(f).column("item").to_numpy()
                                           for f in (prepared / "test").glob("*.parquet")]))
    assert not held[train_items].any()  # no held-out item trains
    assert held[test_items].all() and len(test_items) > 10
    # hashed values: each value's code is hash_rows of its text, seeded with data.seed
    values = pq.read_table(prepared / "items_feature_values.parquet")
    np.testing.assert_array_equal(values["code"].to_numpy(), hash_rows(values["value"], 4, 5))
    manifest = json.loads((prepared / "manifest.json").read_text())["features"]["items"]
    assert [c["rows"] for c in manifest["columns"]] == [5, 5]
    ids = [item_raw_id(k) for k in range(200)] + NEW_ITEMS
    no_value = sum(1 for i in ids if i % 11 == 5 and i % 8 in (0, 4))  # no genre, null or empty tags: no row
    assert manifest["counts"]["ids"] == len(ids) - no_value and manifest["counts"]["rows_without_values"] == no_value > 0
    # the ids with i % 11 == 5 have no genre, i % 8 == 0 null tags (i % 8 == 4: an empty list)
    assert manifest["columns"][0]["null_values"] == sum(1 for i in ids if i % 11 == 5) > 0
    assert manifest["columns"][1]["null_values"] == sum(1 for i in ids if i % 8 == 0) > 0


def test_the_figure_over_all_test_interactions_counts_missing_ones_as_misses(brute_force):
    import torch

    from recsys.data.dataset import CSR
    from recsys.evaluation.ranking import ranking_metric_sums

    rng = np.random.default_rng(0)
    users, items, ks = 30, 40, [5, 10]
    scores = rng.normal(size=(users, items))
    train = [set(rng.choice(items, 4, replace=False).tolist()) for _ in range(users)]
    test = [set(rng.choice(sorted(set(range(items)) - train[u]), 3, replace=False).tolist()) for u in range(users)]
    missing = rng.integers(0, 4, users)
    # the same users with `missing` extra test items that no vector can find: appended columns scored -inf
    wide = np.concatenate([scores, np.full((users, missing.max()), -np.inf)], axis=1)
    wide_test = [test[u] | {items + j for j in range(missing[u])} for u in range(users)]
    want = brute_force(wide, train, wide_test, ks)

    def csr(sets):
        return CSR.from_pairs(np.repeat(np.arange(users), [len(s) for s in sets]),
                              np.array([i for s in sets for i in sorted(s)]), users)

    sums = ranking_metric_sums(torch.eye(users, dtype=torch.float32), torch.from_numpy(scores.T.astype(np.float32)),
                               np.arange(users), csr(train), csr(test), ks, missing=missing)
    for k in ks:
        for m in ("recall", "ndcg"):
            assert sums[f"all_{m}@{k}"] / users == pytest.approx(want[f"{m}@{k}"], abs=1e-12 * users)


@pytest.mark.parametrize("case,needle", [
    ("no_id", "missing id column 'item_id'"),
    ("no_column", "missing feature column 'tags'"),
    ("float", "feature column 'genre' has type double"),
    ("nested", "feature column 'tags' has type list<element: list"),
    ("id_type", "holds strings but the interactions' item ids are integers"),
])
def test_bad_feature_files_are_one_line_errors_and_write_nothing(config, tmp_path, case, needle):
    from recsys.data.prepare import prepare
    from recsys.errors import DataError

    path = tmp_path / "items.parquet"
    table = {"item_id": pa.array([1, 2]), "genre": pa.array(["a", "b"]), "tags": pa.array([[1], [2]])}
    if case == "no_id":
        table["id"] = table.pop("item_id")
    elif case == "no_column":
        table.pop("tags")
    elif case == "float":
        table["genre"] = pa.array([0.5, 1.5])
    elif case == "nested":
        table["tags"] = pa.array([[[1]], [[2]]])
    elif case == "id_type":
        table["item_id"] = pa.array(["1", "2"])
    pq.write_table(pa.table(table), path)
    cfg = config([*TINY, f"data.root={tmp_path / 'data'}", f"data.item_features.path={path}",
                  "data.item_features.columns=[genre,tags]"])
    with pytest.raises(DataError) as e:
        prepare(cfg.data)
    message = str(e.value)
    assert needle in message and str(path) in message and "\n" not in message
    assert not (tmp_path / "data").exists()


def test_a_bad_feature_file_on_the_command_line_exits_2_with_one_line(command, tmp_path):
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": pa.array([1, 2]), "genre": pa.array([0.5, 1.5])}), path)
    code, out, err = command("train", *TINY, f"data.root={tmp_path / 'data'}", f"data.item_features.path={path}",
                             "data.item_features.columns=[genre]", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "genre" in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "data").exists()


def test_feature_popularity_is_the_mean_count_of_the_items_sharing_a_value():
    from recsys.data.dataset import CSR
    from recsys.data.features import SideFeatures
    from recsys.evaluation.metrics import feature_popularity

    # 5 items: 0-3 trained (counts 4, 2, 6, 0 -> item 3 has none), item 4 new; one column, 2 values
    bag = CSR(np.array([0, 1, 2, 4, 5, 6]), np.array([0, 0, 0, 1, 1, 1]))  # item 2 has both values
    counts = np.array([4, 2, 6, 0, 0])
    side = SideFeatures(["c"], [2], [bag], counts)
    value_mean = [(4 + 2 + 6) / 3, 6 / 1]  # value 0: items 0, 1, 2; value 1: item 2 (3 and 4 untrained)
    want = [value_mean[0], value_mean[0], (value_mean[0] + value_mean[1]) / 2, value_mean[1], value_mean[1]]
    np.testing.assert_allclose(feature_popularity(side, counts), want)


def test_rare_and_unseen_items_share_the_oov_rows(tmp_path, train_here):
    """data.min_count / data.oov_buckets: rare training items and unseen test items are in the OOV
    rows given by the Python reference (recsys.data.hashing.oov_rows), no test row is dropped, and
    the export's oov/items/ holds those rows' vectors by bucket, the vectors the rare ids get."""
    from collections import Counter

    from recsys.data.hashing import oov_rows
    from recsys.exporter import read_vectors

    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 60, 1500), np.minimum(rng.zipf(1.4, 1500), 80) * 11
    pq.write_table(pa.table({"user_id": users, "item_id": items}), tmp_path / "train.parquet")
    test_items = np.array([11, 22, 5, 7, 9999, 13, 880, 11])  # 5, 7, 9999, 13: never in training
    pq.write_table(pa.table({"user_id": users[:8], "item_id": test_items}), tmp_path / "test.parquet")
    run = tmp_path / "run"
    train_here(["data=parquet", f"data.path={tmp_path / 'train.parquet'}", f"data.test_path={tmp_path / 'test.parquet'}",
                "data.split=given", "data.timestamp_column=null", f"data.root={tmp_path / 'data'}", "data.min_count=3",
                "data.oov_buckets=5", "train.epochs=1", "train.batch_size=64", "loss.num_negatives=8",
                "model.embedding_dim=8", "eval.ks=[5]", "eval.select_metric=recall@5", "train.progress=false",
                "log.plots=false"], run)
    metrics = json.loads((run / "metrics.json").read_text())
    prepared = Path(metrics["data"]["path"])
    manifest = json.loads((prepared / "manifest.json").read_text())
    oov = manifest["oov"]["items"]
    counts = Counter(pair[1] for pair in {(u, i) for u, i in zip(users.tolist(), items.tolist())})  # duplicates dropped
    frequent = sorted((i for i, n in counts.items() if n >= 3), key=lambda i: (-counts[i], i))
    rare = sorted(i for i, n in counts.items() if n < 3)
    assert oov["first_row"] == len(frequent) and oov["rare_ids"] == len(rare) > 0
    assert manifest["counts"]["num_items"] == len(frequent) + 5
    vocab = pq.read_table(prepared / "items.parquet").to_pydict()
    row_of = dict(zip(vocab["item_id"], vocab["row"]))
    assert [row_of[i] for i in frequent] == list(range(len(frequent)))
    assert [row_of[i] for i in rare] == oov_rows(pa.array(rare), len(frequent), 5, 0).tolist()
    # every test row kept, the unseen items in the OOV rows
    assert manifest["dropped"]["test_unseen_item"] == 0 and oov["test_rows_of_unseen_ids"] == 4
    got = sorted(pq.read_table(next((prepared / "test").glob("*.parquet"))).column("item").to_pylist())
    want = [row_of[i] if i in row_of else int(oov_rows(pa.array([int(i)]), len(frequent), 5, 0)[0])
            for i in test_items.tolist()]
    assert got == sorted(want)
    # the export: each bucket's vector is the vector of the rare ids in it
    export = json.loads((run / "export" / "manifest.json").read_text())
    assert export["oov"]["items"]["buckets"] == 5
    buckets = pa.concat_tables([pq.read_table(run / "export" / f) for f in export["oov"]["items"]["parts"]])
    assert sorted(buckets["bucket"].to_pylist()) == list(range(5))
    by_bucket = dict(zip(buckets["bucket"].to_pylist(), np.stack(buckets["vector"].to_numpy(zero_copy_only=False))))
    ids, vecs = read_vectors(run / "export", "items")
    for i, v in zip(ids, vecs):
        if i in rare:
            np.testing.assert_array_equal(v, by_bucket[row_of[i] - len(frequent)])


@pytest.mark.parametrize("case", ["cold_items", "oov", "hash"])
def test_both_loaders_give_the_same_side_features_and_cold_sets(config, tmp_path, case):
    """One preparation with features (held-out items; OOV rows; hashed ids), read by the memory
    and the streaming loader: the same model inputs for any rows, the same cold-item evaluation
    sets (every cold user with a cold item), the same negatives' rows."""
    from recsys.data.eval_sets import as_item_sets
    from recsys.data.features import FeatureSpec
    from recsys.data.prepare import prepare
    from recsys.data.source import InMemorySource, StreamedSource

    more = {"cold_items": ["data.split=cold_items"], "oov": ["data.min_count=3", "data.oov_buckets=4"],
            "hash": ["data.id_mapping=hash", "data.num_users=400", "data.num_items=150"]}[case]
    cfg = config([*TINY, f"data.root={tmp_path / 'data'}", *feature_overrides(tmp_path), *more])
    prepared = Path(prepare(cfg.data))
    memory = InMemorySource(prepared, FeatureSpec())
    stream = StreamedSource(prepared, json.loads((prepared / "manifest.json").read_text()), FeatureSpec())
    rows = np.arange(memory.num_items)
    users = np.arange(memory.num_users)
    a, b = memory.features().batch(users, rows), stream.features().batch(users, rows)
    for kjt_a, kjt_b in ((a.items, b.items), (a.users, b.users)):
        assert kjt_a.keys() == kjt_b.keys() and len(kjt_a.keys()) > 1
        assert kjt_a.values().equal(kjt_b.values()) and kjt_a.lengths().equal(kjt_b.lengths())
    assert a.item_feature_counts.equal(b.item_feature_counts) and a.item_feature_counts.shape[1] == 2
    sets_a, sets_b = memory.eval_sets(0), stream.eval_sets(0)
    assert np.array_equal(memory.negative_rows(), stream.negative_rows())
    assert not np.isin(np.flatnonzero(np.load(prepared / "item_counts.npy") == 0), memory.negative_rows()).any()
    assert np.array_equal(sets_a.test.missing, sets_b.test.missing)
    assert (sets_a.cold is None) == (sets_b.cold is None) == (case != "cold_items")  # no new item is tested else
    if sets_a.cold is None:
        return
    assert np.array_equal(sets_a.cold.users, sets_b.cold.users)
    n = memory.num_items
    assert (as_item_sets(sets_a.cold.relevant, n).counts(sets_a.cold.users) > 0).all()
    for got, want in ((sets_b.cold.relevant, sets_a.cold.relevant), (sets_b.cold.masked, sets_a.cold.masked)):
        pa_, pb_ = as_item_sets(want, n).pairs(sets_a.cold.users), as_item_sets(got, n).pairs(sets_a.cold.users)
        assert sorted(zip(*map(list, pa_))) == sorted(zip(*map(list, pb_)))



def test_the_all_test_figure_averages_over_every_test_user(brute_force):
    """evaluate_popularity with all_test: the users without any vector score 0 and count in the
    mean; the others' misses count in their denominators (numpy brute force over all users)."""
    import torch

    from recsys.config import EvalConfig
    from recsys.data.dataset import CSR
    from recsys.data.eval_sets import EvalSplit
    from recsys.data.features import Features
    from recsys.evaluation.metrics import evaluate_popularity

    rng = np.random.default_rng(3)
    users, items, ks = 12, 30, [3, 10]
    counts = rng.integers(0, 50, items)
    train = [set(rng.choice(items, 3, replace=False).tolist()) for _ in range(users)]
    test = [set(rng.choice(sorted(set(range(items)) - train[u]), 1 + u % 3, replace=False).tolist()) if u % 4
            else set() for u in range(users)]  # every 4th user: no test item with a vector
    missing = rng.integers(0, 3, users)
    missing[0] = 2  # a user whose test items all lack a vector
    without = 3  # and 3 test users unseen in training
    csr = lambda sets: CSR.from_pairs(np.repeat(np.arange(users), [len(x) for x in sets]),  # noqa: E731
                                      np.array([i for x in sets for i in sorted(x)], dtype=np.int64), users)
    evaluated = np.array([u for u in range(users) if test[u]])
    zero_users = without + sum(1 for u in range(users) if not test[u] and missing[u])
    split = EvalSplit(evaluated, users, items, Features(), csr(train), csr(test), missing, zero_users,
                      len(evaluated))
    got = evaluate_popularity(counts, split, ks, torch.device("cpu"), EvalConfig(ks=ks), all_test=True)["all"]
    wide = np.concatenate([np.tile(counts.astype(float), (users, 1)), np.full((users, missing.max()), -np.inf)], 1)
    wide_test = [test[u] | {items + j for j in range(missing[u])} for u in evaluated]
    want = brute_force(wide[evaluated], [train[u] for u in evaluated], wide_test, ks)
    total = len(evaluated) + zero_users
    assert got["users"] == total
    for k in ks:
        for m in ("recall", "ndcg"):  # the evaluated users' mean, the others 0
            assert got[f"{m}@{k}"] == pytest.approx(want[f"{m}@{k}"] * len(evaluated) / total, abs=1e-12)
