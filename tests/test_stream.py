"""The streaming data side: the streaming vocabulary, the encoded row groups, the pair-hashed split,
hashed ids, the streamed synthetic generator, the loader choice and bad input.

References are computed here independently: the whole (small) log read with pyarrow, vocabularies
by ``pc.unique(...).sort()``, collisions by a Python set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from recsys.config import DataConfig
from recsys.data import stream_prepare as stream
from recsys.data.dataset import Dataset, id_rows
from recsys.data.hashing import hash_rows, id_hash, split_masks
from recsys.data.prepare import prepare, prepared_dir, resolve_loader
from recsys.data.synthetic import generate_stream
from recsys.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def write_parts(directory: Path, parts, row_group_size: int = 7, **extra) -> Path:
    """Files of uneven sizes (tiny row groups): parts = [(users, items), ...]."""
    directory.mkdir(parents=True, exist_ok=True)
    for k, (users, items) in enumerate(parts):
        cols = {"user_id": users, "item_id": items, **{c: v[k] for c, v in extra.items()}}
        pq.write_table(pa.table(cols), directory / f"part-{k}.parquet", row_group_size=row_group_size)
    return directory


def uneven_log(directory: Path, strings: bool, sizes=(1, 53, 340, 1206), users=120, items=60, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    parts = []
    for n in sizes:
        u = rng.integers(0, users, n) ** 2 + 1000  # sparse int ids
        i = (rng.zipf(1.5, n) % items) * 7
        if strings:
            parts.append((pa.array([f"user-{x}" for x in u]), pa.array([f"sku-{x}é" for x in i])))
        else:
            parts.append((pa.array(u, pa.int64()), pa.array(i.astype(np.int32))))  # int32 items: cast
    return write_parts(directory, parts)


def stream_cfg(tmp_path, path, **kw) -> DataConfig:
    kw.setdefault("timestamp_column", None)
    return DataConfig(name="parquet", root=str(tmp_path / "prepared"), path=str(path), loader="stream", **kw)


def read_rows(out: Path, split: str) -> pa.Table:
    files = sorted((out / split).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def raw_log(path: Path) -> pa.Table:
    """The whole log in file order, integer ids as int64."""
    tables = [pq.read_table(f, columns=["user_id", "item_id"]) for f in sorted(path.glob("*.parquet"))]
    cast = lambda a: a.cast(pa.int64()) if pa.types.is_integer(a.type) else a  # noqa: E731
    return pa.table({c: pa.chunked_array([cast(t[c]) for t in tables]).combine_chunks()
                     for c in ("user_id", "item_id")})


def reference_split(table: pa.Table, seed: int, test_fraction: float, valid_fraction: float = 0.0):
    return split_masks(id_hash(table["user_id"]), id_hash(table["item_id"]), seed, test_fraction, valid_fraction)


def refused(tmp_path, path, match, **kw):
    """A streaming prepare refuses the input with a one-line message matching `match` and leaves
    nothing behind, not even data.root."""
    root = tmp_path / "refused"
    kw.setdefault("timestamp_column", None)
    with pytest.raises(DataError, match=match) as err:
        prepare(DataConfig(name="parquet", root=str(root), path=str(path), loader="stream", **kw))
    assert "\n" not in str(err.value)
    assert not root.exists(), sorted(root.rglob("*"))
    return str(err.value)


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 16 rows: the distinct-id merge runs many times."""
    monkeypatch.setattr(stream, "BATCH_ROWS", 16)


# ---- the streaming vocabulary and the encoded rows --------------------------------------------------


