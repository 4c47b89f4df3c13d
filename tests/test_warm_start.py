"""Warm start with a grown vocabulary (``train.warm_start``): on a new dataset (new ids, ids gone,
counts changed so that the vocabulary's row order changes), the rows of the ids known to both runs
equal the old run's rows of the same raw ids, read back independently (the old checkpoint
converted by DCP's own ``dcp_to_torch_save``, the vocabularies from the prepared files); new ids
keep the usual initialisation (the same model built without the warm start); the optimizer state
comes along when asked; string and integer ids, hashed ids (a row gets the mean of its ids' old
vectors), 1 rank and 2 ranks row-wise / table-wise; the figures in metrics.json survive a resume;
a bad path or another model is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

BASE = ["train.progress=false", "eval.popularity=false", "export.enabled=false", "log.plots=false",
        "data=parquet", "model.embedding_dim=8", "train.batch_size=64", "train.max_steps=3", "loss.num_negatives=8",
        "data.test_fraction=0.2", "train.log_every_steps=1", "eval.ks=[5,10]",
        "eval.select_metric=recall@10"]
TWO_TOWER = ["model=two_tower", "model.share_item_table=false", "model.history_weight=0.5",
             "model.item_history_weight=0.5"]
"""Every id-keyed table: user, item, history (rows are items), item_history (rows are users)."""


def interactions(path: Path, day: int, kind: str) -> None:
    """A day's interactions: 40 users x 30 items on day 0; on day 1 users 0-4 and items 0-3 are gone,
    users 40-47 and items 30-35 are new, and the counts change (the vocabulary's order changes)."""
    rng = np.random.default_rng(day)
    users = np.arange(40) if day == 0 else np.r_[5:48]
    items = np.arange(30) if day == 0 else np.r_[4:36]
    # per-user and per-item popularity that differs between the days
    user_weight = rng.permutation(len(users)) + 1.0
    item_weight = rng.permutation(len(items)) + 1.0
    rows = []
    for u, w in zip(users, user_weight):
        n = 4 + int(w) % 6
        picked = rng.choice(items, size=n, replace=False, p=item_weight / item_weight.sum())
        rows += [(u, i) for i in picked]
    u, i = np.array(rows).T
    ids = (lambda a, p: pa.array([f"{p}{x}" for x in a])) if kind == "str" else (lambda a, p: pa.array(a * 1000 + 7))
    pq.write_table(pa.table({"user_id": ids(u, "u"), "item_id": ids(i, "i")}), path)


def config_args(root: Path, path: Path, kind: str, *more: str) -> list:
    model = TWO_TOWER if kind == "str" else []  # string ids: the two_tower with all four tables; ints: mf
    return [*BASE, *model, f"data.root={root}", f"data.path={path}", *more]


@pytest.fixture(scope="module")
def days(tmp_path_factory, train_here):
    """{kind: (old run dir, day-1 interactions, data root)} for string ids (two_tower) and int ids (mf)."""
    out = {}
    for kind in ("str", "int"):
        base = tmp_path_factory.mktemp(f"warm-{kind}")
        for day in (0, 1):
            interactions(base / f"day{day}.parquet", day, kind)
        train_here(config_args(base / "data", base / "day0.parquet", kind), base / "old")
        out[kind] = (base / "old", base / "day1.parquet", base / "data")
    return out


def old_state(run_dir: Path, tmp_path: Path) -> dict:
    """The old run's newest checkpoint as plain tensors, by DCP's own converter (not the warm start's reader)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    dcp_to_torch_save(str(ckpt), str(tmp_path / "old.pt"))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", torch.load(tmp_path / "old.pt", weights_only=True))
    weights = {k.split(".")[-2]: v.numpy() for k, v in flat.items() if k.startswith("model.") and k.endswith("weight")}
    momentum = {k.split(".")[-2]: v.numpy() for k, v in flat.items() if k.endswith("momentum1")}
    return {"weights": weights, "momentum": momentum, "data": json.loads((ckpt / "meta.json").read_text())["data"]}


def warm_rank(cfg, run_dir: str, with_warm: bool):
    """On each rank: the model of `cfg` built, with or without its warm start; rank 0 returns the
    full tables, the momentum, the dataset's path and the figures."""
    from recsys.distributed import all_gather_objects
    from recsys.parallelize import destroy_distributed, gather_tables, init_distributed
    from recsys.training.checkpoint import table_shapes
    from recsys.training.setup import build_model, open_data
    from recsys.training.warm_start import init_warm_start

    info = init_distributed("cpu")
    data = open_data(cfg, progress=False)
    sharded = build_model(cfg, data.num_users, data.num_items, info.device, info.world_size)
    t = cfg.train
    figures = None
    if with_warm:
        figures = init_warm_start(sharded.dmp, sharded.optimizer, data, Path(t.warm_start), cfg.model.name,
                                  table_shapes(sharded.dmp), Path(run_dir), t.warm_start_optimizer)
    tables = {k: v.float().numpy() for k, v in gather_tables(sharded.dmp).items()}
    # the momentum's local pieces of every rank (a table-wise rank holds some tables' state only)
    pieces = [(name.split(".")[0], int(st.size(0)), int(s.metadata.shard_offsets[0]), s.tensor.numpy().copy())
              for value in sharded.optimizer.state_dict()["state"].values() for name, st in value.items()
              if name.endswith("momentum1") for s in st.local_shards()]
    momentum = {}
    for table, size, offset, values in (p for part in all_gather_objects(pieces) for p in part):
        momentum.setdefault(table, np.full(size, np.nan, dtype=np.float32))[offset : offset + len(values)] = values
    out = {"tables": tables, "momentum": momentum, "path": str(data.path), "figures": figures,
           "staging_left": (Path(run_dir) / ".warm-start").exists()} if info.rank == 0 else None
    destroy_distributed()
    return out


ROWS = {"user": "users", "item": "items", "history": "items", "item_history": "users"}


@pytest.mark.parametrize("kind,world,sharding,optimizer", [("str", 1, [], True), ("int", 2, ["row_wise"], False),
                                                            ("str", 2, ["table_wise"], True)])
def test_known_ids_keep_their_rows_new_ids_their_init(ranks, config, days, tmp_path, kind, world, sharding, optimizer):
    old_run, day1, root = days[kind]
    cfg = config(config_args(root, day1, kind, f"train.warm_start={old_run}",
                             f"train.warm_start_optimizer={str(optimizer).lower()}", f"train.sharding_types={sharding}"))
    got = next(o for o in ranks(world, warm_rank, cfg, str(tmp_path / "new"), True) if o)
    plain = next(o for o in ranks(world, warm_rank, cfg, str(tmp_path / "plain"), False) if o)
    old = old_state(old_run, tmp_path)
    expected_tables = {"user", "item"} | ({"history", "item_history"} if kind == "str" else set())
    assert set(got["figures"]["tables"]) == expected_tables
    assert got["figures"]["optimizer"] is optimizer and not got["staging_left"]
    for table in sorted(expected_tables):
        which = ROWS[table]
        old_vocab = pq.read_table(Path(old["data"]["path"]) / f"{which}.parquet").column(0).to_pylist()
        new_vocab = pq.read_table(Path(got["path"]) / f"{which}.parquet").column(0).to_pylist()
        old_row = {raw: r for r, raw in enumerate(old_vocab)}
        common = [raw for raw in new_vocab if raw in old_row]
        # the two vocabularies really differ: ids gone, ids new, and the shared ids in another order
        assert len(common) < len(old_vocab) and len(common) < len(new_vocab)
        assert [old_row[raw] for raw in common] != sorted(old_row[raw] for raw in common)
        for r, raw in enumerate(new_vocab):
            if raw in old_row:  # copied: exactly the old row
                np.testing.assert_array_equal(got["tables"][table][r], old["weights"][table][old_row[raw]])
                want = old["momentum"][table][old_row[raw]] if optimizer else 0.0
                assert got["momentum"][table][r] == want
            else:  # the usual initialisation, and no optimizer state
                np.testing.assert_array_equal(got["tables"][table][r], plain["tables"][table][r])
                assert got["momentum"][table][r] == 0.0
        if optimizer:
            assert np.count_nonzero(got["momentum"][table]) > 0  # the old run did train these rows
        figures = got["figures"]["tables"][table]
        assert figures == {"rows": len(new_vocab), "rows_carried": len(common), "rows_new": len(new_vocab) - len(common),
                           "old_rows": len(old_vocab), "old_ids": len(old_vocab),
                           "old_ids_gone": len(set(old_vocab) - set(new_vocab))}


def test_hashed_rows_get_the_mean_of_their_ids_old_vectors(ranks, config, train_here, tmp_path):
    # hashed on both days into fewer rows than ids: rows shared by several ids, some carried, some not
    for day in (0, 1):
        interactions(tmp_path / f"day{day}.parquet", day, "str")
    hashed = ["data.id_mapping=hash", "data.num_users=16", "data.num_items=12"]
    train_here(config_args(tmp_path / "data", tmp_path / "day0.parquet", "int", *hashed), tmp_path / "old")
    cfg = config(config_args(tmp_path / "data", tmp_path / "day1.parquet", "int", *hashed,
                             f"train.warm_start={tmp_path / 'old'}"))
    got = next(o for o in ranks(1, warm_rank, cfg, str(tmp_path / "new"), True) if o)
    plain = next(o for o in ranks(1, warm_rank, cfg, str(tmp_path / "plain"), False) if o)
    old = old_state(tmp_path / "old", tmp_path)
    for table, which in (("user", "users"), ("item", "items")):
        # id -> hashed row, from the prepared files (each lists every training id with its row)
        old_ids = pq.read_table(Path(old["data"]["path"]) / f"{which}.parquet").to_pydict()
        new_ids = pq.read_table(Path(got["path"]) / f"{which}.parquet").to_pydict()
        old_row = dict(zip(old_ids[f"{which[:-1]}_id"], old_ids["row"]))
        members = {}
        for raw, row in zip(new_ids[f"{which[:-1]}_id"], new_ids["row"]):
            if raw in old_row:
                members.setdefault(row, []).append(old["weights"][table][old_row[raw]])
        assert any(len(v) > 1 for v in members.values())  # some rows do average several ids
        rows = len(got["tables"][table])
        for r in range(rows):
            if r in members:
                # the mean in float64 rounded once to float32, on both sides: at most 1 ulp apart
                want = np.mean(np.asarray(members[r], dtype=np.float64), axis=0).astype(np.float32)
                np.testing.assert_array_max_ulp(got["tables"][table][r], want, maxulp=1)
            else:
                np.testing.assert_array_equal(got["tables"][table][r], plain["tables"][table][r])
        figures = got["figures"]["tables"][table]
        assert figures["rows_carried"] == len(members) and figures["rows"] == rows
        assert figures["old_ids"] == len(old_row)
        assert figures["old_ids_gone"] == len(set(old_row) - set(new_ids[f"{which[:-1]}_id"])) > 0


def test_training_records_the_figures_and_a_resume_keeps_them(train_here, days, tmp_path):
    old_run, day1, root = days["int"]
    args = config_args(root, day1, "int", f"train.warm_start={old_run}", "train.warm_start_optimizer=true")
    metrics = train_here(args, tmp_path / "run")
    figures = metrics["warm_start"]
    assert figures["from"].startswith(str(old_run / "checkpoints")) and figures["optimizer"] is True
    assert set(figures["tables"]) == {"user", "item"}
    assert all(f["rows_carried"] > 0 and f["rows_new"] > 0 and f["old_ids_gone"] > 0
               for f in figures["tables"].values())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["warm_start"] == figures
    assert not (tmp_path / "run" / ".warm-start").exists()
    # the same command again resumes the finished run (no second warm start): the figures come back
    again = train_here(args, tmp_path / "run")
    assert again["checkpoint"]["resumed"] is not None and again["warm_start"] == figures


@pytest.mark.parametrize("case,match", [
    ("missing", r"train\.warm_start=.*nope: no complete checkpoint to start from"),
    ("no_checkpoint", r"train\.warm_start=.*empty: no complete checkpoint to start from"),
    ("model", r"train\.warm_start=.*: the old run's model\.name=mf, this run's two_tower"),
    ("dim", r"train\.warm_start=.*: table item has dimension 8 there and 4 here"),
])
def test_a_bad_warm_start_is_a_one_line_error(train_here, days, tmp_path, case, match):
    from recsys.config import ConfigError

    old_run, day1, root = days["int"]
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    path = {"missing": tmp_path / "nope", "no_checkpoint": tmp_path / "empty"}.get(case, old_run)
    more = {"model": ["model=two_tower"], "dim": ["model.embedding_dim=4"]}.get(case, [])
    with pytest.raises(ConfigError, match=match) as e:
        train_here([*config_args(root, day1, "int"), *more, f"train.warm_start={path}"], tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / ".warm-start").exists()


def test_the_optimizer_option_needs_a_warm_start(config):
    from recsys.config import ConfigError

    with pytest.raises(ConfigError, match="train.warm_start_optimizer=true .* set train.warm_start too"):
        config(["train.warm_start_optimizer=true"])
