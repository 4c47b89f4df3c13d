"""Pre-trained vectors: the rows of the ids a vector file has start from its vectors, under every
sharding, on 1 and 2 ranks (against the vocabulary read back from the prepared files and the
same model initialised without them); the match rate reaches metrics.json; bad vector files
are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

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
    ("dim", r"v\.parquet: column 'vector' has vectors of length 3 but model\.embedding_dim is 16 "
            r"\(model\.pretrained_items\): set model\.pretrained_frozen=true for a trained linear map$"),
    ("mixed_dims", r"v\.parquet: column 'vector' has vectors of length 3 and of length 16: all must have one length"),
    ("empty_frozen", r"v\.parquet: no vectors, so no dimension for the frozen table of model\.pretrained_items"),
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
        "mixed_dims": {"item_id": pa.array([1, 2]), "vector": pa.array([[0.0] * 16, [1.0, 2.0, 3.0]])},
        "empty_frozen": {"item_id": pa.array([], pa.int64()), "vector": pa.array([], pa.list_(pa.float32()))},
        "id_type": {"item_id": pa.array(["1", "2"]), "vector": pa.array([[0.0] * 16, [1.0] * 16])},
        "two_id_columns": {"a": pa.array([1]), "b": pa.array([2]), "vector": pa.array([[0.0] * 16])},
        "users_for_items": {"user_id": pa.array([1]), "vector": pa.array([[0.0] * 16])},
        "nan": {"item_id": pa.array([1, 2]), "vector": pa.array([[0.0] * 16, [float("nan")] + [0.0] * 15])},
    }[case]
    pq.write_table(pa.table(columns), path)
    with pytest.raises(DataError, match=match) as e:
        train_here([*TINY, f"data.root={tmp_path / 'data'}", f"model.pretrained_items={path}",
                    f"model.pretrained_frozen={case == 'empty_frozen'}"], tmp_path / "run")
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
    assert str(e.value).count("has vectors of length 2 but model.embedding_dim is 16") == 2  # both ranks


# ---------------------------------------------------------------------------------------------
# model.pretrained_frozen: the vectors in a table of their own, never trained, a trained map on top
# ---------------------------------------------------------------------------------------------

FROZEN_ITEM_DIM, FROZEN_USER_DIM, DIM = 12, 8, 8  # items: P > D (a random map); users: P == D (the identity)


def frozen_args(root: Path, item_file: Path, user_file: Path, *extra: str) -> list:
    return [*TINY, f"data.root={root / 'data'}", f"model.embedding_dim={DIM}", f"model.pretrained_items={item_file}",
            f"model.pretrained_users={user_file}", "model.pretrained_frozen=true", "log.plots=false",
            "loss.num_negatives=16", "train.max_steps=6", *extra]


def frozen_files(cfg, tmp_path: Path) -> dict:
    """Vector files for some of the dataset's items and users (and ids it does not have); by table:
    the file's vectors and the vocabulary (row k holds the k-th id), read back from the prepared files."""
    from recsys.data.prepare import prepare

    prepared = Path(prepare(cfg.data))
    out = {}
    for which, table, dim, step in (("items", "item", FROZEN_ITEM_DIM, 3), ("users", "user", FROZEN_USER_DIM, 4)):
        vocab = pq.read_table(prepared / f"{which}.parquet").column(0).to_pylist()
        vectors = write_vectors(tmp_path / f"{which}.parquet", vocab[1::step] + [10**15], dim, seed=len(which),
                                id_name=f"{table}_id")
        out[table] = (vectors, vocab)
    return out


def file_rows(vectors: dict, vocab: list, dim: int) -> np.ndarray:
    """The frozen table as the file gives it: row k holds the k-th id's vector, zero when it has none."""
    return np.stack([vectors.get(raw, np.zeros(dim, np.float32)) for raw in vocab])


def frozen_init_rank(cfg):
    """The model of `cfg` built and initialised, before and after its pre-trained vectors are
    written; rank 0 returns the full tables of both and the maps' starting weights."""
    from recsys.parallelize import destroy_distributed, gather_tables, init_distributed
    from recsys.training.pretrained import init_all_pretrained
    from recsys.training.setup import build_model, open_data

    info = init_distributed("cpu")
    data = open_data(cfg, progress=False)
    sharded = build_model(cfg, data.num_users, data.num_items, info.device, info.world_size)
    before = {k: v.numpy() for k, v in gather_tables(sharded.dmp).items()}
    figures = init_all_pretrained(sharded.dmp, data, cfg.model)
    after = {k: v.numpy() for k, v in gather_tables(sharded.dmp).items()}
    maps = {t: m.map.weight.detach().numpy().copy() for t, m in sharded.model.pretrained.items()}
    destroy_distributed()
    return {"before": before, "after": after, "maps": maps, "figures": figures} if info.rank == 0 else None