@pytest.mark.parametrize("strings", [False, True], ids=["int_ids", "string_ids"])
def test_streaming_vocab_and_rows_equal_the_in_memory_reference(tmp_path, small_batches, strings):
    path = uneven_log(tmp_path / "log", strings)
    out = prepare(stream_cfg(tmp_path, path, row_group_size=50, valid_fraction=0.1, test_fraction=0.25))
    m = json.loads((out / "manifest.json").read_text())
    assert m["loader"] == "stream" and m["id_mapping"] == "vocab"

    raw = raw_log(path)
    is_test, is_valid = reference_split(raw, 0, 0.25, 0.1)
    train, test = raw.filter(pa.array(~is_test)), raw.filter(pa.array(is_test))
    users_vocab, items_vocab = pc.unique(train["user_id"]).sort(), pc.unique(train["item_id"]).sort()
    assert pq.read_table(out / "users.parquet")["user_id"].combine_chunks().equals(users_vocab)
    assert pq.read_table(out / "items.parquet")["item_id"].combine_chunks().equals(items_vocab)  # int32 -> int64
    # rows read back through the vocabulary give back the raw log, in file order
    rows = read_rows(out, "train")
    assert rows["user"].type == pa.int64() and rows["item"].type == pa.int64()
    assert pc.take(users_vocab, rows["user"]).to_pylist() == train["user_id"].to_pylist()
    assert pc.take(items_vocab, rows["item"]).to_pylist() == train["item_id"].to_pylist()
    assert rows["valid"].to_numpy(zero_copy_only=False).tolist() == is_valid[~is_test].tolist()
    seen = pc.and_(pc.is_in(test["user_id"], value_set=users_vocab), pc.is_in(test["item_id"], value_set=items_vocab))
    test_seen = test.filter(seen)
    trows = read_rows(out, "test")
    assert pc.take(users_vocab, trows["user"]).to_pylist() == test_seen["user_id"].to_pylist()
    assert pc.take(items_vocab, trows["item"]).to_pylist() == test_seen["item_id"].to_pylist()
    c = m["counts"]
    assert (c["raw_interactions"], c["train_interactions"], c["test_interactions"]) == (len(raw), len(train),
                                                                                        len(test_seen))
    assert (c["num_users"], c["num_items"]) == (len(users_vocab), len(items_vocab))
    assert c["valid_interactions"] == int(is_valid.sum())
    assert m["dropped"]["test_unseen_user"] + m["dropped"]["test_unseen_item"] == len(test) - len(test_seen)

    # the counts and the pieces
    u, i, v = rows["user"].to_numpy(), rows["item"].to_numpy(), rows["valid"].to_numpy(zero_copy_only=False)
    assert np.load(out / "item_counts.npy").tolist() == np.bincount(i[~v], minlength=c["num_items"]).tolist()
    assert np.load(out / "item_counts_all.npy").tolist() == np.bincount(i, minlength=c["num_items"]).tolist()
    assert np.load(out / "user_counts.npy").tolist() == np.bincount(u, minlength=c["num_users"]).tolist()
    assert np.load(out / "valid_user_counts.npy").tolist() == np.bincount(u[v], minlength=c["num_users"]).tolist()
    assert np.load(out / "test_user_counts.npy").tolist() == np.bincount(trows["user"].to_numpy(),
                                                                        minlength=c["num_users"]).tolist()
    assert c["test_users"] == len(np.unique(trows["user"].to_numpy()))
    pieces = json.loads((out / "train" / "pieces.json").read_text())
    assert sum(p["rows"] for p in pieces) == len(train) and sum(p["fit_rows"] for p in pieces) == len(train) - v.sum()
    assert all(p["rows"] == 50 for p in pieces[:-1]) and 0 < pieces[-1]["rows"] <= 50
    start = 0
    for p in pieces:
        meta = pq.ParquetFile(out / p["file"]).metadata
        assert meta.row_group(p["row_group"]).num_rows == p["rows"]
        group = pq.ParquetFile(out / p["file"]).read_row_group(p["row_group"])
        assert group["valid"].to_numpy(zero_copy_only=False).tolist() == v[start:start + p["rows"]].tolist()
        assert p["fit_rows"] == p["rows"] - int(v[start:start + p["rows"]].sum())
        start += p["rows"]
    assert len({p["file"] for p in pieces}) == -(-len(pieces) // stream.GROUPS_PER_FILE)
    assert prepare(stream_cfg(tmp_path, path, row_group_size=50, valid_fraction=0.1, test_fraction=0.25)) == out


def test_csv_streams_like_parquet(tmp_path):
    path = uneven_log(tmp_path / "log", strings=True, sizes=(30, 400))
    (tmp_path / "csv").mkdir()
    for f in sorted(path.glob("*.parquet")):
        pacsv.write_csv(pq.read_table(f), tmp_path / "csv" / (f.stem + ".csv"))
    from_parquet = prepare(stream_cfg(tmp_path, path))
    from_csv = prepare(DataConfig(name="csv", root=str(tmp_path / "prepared"), path=str(tmp_path / "csv"),
                                  loader="stream", timestamp_column=None))
    for name in ("users.parquet", "items.parquet", "train/part-00000.parquet", "test/part-00000.parquet"):
        assert pq.read_table(from_csv / name).equals(pq.read_table(from_parquet / name))


def test_distinct_ids_bounded_merge_equals_unique(small_batches):
    rng = np.random.default_rng(1)
    acc = stream.DistinctIds(pa.int64())
    chunks = [pa.array(rng.integers(0, 5000, rng.integers(0, 3000))) for _ in range(60)]
    for chunk in chunks:
        acc.add(chunk)
        assert len(acc.known) <= 5000 and acc.pending <= 5000 // 2 + stream.BATCH_ROWS
    assert acc.sorted().equals(pc.unique(pa.concat_arrays(chunks)).sort())


# ---- the split -----------------------------------------------------------------------------------


def test_split_is_by_pair_and_close_to_the_target(tmp_path):
    rng = np.random.default_rng(2)
    n = 60_000
    users, items = rng.integers(0, 400, n), rng.integers(0, 300, n)  # many repeated pairs
    path = write_parts(tmp_path / "log", [(pa.array(users), pa.array(items))], row_group_size=4096)
    out = prepare(stream_cfg(tmp_path, path, test_fraction=0.2, valid_fraction=0.1))
    vocab_u = pq.read_table(out / "users.parquet")["user_id"].to_numpy()
    vocab_i = pq.read_table(out / "items.parquet")["item_id"].to_numpy()
    train, test = read_rows(out, "train"), read_rows(out, "test")
    valid = train["valid"].to_numpy(zero_copy_only=False)

    def pairs(rows: pa.Table, mask=None) -> set:
        u, i = vocab_u[rows["user"].to_numpy()], vocab_i[rows["item"].to_numpy()]
        return set(zip(u.tolist(), i.tolist())) if mask is None else set(zip(u[mask].tolist(), i[mask].tolist()))

    train_pairs, test_pairs = pairs(train), pairs(test)
    assert not train_pairs & test_pairs
    assert not pairs(train, valid) & pairs(train, ~valid)
    distinct = set(zip(users.tolist(), items.tolist()))
    assert train_pairs | test_pairs == distinct  # nothing unseen with this many interactions
    assert abs(len(test_pairs) / len(distinct) - 0.2) < 0.01
    assert abs(len(pairs(train, valid)) / len(train_pairs) - 0.1) < 0.01
    other = prepare(stream_cfg(tmp_path, path, test_fraction=0.2, seed=1))  # another seed, another split
    assert pairs(read_rows(other, "test")) != test_pairs


def test_unseen_test_rows_counted_or_refused(tmp_path):
    # users 1..: one interaction each, with item 5; the ones whose only pair falls in test are unseen.
    users = np.arange(1, 201)
    is_test, _ = split_masks(id_hash(pa.array(users)), id_hash(pa.array(np.full(200, 5))), 0, 0.2, 0.0)
    assert 0 < is_test.sum() < 200
    path = write_parts(tmp_path / "log", [(pa.array(users), pa.array(np.full(200, 5)))])
    refused(tmp_path, path, r"log: the test split is empty \(\d+ rows fell in it, data.test_fraction=0.2, and \d+ had "
                            r"a user or item never seen in training\)")  # found in pass 2: nothing left either
    # with a seen user who has many items, some test rows remain
    many_u, many_i = np.repeat([998, 999], 100), np.tile(np.arange(100), 2)  # an item seen through the other
    path = write_parts(tmp_path / "log2", [(pa.array(users), pa.array(np.full(200, 5))),
                                           (pa.array(many_u), pa.array(many_i))])
    out = prepare(stream_cfg(tmp_path, path))
    m = json.loads((out / "manifest.json").read_text())
    raw = raw_log(path)
    t, _ = reference_split(raw, 0, 0.2)
    train_users = set(raw["user_id"].filter(pa.array(~t)).to_pylist())
    train_items = set(raw["item_id"].filter(pa.array(~t)).to_pylist())
    test_rows = list(zip(raw["user_id"].filter(pa.array(t)).to_pylist(),
                         raw["item_id"].filter(pa.array(t)).to_pylist()))
    unseen_user = sum(u not in train_users for u, _ in test_rows)
    unseen_item = sum(u in train_users and i not in train_items for u, i in test_rows)
    assert unseen_user == is_test.sum() > 0
    assert (m["dropped"]["test_unseen_user"], m["dropped"]["test_unseen_item"]) == (unseen_user, unseen_item)
    assert m["counts"]["test_interactions"] == len(test_rows) - unseen_user - unseen_item > 0
    root = tmp_path / "refused"
    with pytest.raises(DataError, match=r"log2: the test split has \d+ distinct users never seen in training "
                                        r"\(the first: user \d+\).*data.unseen_test=drop"):
        prepare(DataConfig(name="parquet", root=str(root), path=str(path), loader="stream", unseen_test="error",
                           timestamp_column=None))
    assert not root.exists()


# ---- hashed ids ----------------------------------------------------------------------------------


def test_hash_rows_are_stable_across_arrays_types_and_processes():
    ids = pa.array(["a", "b", "é", "a", ""])
    rows = hash_rows(ids, 3, 1000)
    assert rows[0] == rows[3] and rows.dtype == np.int64 and ((0 <= rows) & (rows < 1000)).all()
    assert hash_rows(pa.chunked_array([ids[:2], ids[2:]]), 3, 1000).tolist() == rows.tolist()
    assert hash_rows(pa.array(["é"]), 3, 1000)[0] == rows[2]  # whatever else is in the batch
    ints = pa.array([7, 1 << 40, -5], pa.int64())
    assert hash_rows(pa.array([7, -5], pa.int32()), 0, 97).tolist() == hash_rows(ints, 0, 97)[[0, 2]].tolist()
    assert hash_rows(ints, 0, 1 << 30).tolist() != hash_rows(ints, 1, 1 << 30).tolist()  # seeded
    # the same rows in another process (another PYTHONHASHSEED): nothing depends on Python's hash
    code = ("import pyarrow as pa; from recsys.data.hashing import hash_rows; "
            "print(hash_rows(pa.array(['a', 'b', 'é', 'a', '']), 3, 1000).tolist(), "
            "hash_rows(pa.array([7, 1 << 40, -5]), 0, 1 << 30).tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split("] [") == [str(rows.tolist())[:-1], str(hash_rows(ints, 0, 1 << 30).tolist())[1:] + "\n"]
    # pinned values: a change of the hash would silently remap every saved model's rows
    assert hash_rows(pa.array([0, 1, 2]), 0, 1 << 20).tolist() == GOLDEN_INT
    assert hash_rows(pa.array(["0", "1"]), 0, 1 << 20).tolist() == GOLDEN_STR


GOLDEN_INT = [598732, 902496, 789131]
GOLDEN_STR = [994290, 389160]


def brute_force_collisions(ids, rows):
    distinct = {}
    for i, r in zip(ids, rows):
        distinct[i] = r
    used = set(distinct.values())
    return {"distinct_ids": len(distinct), "rows_used": len(used), "collision_rate": 1 - len(used) / len(distinct)}


@pytest.mark.parametrize("strings", [False, True], ids=["int_ids", "string_ids"])
def test_hash_mode_streaming_and_in_memory_agree(tmp_path, small_batches, strings):
    path = uneven_log(tmp_path / "log", strings, users=400, items=300)
    kw = dict(id_mapping="hash", num_users=64, num_items=32, duplicates="keep", timestamp_column=None)
    streamed = prepare(stream_cfg(tmp_path, path, row_group_size=64, **kw))
    memory = prepare(DataConfig(name="parquet", root=str(tmp_path / "memory"), path=str(path), loader="memory", **kw))
    for out in (streamed, memory):
        m = json.loads((out / "manifest.json").read_text())
        assert (m["counts"]["num_users"], m["counts"]["num_items"]) == (64, 32)
        for which, n in (("users", 64), ("items", 32)):
            ids, rows = id_rows(out, which)
            assert rows.tolist() == hash_rows(ids, 0, n).tolist()  # users.parquet: raw id -> its row
            assert len(set(ids.to_pylist())) == len(ids)
            expected = brute_force_collisions(ids.to_pylist(), rows.tolist())
            got = m["hash"][which]
            assert {k: got[k] for k in expected} == pytest.approx(expected)
            assert got["collision_rate"] > 0  # 400 ids in 64 rows
    # every raw id gets the same row in both preparations, and the streamed rows are the hashed raw ids
    for which in ("users", "items"):
        s_ids, s_rows = id_rows(streamed, which)
        m_ids, m_rows = id_rows(memory, which)
        s_map, m_map = dict(zip(s_ids.to_pylist(), s_rows.tolist())), dict(zip(m_ids.to_pylist(), m_rows.tolist()))
        common = set(s_map) & set(m_map)
        assert len(common) > 0.5 * len(s_map) and all(s_map[k] == m_map[k] for k in common)
    raw = raw_log(path)
    t, _ = reference_split(raw, 0, 0.2)
    train = raw.filter(pa.array(~t))
    rows = read_rows(streamed, "train")
    assert rows["user"].to_numpy().tolist() == hash_rows(train["user_id"], 0, 64).tolist()
    assert rows["item"].to_numpy().tolist() == hash_rows(train["item_id"], 0, 32).tolist()
    ds = Dataset.load(memory)
    assert ds.num_users == 64 and ds.train_users.max() < 64
    with pytest.raises(ValueError, match="id_mapping=hash has no row -> id vocabulary"):
        ds.vocab("users")


def test_identity_ids_stream_as_rows(tmp_path):
    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 50, 3000), rng.integers(0, 40, 3000)
    path = write_parts(tmp_path / "log", [(pa.array(users), pa.array(items))])
    out = prepare(stream_cfg(tmp_path, path, id_mapping="identity", num_users=60, num_items=45))
    m = json.loads((out / "manifest.json").read_text())
    assert (m["counts"]["num_users"], m["counts"]["num_items"]) == (60, 45)
    ids, rows = id_rows(out, "users")
    assert ids.to_pylist() == list(range(60)) and rows.tolist() == list(range(60))
    t, _ = reference_split(pa.table({"user_id": users, "item_id": items}), 0, 0.2)
    assert read_rows(out, "train")["user"].to_numpy().tolist() == users[~t].tolist()
    with pytest.raises(DataError, match=r"log/part-0.parquet, row \d+: user id \d+ \(column 'user_id'\) is out of "
                                        r"range "
                                        r"\[0, 10\) of data.id_mapping=identity with data.num_users=10"):
        prepare(stream_cfg(tmp_path / "bad", path, id_mapping="identity", num_users=10, num_items=45))
    assert not (tmp_path / "bad").exists()


# ---- the synthetic generator ------------------------------------------------------------------------


def test_generator_is_deterministic_exact_and_chunked(tmp_path):
    kw = dict(num_users=500, num_items=200, num_interactions=50_000, latent_dim=4, popularity_exponent=1.0,
              affinity=3.0, chunk_rows=4096, chunks_per_file=5, progress=False)
    assert generate_stream(tmp_path / "a", seed=1, **kw) == 50_000
    generate_stream(tmp_path / "b", seed=1, **kw)
    generate_stream(tmp_path / "c", seed=2, **kw)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [f"part-{k:05d}.parquet" for k in range(3)]  # 13 chunks, 5 per file
    a, b, c = (pq.read_table(tmp_path / x) for x in "abc")
    assert a.equals(b) and not a.equals(c)
    assert len(a) == 50_000 and a.schema.names == ["user_id", "item_id", "timestamp"]
    groups = [pq.ParquetFile(tmp_path / "a" / f).metadata for f in files]
    sizes = [g.row_group(i).num_rows for g in groups for i in range(g.num_row_groups)]
    assert sizes == [4096] * 12 + [50_000 - 12 * 4096]
    users, items = a["user_id"].to_numpy(), a["item_id"].to_numpy()
    assert len(np.unique(users)) <= 500 and len(np.unique(items)) <= 200
    assert users.min() > 500 and items.min() > 200 and (np.diff(a["timestamp"].to_numpy()) >= 0).all()
    # planted structure: popularity is skewed, and users differ from it (their own clusters)
    _, item_codes = np.unique(items, return_inverse=True)
    _, user_codes = np.unique(users, return_inverse=True)
    pop = np.bincount(item_codes) / len(items)
    assert np.sort(pop)[::-1][:20].sum() > 0.3
    per_user = np.zeros((user_codes.max() + 1, len(pop)))
    np.add.at(per_user, (user_codes, item_codes), 1)
    heavy = per_user.sum(1) >= 100
    dist = per_user[heavy] / per_user[heavy].sum(1, keepdims=True)
    assert 0.5 * np.abs(dist - pop).sum(1).mean() > 0.4  # total variation from global popularity
    assert not list(tmp_path.glob(".*tmp*"))


def test_generator_memory_does_not_grow_with_rows(tmp_path):
    peaks = []
    for n in (100_000, 1_000_000):
        tracemalloc.start()
        generate_stream(tmp_path / f"g{n}", 2000, 500, n, 4, 1.0, 3.0, 0, chunk_rows=1 << 14, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks


def test_synthetic_streams_end_to_end(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "data"), loader="stream", num_users=300, num_items=100,
                     num_interactions=20_000, row_group_size=1000, valid_fraction=0.1)
    out = prepare(cfg)
    assert out == prepared_dir(cfg) and not (out / "raw").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["loader"] == "stream" and m["source"] == "synthetic" and m["counts"]["raw_interactions"] == 20_000
    c = m["counts"]
    assert c["train_interactions"] + c["test_interactions"] + sum(m["dropped"].values()) == 20_000
    pieces = json.loads((out / "train" / "pieces.json").read_text())
    assert [p["rows"] for p in pieces][:-1] == [1000] * (len(pieces) - 1)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["train", "test", "users.parquet", "items.parquet", "item_counts.npy", "item_counts_all.npy",
         "user_counts.npy", "valid_user_counts.npy", "test_user_counts.npy", "manifest.json"])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [out.name]


