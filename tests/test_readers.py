"""Readers of real-data formats (LightGCN, MovieLens, CSV) on small files written here, including
malformed ones, and the validation holdout / history order of the prepared dataset."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from recsys.config import DataConfig
from recsys.data.dataset import Dataset
from recsys.data.prepare import prepare
from recsys.errors import DataError


def cfg(tmp_path, name, path, **kw) -> DataConfig:
    return DataConfig(name=name, root=str(tmp_path / "prepared"), path=str(path), **kw)


def no_output(tmp_path) -> bool:
    prepared = tmp_path / "prepared"
    return not prepared.exists() or not any(prepared.iterdir())


def pairs(ds: Dataset, which: str):
    users = ds.vocab("users").to_pylist()
    items = ds.vocab("items").to_pylist()
    u, i = (ds.train_users, ds.train_items) if which == "train" else (ds.test_users, ds.test_items)
    return sorted((users[a], items[b]) for a, b in zip(u, i))


# ---- LightGCN ------------------------------------------------------------------------------


def write_lightgcn(root, train: str, test: str):
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    return root


def test_lightgcn_keeps_the_given_split(tmp_path):
    root = write_lightgcn(tmp_path / "lg", "0 5 3 9\n1 3\n7 5 1 2 4\n", "0 1\n1 9 2\n7 3\n")
    ds = Dataset.load(prepare(cfg(tmp_path, "lightgcn", root, split="given")))
    assert pairs(ds, "train") == [(0, 3), (0, 5), (0, 9), (1, 3), (7, 1), (7, 2), (7, 4), (7, 5)]
    assert pairs(ds, "test") == [(0, 1), (1, 2), (1, 9), (7, 3)]
    assert ds.vocab("users").type == pa.int64()
    # no timestamps: a history is in the prepared (seeded) order; capped, it is 3 of user 7's 4 items
    hist = ds.history(include_valid=True, max_len=3)
    row7 = ds.vocab("users").to_pylist().index(7)
    items = ds.vocab("items").to_pylist()
    got = [items[i] for i in hist.indices[hist.indptr[row7]:hist.indptr[row7 + 1]]]
    assert len(set(got)) == 3 and set(got) <= {5, 1, 2, 4}
    # the vocabularies: by descending training count, then raw id
    assert ds.vocab("users").to_pylist() == [7, 0, 1] and ds.vocab("items").to_pylist()[:2] == [3, 5]


@pytest.mark.parametrize("train,match", [
    ("0 1 2\n1 3,4\n", r"train.txt, line 2: '3,4' is not an integer id"),
    ("0 1 2\n1 x\n", r"train.txt, line 2: 'x' is not an integer id"),
    ("0 1 2\n\n1 -4\n", r"train.txt, line 3: negative id -4"),
])
def test_lightgcn_malformed_lines_are_named(tmp_path, train, match):
    root = write_lightgcn(tmp_path / "lg", train, "0 3\n")
    with pytest.raises(DataError, match=match):
        prepare(cfg(tmp_path, "lightgcn", root, split="given"))
    assert no_output(tmp_path)


def test_lightgcn_missing_test_file(tmp_path):
    root = tmp_path / "lg"
    root.mkdir()
    (root / "train.txt").write_text("0 1\n")
    with pytest.raises(DataError, match="test.txt: no such file"):
        prepare(cfg(tmp_path, "lightgcn", root, split="given"))
    assert no_output(tmp_path)


# ---- MovieLens -----------------------------------------------------------------------------

ML_ROWS = [(1, 10, 5, 100), (1, 20, 3, 101), (2, 10, 4, 102), (2, 30, 4.5, 103), (3, 20, 1, 104), (3, 30, 4, 105),
           (1, 30, 4, 106), (3, 10, 5, 107)]


def ml_text(sep: str, header: bool = False) -> str:
    lines = ["userId,movieId,rating,timestamp"] if header else []
    for u, i, r, t in ML_ROWS:
        lines.append(sep.join(str(x) for x in (u, i, r, t)))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("layout", ["ml-100k", "ml-1m", "ml-25m"])
def test_movielens_formats_and_threshold(tmp_path, layout):
    root = tmp_path / layout
    root.mkdir()
    if layout == "ml-100k":
        (root / "u.data").write_text(ml_text("\t"))
    elif layout == "ml-1m":
        (root / "ratings.dat").write_text(ml_text("::"))
    else:
        (root / "ratings.csv").write_text(ml_text(",", header=True))
    out = prepare(cfg(tmp_path, "movielens", root, min_rating=4.0, split="temporal", test_fraction=0.2))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dropped"]["below_min_rating"] == 2  # ratings 3 and 1
    assert m["counts"]["raw_interactions"] == 8
    ds = Dataset.load(out)
    positives = sorted((u, i) for u, i, r, _ in ML_ROWS if r >= 4)
    assert sorted(pairs(ds, "train") + pairs(ds, "test")) == positives
    # temporal split: the test rows are the latest timestamps (n - round(0.8 n) of the n positives)
    by_time = [(u, i) for u, i, r, _ in sorted(ML_ROWS, key=lambda row: row[3]) if r >= 4]
    assert sorted(pairs(ds, "test")) == sorted(by_time[round(len(by_time) * 0.8):])


@pytest.mark.parametrize("name,text,match", [
    ("u.data", ml_text(","), r"u.data, line 1: expected 4 '\\t'-separated fields"),
    ("ratings.dat", ml_text("::").replace("2::30", "2::abc"), r"ratings.dat, line 4: item_id 'abc' is not a number"),
    ("ratings.csv", ml_text(",", header=True).replace("3,20,1", "3,x,1"), r"ratings.csv, line 6: item_id 'x' is not a number"),
    ("ratings.csv", "user,item,rating,ts\n1,2,3,4\n", r"ratings.csv, line 1: header"),
])
def test_movielens_malformed_is_named(tmp_path, name, text, match):
    root = tmp_path / "ml"
    root.mkdir()
    (root / name).write_text(text)
    with pytest.raises(DataError, match=match):
        prepare(cfg(tmp_path, "movielens", root, min_rating=4.0))
    assert no_output(tmp_path)


def test_movielens_directory_without_ratings(tmp_path):
    (tmp_path / "ml").mkdir()
    with pytest.raises(DataError, match="no MovieLens ratings file"):
        prepare(cfg(tmp_path, "movielens", tmp_path / "ml"))


# ---- generic CSV ---------------------------------------------------------------------------


def test_csv_directory_with_column_mapping_and_string_ids(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    (d / "a.csv").write_text("who;what;when;stars\nann;x1;1;5\nann;x2;2;2\nbob;x1;3;4\n")
    (d / "b.csv").write_text("who;what;when;stars\nbob;x3;4;5\ncid;x2;5;4\ncid;x3;6;4\nann;x3;7;5\n")
    out = prepare(cfg(tmp_path, "csv", d, separator=";", user_column="who", item_column="what",
                      timestamp_column="when", rating_column="stars", min_rating=4, split="temporal",
                      test_fraction=0.3))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dropped"]["below_min_rating"] == 1
    assert m["schema"]["user_id"] == "string" and m["schema"]["item_id"] == "string"
    ds = Dataset.load(out)
    assert sorted(pairs(ds, "train") + pairs(ds, "test")) == sorted(
        [("ann", "x1"), ("bob", "x1"), ("bob", "x3"), ("cid", "x2"), ("cid", "x3"), ("ann", "x3")])


@pytest.mark.parametrize("text,kw,match", [
    ("user_id;item_id\n1;2\n", {}, r"missing user column 'user_id' .*is the separator right"),
    ("user_id,item\n1,2\n", {}, r"missing item column 'item_id'"),
    ("user_id,item_id\n1.5,2\n", {}, r"column 'user_id' has type double; ids must be integers or strings"),
    ("user_id,item_id,r\n1,2,good\n", {"rating_column": "r", "min_rating": 1}, r"rating column 'r' has type string"),
])
def test_csv_malformed_is_named(tmp_path, text, kw, match):
    path = tmp_path / "log.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        prepare(cfg(tmp_path, "csv", path, **kw))
    assert str(path) in str(err.value)
    assert no_output(tmp_path)


# ---- validation holdout ----------------------------------------------------------------------


def test_valid_holdout_is_per_user_and_carved_from_train(tmp_path):
    rng = np.random.default_rng(0)
    lines_train, lines_test = [], []
    for u in range(40):
        items = rng.choice(300, size=5 + u % 17, replace=False)
        lines_train.append(" ".join(map(str, [u, *items[:-2]])))
        lines_test.append(" ".join(map(str, [u, *items[-2:]])))
    root = write_lightgcn(tmp_path / "lg", "\n".join(lines_train) + "\n", "\n".join(lines_test) + "\n")
    out = prepare(cfg(tmp_path, "lightgcn", root, split="given", valid_fraction=0.25))
    ds = Dataset.load(out)
    per_user = np.bincount(ds.train_users, minlength=ds.num_users)
    held = np.bincount(ds.train_users[ds.valid], minlength=ds.num_users)
    np.testing.assert_array_equal(held, np.floor(per_user * 0.25))
    assert json.loads((out / "manifest.json").read_text())["counts"]["valid_interactions"] == int(held.sum())
    fit_u, fit_i = ds.fit_pairs()
    assert len(fit_u) + held.sum() == len(ds.train_users)
    fit = set(zip(fit_u.tolist(), fit_i.tolist()))
    valid = set(zip(ds.train_users[ds.valid].tolist(), ds.train_items[ds.valid].tolist()))
    test = set(zip(ds.test_users.tolist(), ds.test_items.tolist()))
    assert not fit & valid and not valid & test
    # the training history without the holdout holds exactly the fit pairs
    hist = ds.history(include_valid=False)
    got = {(u, int(i)) for u in range(ds.num_users) for i in hist.indices[hist.indptr[u]:hist.indptr[u + 1]]}
    assert got == fit
    # each item's users (the item-side bag): all of them, or a fixed random subset when capped
    ih = ds.item_history(include_valid=False)
    got = {(int(u), i) for i in range(ds.num_items) for u in ih.indices[ih.indptr[i]:ih.indptr[i + 1]]}
    assert got == fit
    capped = ds.item_history(include_valid=True, max_len=2, seed=3)
    full = ds.item_history(include_valid=True)
    for i in range(ds.num_items):
        sub = set(capped.indices[capped.indptr[i]:capped.indptr[i + 1]].tolist())
        whole = set(full.indices[full.indptr[i]:full.indptr[i + 1]].tolist())
        assert sub <= whole and len(sub) == min(2, len(whole))
