"""The streaming loader: equal batches on every rank whatever the files, disjoint shares, each fit
row at most once per epoch, reproducible order, worker counts, resume by skipping; and the real
train() on a streamed dataset on two gloo ranks (with a resume that gives the uninterrupted figures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsys.data.batches import BatchOptions
from recsys.data.loader import Pieces, ShuffleBuffer, StreamBatches, piece_order, step_negatives

NUM_ITEMS = 1 << 40  # items are the global row numbers (a row's identity), negatives are huge numbers
VALID_EVERY = 7  # rows whose number is a multiple of 7 are validation rows (not trained on)


def write_streamed(path: Path, file_rows, row_group: int, num_users: int = 50, seed: int = 0) -> Path:
    """A streamed training layout (train/part-*.parquet + train/pieces.json) whose row r has item r
    (rows are told apart by their item), a random user and valid = (r % 7 == 0)."""
    rng = np.random.default_rng(seed)
    (path / "train").mkdir(parents=True)
    pieces, first = [], 0
    for f, n in enumerate(file_rows):
        rows = np.arange(first, first + n)
        first += n
        name = f"train/part-{f:05d}.parquet"
        table = pa.table({"user": rng.integers(0, num_users, n), "item": rows, "valid": rows % VALID_EVERY == 0})
        pq.write_table(table, path / name, row_group_size=row_group)
        for g, start in enumerate(range(0, n, row_group)):
            r = rows[start : start + row_group]
            pieces.append({"file": name, "row_group": g, "rows": len(r), "fit_rows": int((r % VALID_EVERY != 0).sum())})
    (path / "train" / "pieces.json").write_text(json.dumps(pieces))
    return path


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Pieces:
    """Files of very different sizes, row groups of 100 rows (the last of each file shorter)."""
    return Pieces.read(write_streamed(tmp_path_factory.mktemp("stream"), [1000, 37, 555, 1234, 3], 100))


def fit_rows_of(pieces: Pieces) -> np.ndarray:
    """The fit rows read directly from the files (the independent reference)."""
    items = np.concatenate([pq.read_table(f)["item"].to_numpy() for f in sorted(set(pieces.files))])
    return np.sort(items[items % VALID_EVERY != 0])


def epoch(pieces: Pieces, rank: int = 0, world: int = 2, batch: int = 64, negatives: int = 8, seed: int = 0,
          ep: int = 0, workers: int = 0, buffer: int = 150, **kw) -> list:
    """[(users, positives, negatives)] of one rank's epoch."""
    sb = StreamBatches(pieces, NUM_ITEMS, BatchOptions(batch, negatives, seed, rank, world, workers, buffer), ep,
                       chunk=3, **kw)
    out = [(b.user_ids.numpy(), b.item_ids.numpy()[: batch // world], b.item_ids.numpy()[batch // world:]) for b in sb]
    assert len(out) == len(sb)
    for b in out:
        assert len(b[0]) == len(b[1]) == batch // world and len(b[2]) == negatives // world
    return out


def rows(batches) -> np.ndarray:
    return np.concatenate([b[1] for b in batches]) if batches else np.zeros(0, dtype=np.int64)


def same(a, b) -> bool:
    return len(a) == len(b) and all(all(np.array_equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_ranks_get_equal_disjoint_shares_of_uneven_files(uneven, workers):
    fit = fit_rows_of(uneven)
    assert uneven.total_fit == len(fit)
    for world, batch in ((2, 64), (3, 96)):
        shares = [epoch(uneven, r, world, batch, negatives=6, workers=workers) for r in range(world)]
        steps = len(fit) // batch
        assert [len(s) for s in shares] == [steps] * world  # no rank waits at the end of the epoch
        used = [rows(s) for s in shares]
        everything = np.concatenate(used)
        assert len(np.unique(everything)) == len(everything) == steps * batch  # disjoint, each row at most once
        assert np.isin(everything, fit).all()  # only fit rows: no validation row, nothing invented
        sb = StreamBatches(uneven, NUM_ITEMS, BatchOptions(batch, 6, 0, 0, world, workers), 0)
        assert sb.unused == len(fit) - steps * batch == len(np.setdiff1d(fit, everything)) < batch


def test_the_order_is_reproducible_and_changes_with_the_epoch(uneven):
    a = epoch(uneven, rank=1)
    assert same(a, epoch(uneven, rank=1))
    other_epoch, other_seed = epoch(uneven, rank=1, ep=1), epoch(uneven, rank=1, seed=5)
    assert not same(a, other_epoch) and not same(a, other_seed)
    assert not np.array_equal(np.sort(rows(a)), np.sort(rows(other_epoch)))  # another share of the rows too
    # every step's uniform negatives are one world-wide draw, each rank taking its half
    for step in (0, 9):
        both = np.concatenate([epoch(uneven, rank=r)[step][2] for r in (0, 1)])
        assert np.array_equal(both, step_negatives(0, 0, step, NUM_ITEMS, 8, 0, 1))


def test_without_a_shuffle_buffer_rows_come_in_the_permuted_piece_order(uneven):
    """The plan alone, against a reference built from the pieces: the permuted pieces' fit rows end
    to end, rank r reading its contiguous M rows."""
    order = piece_order(len(uneven), 0, 3)
    rows_in_order = []
    for j in order:
        t = pq.ParquetFile(uneven.files[j]).read_row_group(int(uneven.row_groups[j]))
        items = t["item"].to_numpy()
        rows_in_order.append(items[items % VALID_EVERY != 0])
    reference = np.concatenate(rows_in_order)
    m = len(reference) // 64 * 32
    for rank in (0, 1):
        assert np.array_equal(rows(epoch(uneven, rank, ep=3, buffer=0)), reference[rank * m : (rank + 1) * m])


def test_worker_counts_cover_the_same_rows(uneven):
    zero, one, two = (epoch(uneven, rank=0, workers=w) for w in (0, 1, 2))
    assert same(zero, one)  # 0 workers: the same single stream, read in this process
    assert np.array_equal(np.sort(rows(two)), np.sort(rows(one)))  # the same share, another order
    assert not same(one, two)
    # the negatives belong to the step, not to the worker
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(one, two))


@pytest.mark.parametrize("workers", [0, 2])
def test_skipping_k_batches_gives_the_tail_of_the_full_epoch(uneven, workers):
    full = epoch(uneven, rank=1, workers=workers)
    for k in (1, 4, 7, len(full) - 1, len(full)):  # chunk=3: skips inside and at the end of a chunk
        assert same(epoch(uneven, rank=1, workers=workers, skip=k), full[k:]), k
    assert same(epoch(uneven, rank=1, workers=workers, skip=2, max_batches=9), full[2:9])
    assert same(epoch(uneven, rank=1, workers=workers, max_batches=5), full[:5])


def test_a_dataset_prepared_for_streaming_is_shared_out_exactly(tmp_path):
    """recsys.data.prepare's streaming layout (several part files, a validation column): both ranks'
    (user, item) pairs against the prepared files read whole."""
    from recsys.config import DataConfig
    from recsys.data.prepare import prepare

    rng = np.random.default_rng(1)
    pairs = rng.choice(200 * 150, size=6000, replace=False)  # distinct pairs: a pair names its row
    pq.write_table(pa.table({"user_id": pairs // 150 + 7, "item_id": pairs % 150}), tmp_path / "log.parquet")
    path = prepare(DataConfig(name="parquet", path=str(tmp_path / "log.parquet"), root=str(tmp_path / "data"),
                              timestamp_column=None, loader="stream", row_group_size=256, valid_fraction=0.1))
    train = pa.concat_tables(pq.read_table(f) for f in sorted((path / "train").glob("*.parquet")))
    fit = train.filter(pc.invert(train["valid"]))
    fit_keys = np.sort(fit["user"].to_numpy() * 150 + fit["item"].to_numpy())
    pieces = Pieces.read(path)
    assert len(set(pieces.files)) > 1 and pieces.total_fit == len(fit_keys)
    shares = [StreamBatches(pieces, 150, BatchOptions(64, 8, 3, r, 2, 1, 500), 1) for r in (0, 1)]
    keys = np.concatenate([(b.user_ids.numpy() * 150 + b.item_ids.numpy()[:32]) for sb in shares for b in sb])
    assert len(shares[0]) == len(shares[1]) == len(fit_keys) // 64
    assert len(np.unique(keys)) == len(keys) == len(fit_keys) // 64 * 64 and np.isin(keys, fit_keys).all()


def test_shuffle_buffer_draws_every_row_once():
    rng = np.random.default_rng(0)
    buf = ShuffleBuffer(10, 4, rng)
    data = np.arange(40)
    out, pos = [], 0
    while pos < len(data):
        pos += buf.put(data[pos:], -data[pos:])
        if buf.full:
            out.append(buf.draw())
    while buf.size:
        out.append(buf.draw())
    users = np.concatenate([u for u, _ in out])
    assert np.array_equal(np.sort(users), data) and not np.array_equal(users, data)
    assert all(np.array_equal(i, -u) for u, i in out)  # columns stay paired


# ---------------------------------------------------------------------------------------------
# The real train() on a tiny streamed dataset, two gloo ranks
# ---------------------------------------------------------------------------------------------


def tiny_stream_config(root: Path, **train):
    from recsys.config import Config, DataConfig, EvalConfig, LogConfig, LossConfig, ModelConfig, TrainConfig

    return Config(data=DataConfig(num_users=300, num_items=120, num_interactions=8000, root=str(root), loader="stream",
                                  row_group_size=700, valid_fraction=0.1, num_workers=1, shuffle_buffer=1000),
                  model=ModelConfig(embedding_dim=8), loss=LossConfig(num_negatives=16),
                  eval=EvalConfig(max_users=150, test_every_epoch=True),
                  train=TrainConfig(**{"epochs": 2, "batch_size": 128, "progress": False, "log_every_steps": 5,
                                       **train}),
                  log=LogConfig(plots=False))


def train_ranks(root: str, run_dir: str, train_kw: dict):
    from recsys.train import train

    return train(tiny_stream_config(Path(root), **train_kw), Path(run_dir))


def test_two_ranks_train_on_a_streamed_dataset_and_resume(tmp_path, two_ranks):
    run_dir = tmp_path / "run"
    kw = {"checkpoint_every_steps": 20, "keep_checkpoints": 100}
    m0, m1 = two_ranks(train_ranks, str(tmp_path / "data"), str(run_dir), kw)
    written = json.loads((run_dir / "metrics.json").read_text())
    data = Path(written["data"]["path"])
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(json.loads((data / "train" / "pieces.json").read_text())) > 2
    fit = manifest["counts"]["train_interactions"] - manifest["counts"]["valid_interactions"]
    assert written["train"]["steps"] == 2 * (fit // 128) and written["train"]["world_size"] == 2
    assert m0["test"] == m1["test"] == written["test"] and 0 < written["test"]["recall@20"] <= 1
    assert written["test"]["users"] == written["data"]["eval_users"] == 150 < written["data"]["eval_users_of"]
    assert "valid" in written["train"]["history"][0]
    assert (run_dir / "export" / "items" / "part-00000.parquet").exists()

    # resume from a checkpoint in the middle of epoch 1: the same figures as the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    steps = sorted(p.name for p in (resumed / "checkpoints").glob("step_*"))
    per_epoch = fit // 128
    middle = next(s for s in steps if per_epoch < int(s.split("_")[1]) < 2 * per_epoch)  # inside epoch 1
    for s in steps:
        if s > middle:
            shutil.rmtree(resumed / "checkpoints" / s)
    (resumed / "metrics.json").unlink()
    r0, _ = two_ranks(train_ranks, str(tmp_path / "data"), str(resumed), kw)
    assert r0["checkpoint"]["resumed"]["step"] == int(middle.split("_")[1])
    assert r0["test"] == m0["test"]
    assert [h["loss"] for h in r0["train"]["history"]] == pytest.approx([h["loss"] for h in m0["train"]["history"]],
                                                                         rel=1e-6)


def test_history_models_are_refused_with_the_streaming_loader(tmp_path):
    from recsys.config import ModelConfig, memory_reason
    from recsys.data.prepare import loader_config, prepare
    from recsys.data.source import open_source
    from recsys.errors import ConfigError
    from recsys.model import feature_spec

    def data_config(cfg):
        return loader_config(cfg.data, memory_reason(cfg))

    cfg = tiny_stream_config(tmp_path)
    cfg.model = ModelConfig(name="two_tower", embedding_dim=8)
    with pytest.raises(ConfigError, match="history"):
        data_config(cfg)
    cfg.model = ModelConfig(name="two_tower", embedding_dim=8, item_history_weight=0.5)
    cfg.model.history_weight = 0.0  # no user history bag, but an item history bag
    with pytest.raises(ConfigError, match="model.item_history_weight=0.5"):
        data_config(cfg)
    cfg.model.item_history_weight = 0.0  # no history bag at all: a two-tower model streams
    assert data_config(cfg).loader == "stream"
    cfg.model = ModelConfig(name="mf", embedding_dim=8, history_weight=0.5)  # mf: history_weight is not used
    assert data_config(cfg).loader == "stream"
    path = prepare(data_config(cfg))
    cfg.model = ModelConfig(name="two_tower", embedding_dim=8)
    with pytest.raises(ConfigError, match="data.loader=stream: model=two_tower with history bags"):
        open_source(path, feature_spec(cfg.model, 0), "stream", memory_reason(cfg))