def test_streamed_data_reads_the_valid_user_counts(tmp_path, monkeypatch):
    """The trainer's validation users come from valid_user_counts.npy (no pass over the rows)."""
    from recsys.data.features import FeatureSpec
    from recsys.data.source import StreamedSource

    cfg = DataConfig(root=str(tmp_path / "data"), loader="stream", num_users=300, num_items=100,
                     num_interactions=20_000, row_group_size=1000, valid_fraction=0.1)
    out = prepare(cfg)
    rows = read_rows(out, "train")
    valid = rows["valid"].to_numpy(zero_copy_only=False)
    want = np.bincount(rows["user"].to_numpy()[valid], minlength=300)
    assert want.sum() > 0
    assert np.load(out / "valid_user_counts.npy").tolist() == want.tolist()
    data = StreamedSource(out, json.loads((out / "manifest.json").read_text()), FeatureSpec())
    sets = data.eval_sets(max_users=0)
    assert sets.valid.users.tolist() == np.flatnonzero(want).tolist()


# ---- choosing the loader -----------------------------------------------------------------------------


def test_resolve_loader(tmp_path):
    assert resolve_loader(DataConfig()) == "memory"  # the demo: 500k < 5M
    assert resolve_loader(DataConfig(num_interactions=5_000_000)) == "stream"
    assert resolve_loader(DataConfig(num_interactions=5_000_000, split="temporal")) == "memory"
    assert resolve_loader(DataConfig(num_interactions=5_000_000), memory_reason="history") == "memory"
    with pytest.raises(ConfigError, match="data.loader=stream: model.name=two_tower needs histories; use "
                                          "data.loader=memory"):
        resolve_loader(DataConfig(loader="stream"), memory_reason="model.name=two_tower needs histories")
    path = write_parts(tmp_path / "log", [(pa.array(np.arange(k, k + 30) % 3), pa.array(np.arange(k, k + 30) % 20))
                                          for k in (0, 30)])
    assert resolve_loader(DataConfig(name="parquet", path=str(path), stream_min_rows=60)) == "stream"  # metadata
    assert resolve_loader(DataConfig(name="parquet", path=str(path), stream_min_rows=61)) == "memory"
    assert resolve_loader(DataConfig(name="csv", path=str(path), stream_min_rows=0)) == "memory"
    assert resolve_loader(DataConfig(name="parquet", path=str(tmp_path / "nope"), stream_min_rows=0)) == "memory"
    # the read-only options do not change a memory dataset's identity; the layout does
    base = DataConfig(name="parquet", path=str(path), root=str(tmp_path))
    assert prepared_dir(base) == prepared_dir(DataConfig(name="parquet", path=str(path), root=str(tmp_path),
                                                         num_workers=4, shuffle_buffer=10, row_group_size=5))
    assert prepared_dir(base) != prepared_dir(DataConfig(name="parquet", path=str(path), root=str(tmp_path),
                                                         loader="stream"))
    m = json.loads((prepare(base) / "manifest.json").read_text())
    assert m["loader"] == "memory"


