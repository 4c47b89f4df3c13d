"""The catalogue of bad input (issue 5), in one place.

Each case gives a ``DataError`` / ``ConfigError`` whose one-line message names the file, the
column or row/line, and the reason, and leaves nothing behind: ``data.root`` is not even created
when the input is refused. Most cases call ``recsys.data.prepare`` (what the entry points call);
a few run ``python -m recsys.train`` to check the exit code 2, a one-paragraph stderr without a
traceback, and that neither ``data.root`` nor the run directory holds partial output."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.config import DataConfig
from recsys.data.dataset import Dataset
from recsys.data.prepare import prepare
from recsys.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, **cols) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def good_log(path: Path, n: int = 200, users: int = 20, items: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write(path, user_id=pa.array(rng.integers(0, users, n)), item_id=pa.array(rng.integers(0, items, n)),
                 timestamp=pa.array(np.arange(n)))


def refused(tmp_path, path, match, name="parquet", error=DataError, **kw) -> str:
    """prepare() refuses the input with a message matching `match` and leaves no output."""
    root = tmp_path / "prepared"
    with pytest.raises(error, match=match) as err:
        prepare(DataConfig(name=name, root=str(root), path=str(path), **kw))
    message = str(err.value)
    assert "\n" not in message
    assert not root.exists(), sorted(root.rglob("*"))  # nothing written, not even data.root
    return message


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---- files that cannot be read -------------------------------------------------------------


def test_path_does_not_exist(tmp_path):
    for name in ("parquet", "csv", "lightgcn", "movielens"):
        kw = {"split": "given"} if name == "lightgcn" else {}
        refused(tmp_path, tmp_path / "nope", r"nope: no such file or directory \(data.path\)", name, **kw)


def test_empty_directory(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "_SUCCESS").write_text("")  # ignored like Spark's markers
    refused(tmp_path, tmp_path / "logs", r"logs: directory holds no Parquet files")
    refused(tmp_path, tmp_path / "logs", r"logs: directory holds no CSV \(separator ','\) files", "csv")
    refused(tmp_path, tmp_path / "logs", r"logs: no MovieLens ratings file", "movielens")
    refused(tmp_path, tmp_path / "logs", r"train.txt: no such file", "lightgcn", split="given")


def test_not_in_the_declared_format(tmp_path):
    text = tmp_path / "log.parquet"
    text.write_text("user_id,item_id\n1,2\n")
    refused(tmp_path, text, r"log.parquet: cannot be read as Parquet: .*magic bytes")
    parquet = good_log(tmp_path / "log2.parquet")
    refused(tmp_path, parquet, r"log2.parquet: cannot be read as CSV \(separator ','\) \(it is a Parquet file: "
                             r"data=parquet\?\): .*CSV parse error", "csv")
    lg = tmp_path / "lg"
    lg.mkdir()
    (lg / "train.txt").write_bytes(parquet.read_bytes())
    (lg / "test.txt").write_text("0 1\n")
    refused(tmp_path, lg, r"train.txt: not a text file", "lightgcn", split="given")


def test_truncated_and_corrupt_parquet_name_the_file(tmp_path):
    good = good_log(tmp_path / "logs" / "a.parquet", n=2000)
    data = good.read_bytes()
    trunc = tmp_path / "logs" / "b.parquet"
    trunc.write_bytes(data[: len(data) // 2])
    refused(tmp_path, tmp_path / "logs", r"logs/b.parquet: cannot be read as Parquet: .*magic bytes not found")
    refused(tmp_path, trunc, r"b.parquet: cannot be read as Parquet")
    # the footer is intact but a data page is not: found when the columns are read
    trunc.unlink()
    corrupt = bytearray(data)
    corrupt[60:400] = b"\x00" * 340
    (tmp_path / "logs" / "c.parquet").write_bytes(bytes(corrupt))
    refused(tmp_path, tmp_path / "logs", r"logs/c.parquet: cannot be read as Parquet \(corrupt or truncated\?\)")


def test_missing_user_or_item_column(tmp_path):
    path = write(tmp_path / "log.parquet", uid=pa.array([1]), item_id=pa.array([2]))
    refused(tmp_path, path, r"log.parquet: missing user column 'user_id' \(has \['uid', 'item_id'\]\); "
                            r"set data.user_column")
    refused(tmp_path, path, r"log.parquet: missing item column 'sku' .*set data.item_column",
            user_column="uid", item_column="sku")


@pytest.mark.parametrize("ids,match", [
    (pa.array([1.0, 2.0]), r"column 'user_id' has type double; ids must be integers or strings"),
    (pa.array([[1], [2]], pa.list_(pa.int64())), r"column 'user_id' has type list<element: int64>; ids must be"),
    (pa.array([{"a": 1}, {"a": 2}]), r"column 'user_id' has type struct<a: int64>; ids must be"),
])
def test_wrong_id_type(tmp_path, ids, match):
    path = write(tmp_path / "log.parquet", user_id=ids, item_id=pa.array([1, 2]))
    refused(tmp_path, path, r"log.parquet: " + match)


def test_files_of_one_directory_disagree_on_the_id_type(tmp_path):
    write(tmp_path / "logs" / "a.parquet", user_id=pa.array([1, 2]), item_id=pa.array([1, 2]))
    write(tmp_path / "logs" / "b.parquet", user_id=pa.array(["x", "y"]), item_id=pa.array([1, 2]))
    refused(tmp_path, tmp_path / "logs", r"logs/b.parquet: column 'user_id' has type string but .*a.parquet "
                                         r"has int64; every file must give the ids the same type")


def test_files_of_one_directory_disagree_on_the_columns(tmp_path):
    write(tmp_path / "logs" / "a.parquet", user_id=pa.array([1, 2]), item_id=pa.array([1, 2]), timestamp=pa.array([5, 6]))
    write(tmp_path / "logs" / "b.parquet", user_id=pa.array([3, 4]), item_id=pa.array([1, 2]))
    refused(tmp_path, tmp_path / "logs", r"logs/b.parquet: has columns \['item_id', 'user_id'\] but .*a.parquet has "
                                         r"\['item_id', 'timestamp', 'user_id'\] .*every file must have the same ones")


# ---- null ids: dropped and counted, or refused -----------------------------------------------


def test_null_ids_dropped_and_counted_or_refused(tmp_path):
    users = [1, 2, None, 3, 1, 2, 3, 1, None, 2] * 3
    items = [1, 2, 3, None, 4, 5, 6, 7, 8, 9] * 3
    path = write(tmp_path / "log.parquet", user_id=pa.array(users, pa.int64()), item_id=pa.array(items, pa.int64()))
    out = prepare(DataConfig(name="parquet", root=str(tmp_path / "ok"), path=str(path), duplicates="keep",
                             timestamp_column=None))
    m = manifest(out)
    assert m["dropped"]["null_ids"] == 9  # three rows with a null id, three times
    assert m["counts"]["raw_interactions"] == 30
    assert m["counts"]["train_interactions"] + m["counts"]["test_interactions"] + m["dropped"]["null_ids"] + \
        m["dropped"]["test_unseen_user"] + m["dropped"]["test_unseen_item"] == 30
    refused(tmp_path, path, r"log.parquet, row 3: null user id \(column 'user_id'\); 9 rows of this file have a "
                            r"null user or item id \(data.null_ids=drop", null_ids="error")
    csv = tmp_path / "log.csv"
    csv.write_text("u,i\n1,2\n2,\n")
    refused(tmp_path, csv, r"log.csv, row 2: null item id \(column 'i'\)", "csv", user_column="u", item_column="i",
            null_ids="error")
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "u.data").write_text("1\t2\t5\t10\n\t3\t5\t11\n")
    refused(tmp_path, ml, r"u.data, line 2: null user id", "movielens", null_ids="error")


# ---- integer ids that are the rows (data.id_mapping=identity) ------------------------------------


def test_identity_ids_are_the_rows(tmp_path):
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 50, 2000), rng.integers(0, 40, 2000)
    path = write(tmp_path / "log.parquet", user_id=pa.array(users.astype(np.int32)), item_id=pa.array(items))
    out = prepare(DataConfig(name="parquet", root=str(tmp_path / "ok"), path=str(path), id_mapping="identity",
                             num_users=60, num_items=45, timestamp_column=None))
    ds = Dataset.load(out)
    assert (ds.num_users, ds.num_items) == (60, 45)  # the declared sizes, not the ids seen
    assert ds.vocab("users").to_pylist() == list(range(60)) and ds.vocab("items").to_pylist() == list(range(45))
    pairs = set(zip(users.tolist(), items.tolist()))
    got = set(zip(ds.train_users.tolist(), ds.train_items.tolist())) | set(zip(ds.test_users.tolist(),
                                                                               ds.test_items.tolist()))
    assert got <= pairs and set(zip(ds.train_users.tolist(), ds.train_items.tolist())) <= pairs


@pytest.mark.parametrize("users,items,match", [
    ([0, 1, -3, 2], [0, 1, 2, 3], r"log.parquet, row 3: user id -3 \(column 'user_id'\) is out of range \[0, 10\) "
                                  r"of data.id_mapping=identity with data.num_users=10 \(1 such rows in this file\)"),
    ([0, 1, 2, 3], [0, 12, 2, 20], r"log.parquet, row 2: item id 12 \(column 'item_id'\) is out of range \[0, 10\) "
                                   r".*data.num_items=10 \(2 such rows"),
    (["a", "b", "c", "d"], [0, 1, 2, 3], r"log.parquet: column 'user_id' has type string; data.id_mapping=identity "
                                         r"needs integer user ids"),
])
def test_identity_ids_out_of_range(tmp_path, users, items, match):
    path = write(tmp_path / "log.parquet", user_id=pa.array(users), item_id=pa.array(items))
    refused(tmp_path, path, match, id_mapping="identity", num_users=10, num_items=10)


def test_identity_ids_out_of_range_in_lightgcn_and_movielens(tmp_path):
    lg = tmp_path / "lg"
    lg.mkdir()
    (lg / "train.txt").write_text("0 1 2\n1 2 3\n")
    (lg / "test.txt").write_text("0 3\n1 0 7\n")
    refused(tmp_path, lg, r"test.txt, line 2: item id 7 is out of range \[0, 5\) of data.id_mapping=identity with "
                          r"data.num_items=5", "lightgcn", split="given", id_mapping="identity", num_users=2,
            num_items=5)
    refused(tmp_path, lg, r"train.txt, line 2: user id 1 is out of range \[0, 1\)", "lightgcn", split="given",
            id_mapping="identity", num_users=1, num_items=5)
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,5,10\n1,99,5,11\n")
    refused(tmp_path, ml, r"ratings.csv, line 3: item id 99 \(column 'movieId'\) is out of range \[0, 50\)",
            "movielens", id_mapping="identity", num_users=5, num_items=50)


def test_identity_needs_files_and_sizes():
    with pytest.raises(ConfigError, match="data=synthetic makes its own ids"):
        DataConfig(id_mapping="identity")
    with pytest.raises(ConfigError, match="needs data.num_users and data.num_items"):
        DataConfig(name="parquet", path="x", id_mapping="identity", num_users=0)


# ---- empty after filtering -------------------------------------------------------------------


def test_empty_after_filtering(tmp_path):
    path = write(tmp_path / "log.parquet", user_id=pa.array([1, 2, 3]), item_id=pa.array([1, 2, 3]),
                 stars=pa.array([1.0, 2.0, 3.0]))
    refused(tmp_path, path, r"log.parquet: no interactions with rating >= 4.5 \(data.min_rating\): all 3 rows are "
                            r"below it", rating_column="stars", min_rating=4.5)
    nulls = write(tmp_path / "nulls.parquet", user_id=pa.array([None, None], pa.int64()), item_id=pa.array([1, 2]))
    refused(tmp_path, nulls, r"nulls.parquet: no interactions \(after dropping 2 rows with null ids\)")
    # one interaction per user: a random per-user holdout leaves nothing to test
    single = write(tmp_path / "single.parquet", user_id=pa.array([1, 2, 3]), item_id=pa.array([1, 2, 3]))
    refused(tmp_path, single, r"single.parquet: the test split is empty \(data.split=random holds out floor\(n \* 0.2\) of each "
                               r"user's n interactions: no user has enough\); rows dropped: ", timestamp_column=None)


# ---- test interactions never seen in training --------------------------------------------------


def test_unseen_test_users_and_items_counted_or_refused(tmp_path):
    train = write(tmp_path / "train.parquet", user_id=pa.array(["u1", "u2", "u2"]), item_id=pa.array([1, 1, 2]))
    test = write(tmp_path / "test.parquet", user_id=pa.array(["u1", "u3", "u2", "u4"]), item_id=pa.array([2, 1, 7, 1]))
    out = prepare(DataConfig(name="parquet", root=str(tmp_path / "ok"), path=str(train), test_path=str(test),
                             split="given"))
    m = manifest(out)
    assert (m["dropped"]["test_unseen_user"], m["dropped"]["test_unseen_item"]) == (2, 1)
    assert m["counts"]["test_interactions"] == 1
    refused(tmp_path, train, r"test.parquet: of 4 test interactions, 2 have a user never seen in training \(the "
                             r"first: user 'u3'\) and 1 have an item never seen in training \(the first: item 7\); "
                             r"no vector is trained for them \(data.unseen_test=drop",
            test_path=str(test), split="given", unseen_test="error")


# ---- duplicate interactions --------------------------------------------------------------------


def test_duplicates_dropped_kept_or_refused(tmp_path):
    users = [1, 1, 1, 2, 2, 2, 1, 2, 3, 3, 3]
    items = [1, 2, 3, 1, 2, 3, 1, 1, 1, 2, 2]  # (1, 1) x2, (2, 1) x2, (3, 2) x2: 3 repeats
    path = write(tmp_path / "log.parquet", user_id=pa.array(users), item_id=pa.array(items),
                 timestamp=pa.array(np.arange(11)))
    kw = dict(name="parquet", path=str(path), test_fraction=0.5)
    dropped = manifest(prepare(DataConfig(root=str(tmp_path / "drop"), **kw)))
    assert dropped["dropped"]["duplicates"] == 3 and dropped["kept"] == {}
    kept = manifest(prepare(DataConfig(root=str(tmp_path / "keep"), duplicates="keep", **kw)))
    assert kept["kept"] == {"duplicates": 3} and "duplicates" not in kept["dropped"]
    total = lambda m: m["counts"]["train_interactions"] + m["counts"]["test_interactions"] + \
        m["dropped"]["test_unseen_user"] + m["dropped"]["test_unseen_item"]
    assert total(kept) == 11 and total(dropped) == 8
    refused(tmp_path, path, r"log.parquet: 3 duplicate \(user, item\) interactions, the first: user 1, item 1 "
                            r"\(data.duplicates=drop keeps the first", duplicates="error")


# ---- configuration: refused before any work ----------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"duplicates": "sometimes"}, "data.duplicates must be drop, keep or error"),
    ({"null_ids": "fill"}, "data.null_ids must be drop or error"),
    ({"unseen_test": "keep"}, "data.unseen_test must be drop or error"),
    ({"id_mapping": "sha"}, "data.id_mapping must be vocab, identity or hash"),
])
def test_bad_data_policies_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(name="parquet", path="x", **kw)


# ---- the real entry point: exit 2, one paragraph, no traceback, no partial output ------------------


def run_args(tmp_path) -> list:
    return [f"data.root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}", "train.progress=false"]


RUN_OUTPUTS = ("metrics.json", "export", "summary.md", "tensorboard", "checkpoints", "metrics.png", "loss.png")


def corrupt_file(tmp_path):
    path = good_log(tmp_path / "in" / "log.parquet", n=2000)
    data = bytearray(path.read_bytes())
    data[60:400] = b"\x00" * 340
    path.write_bytes(bytes(data))
    return ["data=parquet", f"data.path={path}"], r"log.parquet: cannot be read as Parquet \(corrupt or truncated\?\)"


def null_ids(tmp_path):
    path = write(tmp_path / "in" / "log.parquet", user_id=pa.array([1, None, 2], pa.int64()), item_id=pa.array([1, 2, 3]))
    return ["data=parquet", f"data.path={path}", "data.null_ids=error"], r"log.parquet, row 2: null user id"


def k_too_large(tmp_path):
    return ["+experiment=tiny", "eval.ks=[10,5000]"], r"K=5000 is larger than the number of items \(200\)"


def dimension_zero(tmp_path):
    return ["+experiment=tiny", "model.embedding_dim=0"], r"invalid configuration: model.embedding_dim must be positive"


@pytest.mark.parametrize("case", [corrupt_file, null_ids, k_too_large, dimension_zero])
def test_cli_exits_2_with_one_line_and_no_output(tmp_path, command, case):
    args, match = case(tmp_path)
    code, _, stderr = command("train", *args, *run_args(tmp_path))
    assert code == 2, stderr[-3000:]
    err = stderr.strip()
    assert "Traceback" not in stderr and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    import re

    assert re.search(match, err), err
    data = tmp_path / "data"
    if case is k_too_large:  # the data was fine: a complete prepared dataset, nothing else
        entries = sorted(p.name for p in data.iterdir())
        assert len(entries) == 1 and not entries[0].startswith("."), entries
        assert (data / entries[0] / "manifest.json").exists()
    else:
        assert not data.exists() or not any(data.iterdir()), sorted(data.rglob("*"))
    run = tmp_path / "run"
    assert not any((run / name).exists() for name in RUN_OUTPUTS), sorted(p.name for p in run.iterdir())
    assert not list(run.glob("*.png")) and not list(run.glob(".*tmp*"))


def test_cli_unknown_key_is_refused_by_hydra(tmp_path, command):
    code, _, stderr = command("train", "+experiment=tiny", "model.embeding_dim=8", *run_args(tmp_path))
    assert code != 0 and "Traceback" not in stderr
    assert "Key 'embeding_dim' not in 'ModelConfig'" in stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_cli_batch_not_divisible_by_world_size(tmp_path, cli):
    # The ranks exit 2 with the one-line error (torchrun may stop the second rank once the first
    # has exited); torchrun then reports the failed ranks, with its own launcher traceback, and exits 1.
    proc = cli(["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "recsys.train",
                "+experiment=tiny", "train.batch_size=255", *run_args(tmp_path)])
    assert proc.returncode != 0
    # (the two ranks' lines may interleave on the shared stderr)
    assert "error: train.batch_size=255 is not divisible by the world size 2" in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # the root cause: a rank's exit 2
    assert "recsys/" not in proc.stderr  # no frame of the project's code: the ranks did not crash
    assert not (tmp_path / "data").exists()  # refused before the data is prepared
    run = tmp_path / "run"
    assert not any((run / name).exists() for name in RUN_OUTPUTS)


# ---- the prepared dataset is committed whole, or not at all ----------------------------------------


def test_interrupted_prepare_leaves_no_dataset_and_its_leftovers_are_not_reused(tmp_path, monkeypatch):
    import recsys.data.engine as engine
    import recsys.data.prepare as data

    path = good_log(tmp_path / "log.parquet")
    cfg = DataConfig(name="parquet", root=str(tmp_path / "prepared"), path=str(path))
    real = engine.write_pieces
    written = []

    def dies_after_the_rows(root, part):  # train/ and test/ written by the engine, the rest not yet
        written.extend(sorted(p.name for p in root.iterdir() if not p.name.startswith("_")))
        raise KeyboardInterrupt  # as if the job were stopped while writing

    monkeypatch.setattr(engine, "write_pieces", dies_after_the_rows)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert written == ["test", "train"]
    assert list((tmp_path / "prepared").iterdir()) == []  # the half-written temporary directory is gone
    monkeypatch.setattr(engine, "write_pieces", real)

    # A SIGKILLed prepare leaves its temporary directory: never taken for the dataset, removed later.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = data.prepared_dir(cfg)
    stale = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{dead.pid}")
    stale.mkdir()
    (stale / "manifest.json").write_bytes(b"half")
    out = prepare(cfg)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == [out.name]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["items.parquet", "manifest.json", "test", "train", "users.parquet", "item_counts.npy", "item_counts_all.npy",
         "user_counts.npy", "valid_user_counts.npy", "test_user_counts.npy", "test_missing_user_counts.npy"])
    ref = prepare(DataConfig(name="parquet", root=str(tmp_path / "ref"), path=str(path)))  # uninterrupted
    for name in ("train/part-00000", "test/part-00000", "users", "items"):
        assert pq.read_table(out / f"{name}.parquet").equals(pq.read_table(ref / f"{name}.parquet"))
