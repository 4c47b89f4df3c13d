"""Pre-trained vectors: the rows of the ids a vector file has start from its vectors, under every
sharding, on 1 and 2 ranks (against the vocabulary read back from the prepared files and the
same model initialised without them); the match rate reaches metrics.json; bad vector files
are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

TINY = ["+experiment=tiny", "train.progress=false", "eval.popularity=false", "export.enabled=false"]


def write_vectors(path: Path, ids, dim: int, seed: int = 0, id_name: str = "item_id") -> dict:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(ids), dim)).astype(np.float32)
    flat = pa.array(vectors.reshape(-1))
    pq.write_table(pa.table({id_name: pa.array(ids), "vector": pa.FixedSizeListArray.from_arrays(flat, dim)}), path,
                   row_group_size=7)  # many row groups: the file is streamed
    first = {}
    for i, v in zip(ids, vectors):
        first.setdefault(i, v)  # a repeated id: its first vector is the one used
    return first


def tables_rank(cfg, with_pretrained: bool):
    """On each rank: the model of `cfg` built and initialised (with or without its pre-trained
    vectors); rank 0 returns the full tables, the dataset's path and the figures."""
    import dataclasses

    from recsys.parallelize import destroy_distributed, gather_tables, init_distributed
    from recsys.training.pretrained import init_all_pretrained
    from recsys.training.setup import build_model, open_data

    if not with_pretrained:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_items=None,
                                                                 pretrained_users=None))
    info = init_distributed("cpu")
    data = open_data(cfg, progress=False)
    sharded = build_model(cfg, data.num_users, data.num_items, info.device, info.world_size)
    figures = init_all_pretrained(sharded.dmp, data, cfg.model) if with_pretrained else None
    tables = {k: v.float().numpy() for k, v in gather_tables(sharded.dmp).items()}
    out = {"tables": tables, "path": str(data.path), "figures": figures} if info.rank == 0 else None
    destroy_distributed()
    return out


@pytest.mark.parametrize("world,sharding,dim", [(1, [], 16), (2, ["row_wise"], 16), (2, ["table_wise"], 16),
                                               (2, ["table_row_wise"], 16), (2, ["column_wise"], 256)])
def test_pretrained_rows_land_on_their_ids_under_every_sharding(ranks, config, tmp_path, world, sharding, dim):
    from recsys.data.prepare import prepare

    item_file, user_file = tmp_path / "items.parquet", tmp_path / "users.parquet"
    cfg = config([*TINY, f"data.root={tmp_path / 'data'}", f"model.pretrained_items={item_file}",
                  f"model.pretrained_users={user_file}", f"train.sharding_types={sharding}",
                  f"model.embedding_dim={dim}"])
    prepared = Path(prepare(cfg.data))
    item_ids = pq.read_table(prepared / "items.parquet").column(0).to_pylist()
    user_ids = pq.read_table(prepared / "users.parquet").column(0).to_pylist()
    # some of the dataset's ids (one twice) and ids it does not have
    items = write_vectors(item_file, [item_ids[3], item_ids[150], 10**15, item_ids[7], item_ids[0],
                                                       item_ids[-1], item_ids[3], 10**15 + 1, item_ids[64]], dim, seed=1)
    users = write_vectors(user_file, user_ids[::3] + [10**15], dim, seed=2, id_name="uid")
    got = next(o for o in ranks(world, tables_rank, cfg, True) if o)
    plain = next(o for o in ranks(world, tables_rank, cfg, False) if o)
    for which, table, vectors in (("items", "item", items), ("users", "user", users)):
        # the vocabulary, read back from the prepared files: row k holds the k-th id
        vocab = pq.read_table(Path(got["path"]) / f"{which}.parquet").column(0).to_pylist()
        matched = 0
        for row, raw in enumerate(vocab):
            if raw in vectors:
                np.testing.assert_array_equal(got["tables"][table][row], vectors[raw])
                matched += 1
            else:  # the usual initialisation, as without vectors
                np.testing.assert_array_equal(got["tables"][table][row], plain["tables"][table][row])
        figures = got["figures"][which]
        assert figures["rows"] == len(vocab) and figures["rows_matched"] == matched > 0
        assert figures["match_rate"] == pytest.approx(matched / len(vocab), abs=1e-6)
    assert got["figures"]["items"]["file_rows"] == 9
    assert got["figures"]["items"]["repeated_ids"] == 1  # once, however the table's columns are split