@pytest.mark.parametrize("kw,match", [
    ({"split": "temporal"}, r"data.split=temporal needs the whole log in memory .*use data.loader=memory"),
    ({"duplicates": "error"}, r"data.duplicates=error needs the whole log in memory"),
    ({"name": "movielens", "path": "x"}, r"data.loader=stream reads synthetic, parquet and csv sources; "
                                         r"data=movielens needs data.loader=memory"),
])
def test_unsupported_streaming_options_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(loader="stream", **kw)


# ---- bad input: the file and the column named, nothing written ----------------------------------------------


def test_bad_input_names_the_file_and_column(tmp_path):
    good = (pa.array(np.arange(40)), pa.array(np.arange(40) % 7))
    d = write_parts(tmp_path / "missing", [good])
    pq.write_table(pa.table({"uid": good[0], "item_id": good[1]}), d / "part-1.parquet")
    refused(tmp_path, d, r"missing/part-1.parquet: missing user column 'user_id' \(has \['uid', 'item_id'\]\); "
                         r"set data.user_column")
    d = write_parts(tmp_path / "mixed", [good, (pa.array([str(x) for x in range(40)]), good[1])])
    refused(tmp_path, d, r"mixed/part-1.parquet: column 'user_id' has type string but .*part-0.parquet has integers; "
                         r"every file must give the ids the same type")
    d = write_parts(tmp_path / "float", [(pa.array(np.arange(40.0)), good[1])])
    refused(tmp_path, d, r"float/part-0.parquet: column 'user_id' has type double; ids must be integers or strings")
    d = write_parts(tmp_path / "cols", [good], timestamp=[pa.array(np.arange(40))])
    pq.write_table(pa.table({"user_id": good[0], "item_id": good[1]}), d / "part-1.parquet")
    refused(tmp_path, d, r"cols/part-1.parquet: has columns \['item_id', 'user_id'\] but .*part-0.parquet has "
                         r"\['item_id', 'timestamp', 'user_id'\]", timestamp_column="timestamp")