def checkpoint_weights(run_dir: Path, tmp_path: Path) -> dict:
    """The model's weights in the run's newest checkpoint, read from its DCP files."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from recsys.training.checkpoint import latest_checkpoint

    out = tmp_path / f"{run_dir.name}.pt"
    dcp_to_torch_save(str(latest_checkpoint(run_dir)), str(out))
    return {k: v.double().numpy() for k, v in torch.load(out, weights_only=False)["model"].items()}


@pytest.mark.parametrize("world,sharding", [(1, []), (2, ["row_wise"]), (2, ["table_wise"])])
def test_frozen_vectors_stay_bit_identical_and_the_map_trains(ranks, config, train_here, tmp_path, world, sharding):
    from recsys.exporter import read_vectors

    overrides = frozen_args(tmp_path, tmp_path / "items.parquet", tmp_path / "users.parquet",
                            f"train.sharding_types={sharding}")
    cfg = config(overrides)
    files = frozen_files(cfg, tmp_path)
    init = next(o for o in ranks(world, frozen_init_rank, cfg) if o)
    for table, dim in (("item", FROZEN_ITEM_DIM), ("user", FROZEN_USER_DIM)):
        vectors, vocab = files[table]
        matched = np.array([raw in vectors for raw in vocab])
        assert init["after"][f"{table}_pretrained"].shape == (len(vocab), dim)
        np.testing.assert_array_equal(init["after"][f"{table}_pretrained"], file_rows(vectors, vocab, dim))
        assert not init["after"][table][matched].any()  # a matched id starts from its mapped vector alone
        np.testing.assert_array_equal(init["after"][table][~matched], init["before"][table][~matched])
        assert init["figures"][f"{table}s"] == {**init["figures"][f"{table}s"], "dim": dim, "frozen": True,
                                                 "rows_matched": int(matched.sum()), "rows": len(vocab)}
    np.testing.assert_array_equal(init["maps"]["user"], np.eye(DIM))  # P == D: the identity
    w = init["maps"]["item"].astype(np.float64)  # P > D: orthonormal rows, scaled by sqrt(P / D)
    assert w.shape == (DIM, FROZEN_ITEM_DIM)
    # float32 rounding of a float64 orthogonal matrix: entries off by <= 2^-24 relative, a Gram
    # entry (a sum of P products) by <= 2 P 2^-24 (scale)^2
    np.testing.assert_allclose(w @ w.T, np.eye(DIM) * FROZEN_ITEM_DIM / DIM,
                               atol=2 * FROZEN_ITEM_DIM * 2**-24 * FROZEN_ITEM_DIM / DIM * 2)

    run_dir = tmp_path / "run"
    ranks(world, train_here, [*overrides, "export.enabled=true"], str(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 6 and "selected_epoch" not in metrics
    assert metrics["pretrained"]["items"]["frozen"] and metrics["pretrained"]["items"]["dim"] == FROZEN_ITEM_DIM
    weights = checkpoint_weights(run_dir, tmp_path)
    for table, dim in (("item", FROZEN_ITEM_DIM), ("user", FROZEN_USER_DIM)):
        frozen = weights[f"model.pretrained.{table}.ebc.embedding_bags.{table}_pretrained.weight"]
        np.testing.assert_array_equal(frozen, file_rows(*files[table], dim))  # after training: bit-identical
        trained_map = weights[f"model.pretrained.{table}.map.weight"]
        assert np.abs(trained_map - init["maps"][table]).max() > 1e-4  # Adam moved it (lr 1e-3 a step)
        assert np.abs(weights[f"model.{table}_ebc.embedding_bags.{table}.weight"]
                      - init["after"][table]).max() > 1e-3  # the id table trained too

    # the exported item vectors: normalize(map(pre-trained row) + id row), from the checkpoint's
    # weights and the file's vectors (a zero pre-trained row for the ids without one)
    ids, got = read_vectors(run_dir / "export", "items")
    vectors, vocab = files["item"]
    rows = np.array([vocab.index(raw) for raw in ids])
    pre = file_rows(vectors, vocab, FROZEN_ITEM_DIM)[rows].astype(np.float64)
    w, id_rows = weights["model.pretrained.item.map.weight"], weights["model.item_ebc.embedding_bags.item.weight"][rows]
    raw = pre @ w.T + id_rows
    want = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    # float32 in the model: the P-term products and sums of the map (<= (P + 1) u |W||x| each),
    # the addition and the normalisation (a few u relative): bounded per row relative to its norm
    u = 2.0**-24
    bound = ((FROZEN_ITEM_DIM + 1) * (np.abs(pre) @ np.abs(w).T) + np.abs(id_rows)) * u
    atol = 4 * (bound.max(axis=1, keepdims=True) / np.linalg.norm(raw, axis=1, keepdims=True) + 4 * u)
    assert np.all(np.abs(got - want) <= atol)
    assert sum(raw in vectors for raw in ids) == len(vectors) - 1  # every matched id exported (not 10**15)


def test_resume_of_a_frozen_run_is_exact_and_its_checkpoint_serves_alone(train_here, in_process, config, tmp_path):
    overrides = frozen_args(tmp_path, tmp_path / "items.parquet", tmp_path / "users.parquet", "train.max_steps=8",
                            "train.checkpoint_every_steps=4", "train.keep_checkpoints=10", "export.enabled=true")
    frozen_files(config(overrides), tmp_path)
    whole = train_here(overrides, tmp_path / "whole")
    resumed_dir = tmp_path / "resumed"
    src = tmp_path / "whole" / "checkpoints" / "step_000000004"
    shutil.copytree(src, resumed_dir / "checkpoints" / src.name)
    resumed = train_here(overrides, resumed_dir)
    assert resumed["checkpoint"]["resumed"]["step"] == 4 and resumed["train"]["steps"] == whole["train"]["steps"] == 8
    assert resumed["test"] == whole["test"] and resumed["pretrained"] == whole["pretrained"]
    assert resumed["train"]["history"][0]["loss"] == whole["train"]["history"][0]["loss"]
    got, want = checkpoint_weights(resumed_dir, tmp_path), checkpoint_weights(tmp_path / "whole", tmp_path)
    assert sorted(got) == sorted(want) and "model.pretrained.item.map.weight" in got
    for key in want:  # tables, frozen tables and maps: the same bits
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    # evaluation and export from the checkpoint need the vector files no more: the frozen tables'
    # dimensions come from the checkpoint; the same model, so the figures and vectors of the run
    from recsys.config import ExportConfig
    from recsys.evaluate import evaluate_run
    from recsys.export import export_checkpoint
    from recsys.exporter import read_vectors

    (tmp_path / "items.parquet").unlink()
    (tmp_path / "users.parquet").unlink()
    assert in_process(evaluate_run, resumed_dir)["test"] == whole["test"]
    in_process(export_checkpoint, resumed_dir, ExportConfig())
    for name in ("items", "users"):
        ids, vecs = read_vectors(resumed_dir / "export", name)
        ref_ids, ref_vecs = read_vectors(tmp_path / "whole" / "export", name)
        assert ids == ref_ids
        np.testing.assert_array_equal(vecs, ref_vecs)


@pytest.mark.parametrize("overrides,message", [
    (["model.pretrained_frozen=true"], "model.pretrained_frozen=true freezes the vectors of model.pretrained_items"),
    (["model.pretrained_frozen=true", "model.pretrained_items=v.parquet", "model=two_tower",
      "model.share_item_table=true"], "set model.share_item_table=false"),
    (["model.pretrained_frozen=true", "model.pretrained_users=v.parquet", "model=two_tower",
      "model.init=spectral", "model.history_weight=1.0", "model.share_item_table=false", "model.normalize=false"],
     "model.init=spectral computes them from the data"),
])
def test_frozen_without_vectors_or_with_what_it_cannot_serve_is_refused(make, overrides, message):
    from omegaconf import OmegaConf

    from recsys.errors import ConfigError

    with pytest.raises(Exception) as err:
        OmegaConf.to_object(make(overrides))
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, ConfigError) and message in str(cause)
    # the same models without the frozen option are fine (user vectors: no shared item table involved)
    OmegaConf.to_object(make([o for o in overrides if "frozen" not in o and "init=" not in o] or ["model=mf"]))


def test_the_dimension_comes_from_the_schema_or_the_first_vector(tmp_path):
    from recsys.data.vectors import vector_dim

    fixed, listed, empty = tmp_path / "fixed.parquet", tmp_path / "list.parquet", tmp_path / "empty.parquet"
    write_vectors(fixed, [1, 2], 5)
    pq.write_table(pa.table({"item_id": pa.array([1, 2, 3]), "vector": pa.array([None, [0.0] * 7, [1.0] * 7])}),
                   listed, row_group_size=1)
    pq.write_table(pa.table({"item_id": pa.array([], pa.int64()), "vector": pa.array([], pa.list_(pa.float32()))}),
                   empty)
    assert pq.ParquetFile(listed).num_row_groups == 3  # the first row group's vector is null
    assert (vector_dim(fixed, "item_id"), vector_dim(listed, "item_id"), vector_dim(empty, "item_id")) == (5, 7, None)