def test_the_first_vector_of_a_repeated_id_is_used(tmp_path):
    from recsys.data.vectors import vectors_for

    path = tmp_path / "v.parquet"
    flat = pa.array(np.arange(10, dtype=np.float32))
    pq.write_table(pa.table({"id": pa.array(["b", "a", "b", "z", "c"]),
                             "vector": pa.FixedSizeListArray.from_arrays(flat, 2)}), path, row_group_size=2)
    found = vectors_for(path, pa.array(["a", "b", "c", "d"]), 2, "item_id")
    by_position = dict(zip(found.positions.tolist(), found.vectors.tolist()))
    assert by_position == {1: [0.0, 1.0], 0: [2.0, 3.0], 2: [8.0, 9.0]}  # "b" -> its first row
    assert found.file_rows == 5 and found.repeated.tolist() == [1]  # "b" (position 1) once more


def test_training_records_the_match_rate(train_here, config, tmp_path):
    path = tmp_path / "items.parquet"
    from recsys.data.prepare import prepare

    cfg_args = [*TINY, f"data.root={tmp_path / 'data'}", f"model.pretrained_items={path}", "train.max_steps=4"]
    item_ids = pq.read_table(Path(prepare(config(cfg_args).data)) / "items.parquet").column(0).to_pylist()
    write_vectors(path, item_ids[::2] + [10**15], 16)
    metrics = train_here([*TINY, f"data.root={tmp_path / 'data'}", f"model.pretrained_items={path}",
                          "train.max_steps=4"], tmp_path / "run")
    figures = metrics["pretrained"]["items"]
    assert figures["file_rows"] == 101 and figures["rows_matched"] == 100 and figures["rows"] == 200
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["pretrained"] == metrics["pretrained"]
    # the same command again resumes the finished run: the figures come back from its checkpoint
    again = train_here([*TINY, f"data.root={tmp_path / 'data'}", f"model.pretrained_items={path}",
                        "train.max_steps=4"], tmp_path / "run")
    assert again["train"]["steps"] == 4 and again["pretrained"] == metrics["pretrained"]


@pytest.mark.parametrize("case,match", [
    ("no_vector", r"v\.parquet: no column 'vector'"),
    ("dim", r"v\.parquet: column 'vector' has vectors of length 3.*model\.embedding_dim is 16"),
    ("id_type", r"v\.parquet: column 'item_id' has ids of type string but the dataset's ids are int64"),
    ("two_id_columns", r"v\.parquet: which column holds the ids\?"),
    ("users_for_items", r"v\.parquet: its ids are in column 'user_id', another table's"),
    ("nan", r"v\.parquet: column 'vector' has null, NaN or infinite values"),
])
def test_bad_vector_files_are_one_line_errors(train_here, tmp_path, case, match):
    # (on several ranks every rank reads the whole file, so each raises the same error)
    from recsys.errors import DataError

    path = tmp_path / "v.parquet"
    columns = {
        "no_vector": {"item_id": pa.array([1, 2]), "emb": pa.array([[0.0], [1.0]])},
        "dim": {"item_id": pa.array([1, 2]), "vector": pa.array([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]])},
        "id_type": {"item_id": pa.array(["1", "2"]), "vector": pa.array([[0.0] * 16, [1.0] * 16])},
        "two_id_columns": {"a": pa.array([1]), "b": pa.array([2]), "vector": pa.array([[0.0] * 16])},
        "users_for_items": {"user_id": pa.array([1]), "vector": pa.array([[0.0] * 16])},
        "nan": {"item_id": pa.array([1, 2]), "vector": pa.array([[0.0] * 16, [float("nan")] + [0.0] * 15])},
    }[case]
    pq.write_table(pa.table(columns), path)
    with pytest.raises(DataError, match=match) as e:
        train_here([*TINY, f"data.root={tmp_path / 'data'}", f"model.pretrained_items={path}"], tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_bad_file_fails_every_rank_even_one_without_rows_of_the_table(ranks, config, tmp_path):
    # table-wise on 2 ranks: one rank holds the item table, the other none of it; both must stop
    # (an error on one rank alone would leave the other waiting in the next collective)
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"item_id": pa.array([1]), "vector": pa.array([[0.0, 1.0]])}), path)
    cfg = config([*TINY, f"data.root={tmp_path / 'data'}", f"model.pretrained_items={path}",
                  "train.sharding_types=[table_wise]"])
    with pytest.raises(AssertionError) as e:
        ranks(2, tables_rank, cfg, True)
    assert str(e.value).count("has vectors of length 2; model.embedding_dim is 16") == 2  # both ranks