def test_null_ids_refused_with_file_and_row_or_dropped_and_counted(tmp_path, small_batches):
    users = pa.array([1, 2, 3] * 20 + [None] + [4] * 9, pa.int64())
    d = write_parts(tmp_path / "nulls", [(pa.array(np.arange(50) % 5), pa.array(np.arange(50))),
                                         (users, pa.array(np.arange(70) % 9))])
    refused(tmp_path, d, r"nulls/part-1.parquet, row 61: null user id \(column 'user_id'\); data.null_ids=drop",
            null_ids="error")
    m = json.loads((prepare(stream_cfg(tmp_path, d)) / "manifest.json").read_text())
    assert m["dropped"]["null_ids"] == 1 and m["counts"]["raw_interactions"] == 120
    assert m["counts"]["train_interactions"] + m["counts"]["test_interactions"] + m["dropped"]["test_unseen_user"] \
        + m["dropped"]["test_unseen_item"] == 119


def test_a_source_changed_between_the_passes_is_refused(tmp_path, monkeypatch):
    """data.id_mapping=vocab: a training row whose id the first pass did not see (its file was
    rewritten between the passes) is refused naming the file, never given row -1."""
    good = (pa.array(np.arange(40)), pa.array(np.arange(40) % 7))
    d = write_parts(tmp_path / "logs", [good, good])
    real, calls = stream._batches, []

    def batches(src, cfg, filtered):
        calls.append(1)
        if len(calls) == 2:  # pass 2 starts: part-1 now holds users that pass 1 did not see
            pq.write_table(pa.table({"user_id": pa.array(np.arange(1000, 1040)), "item_id": good[1]}),
                           d / "part-1.parquet")
        yield from real(src, cfg, filtered)

    monkeypatch.setattr(stream, "_batches", batches)
    refused(tmp_path, d, r"logs/part-1.parquet: changed during preparation: \d+ training rows have a user id that "
                         r"the first pass did not see \(the first: 10\d\d\)")
    assert len(calls) == 2


def test_corrupt_file_in_the_middle_leaves_nothing(tmp_path):
    d = write_parts(tmp_path / "logs", [(pa.array(np.arange(3000)), pa.array(np.arange(3000) % 11))] * 3,
                    row_group_size=1000)
    data = bytearray((d / "part-1.parquet").read_bytes())
    data[200:3000] = b"\x07" * 2800  # the data pages, not the footer: found while reading the rows
    (d / "part-1.parquet").write_bytes(bytes(data))
    refused(tmp_path, d, r"logs/part-1.parquet: cannot be read as Parquet")
