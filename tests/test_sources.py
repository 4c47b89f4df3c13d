"""Data sources (recsys.data.source): the evaluated users and their record, the model inputs against
a numpy reference, the streamed evaluation sets read in one pass."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig, memory_reason
from recsys.data.eval_sets import eval_users, load_eval_sets
from recsys.data.prepare import loader_config, prepare
from recsys.data.source import InMemorySource, StreamedSource, open_source
from recsys.model import feature_spec


def config(tmp_path, loader: str, model: str = "mf", max_users: int = 40) -> Config:
    return Config(data=DataConfig(root=str(tmp_path / "data"), loader=loader, num_users=300, num_items=100,
                                  num_interactions=8000, row_group_size=700, valid_fraction=0.1),
                  model=ModelConfig(name=model, embedding_dim=8, history_dropout=0.2),
                  eval=EvalConfig(max_users=max_users), train=TrainConfig())


def opened(cfg: Config):
    reason = memory_reason(cfg)
    data = loader_config(cfg.data, reason)
    return open_source(prepare(data), feature_spec(cfg.model, cfg.seed), data.loader, reason)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_sample_of_evaluated_users_is_logged_and_recorded(tmp_path, caplog, loader):
    cfg = config(tmp_path, loader)
    data = opened(cfg)
    assert isinstance(data, InMemorySource if loader == "memory" else StreamedSource) and data.loader == loader
    with caplog.at_level(logging.INFO, logger="recsys.data.eval_sets"):
        sets = data.eval_sets(40)
    of = data.manifest["counts"]["test_users"]
    assert of > 40 and sets.info == {"eval_users": 40, "eval_users_of": of}
    assert f"evaluating 40 of {of} test users (eval.max_users)" in caplog.text
    assert len(sets.test.users) == len(sets.valid.users) == 40
    if loader == "memory":  # the seeded sample of the users with test / validation items
        assert np.array_equal(sets.test.users, eval_users(sets.test.relevant.counts(), 40))
        assert np.array_equal(sets.valid.users, eval_users(sets.valid.relevant.counts(), 40))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recsys.data.eval_sets"):
        everyone = data.eval_sets(0)
    assert everyone.info == {"eval_users": of, "eval_users_of": of} and "evaluating" not in caplog.text


def test_features_are_each_users_training_items_in_time_order(tmp_path):
    cfg = config(tmp_path, "memory", model="two_tower")
    data = opened(cfg)
    # numpy reference from the prepared file: each user's training rows, by timestamp (file order on ties)
    train = pa.concat_tables([pq.read_table(f) for f in sorted((data.path / "train").glob("part-*.parquet"))])
    order = np.argsort(train["timestamp"].to_numpy(), kind="stable")
    users, items = train["user"].to_numpy()[order], train["item"].to_numpy()[order]
    valid = train["valid"].to_numpy(zero_copy_only=False)[order]
    for include_valid in (True, False):
        history = data.features(include_valid).history
        keep = np.ones(len(valid), dtype=bool) if include_valid else ~valid
        for user in range(0, data.num_users, 7):
            want = items[keep & (users == user)]
            assert history.indices[history.indptr[user]:history.indptr[user + 1]].tolist() == want.tolist()
    full, fit = data.features(), data.features(include_valid=False)
    assert full.history.indices.size == len(items) > fit.history.indices.size == int((~valid).sum())
    assert data.features(False, training=True).dropout == 0.2 and fit.dropout == 0.0  # dropout only in training

    streamed = opened(config(tmp_path, "stream"))
    features = streamed.features()
    assert features.history is None and features.item_history is None


def test_streamed_sets_are_read_in_one_pass_with_a_progress_bar_on_request(tmp_path, monkeypatch, capsys):
    data = opened(config(tmp_path, "stream"))
    pieces = {part: len(json.loads((data.path / part / "pieces.json").read_text())) for part in ("train", "test")}
    reads = []
    real = pq.ParquetFile.read_row_group

    def counted(self, *args, **kwargs):
        reads.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    sets = data.eval_sets(40, progress=True)
    assert len(reads) == pieces["train"] + pieces["test"]  # train/ once for the test and validation sets
    err = capsys.readouterr().err
    assert "eval sets: train" in err and "eval sets: test" in err
    monkeypatch.undo()
    for split, got in (("test", sets.test), ("valid", sets.valid)):
        want = load_eval_sets(data.path, got.users, split, progress=False)
        for got_sets, want_sets in zip((got.masked, got.relevant), want):
            for a, b in zip(got_sets.pairs(got.users), want_sets.pairs(got.users)):
                assert np.array_equal(a, b), split

    data.eval_sets(40, progress=False)
    err = capsys.readouterr().err  # (the bars' labels; log records may mention "eval sets" too)
    assert "eval sets: train" not in err and "eval sets: test" not in err


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_each_rank_reads_its_own_users_pairs(tmp_path, loader):
    """The closed form's input: the training pairs of users [lo, hi), with or without the validation
    holdout (streamed: in one pass), equal the selection from all the prepared training rows."""
    data = opened(config(tmp_path, loader))
    if loader == "stream":  # the reference: the prepared Parquet rows, read whole
        table = pq.read_table(sorted((data.path / "train").glob("*.parquet")))
        rows = {True: (table["user"].to_numpy(), table["item"].to_numpy())}
        fit = ~table["valid"].to_numpy(zero_copy_only=False)
        rows[False] = (rows[True][0][fit], rows[True][1][fit])
    else:
        rows = {True: (data.dataset.train_users, data.dataset.train_items), False: (data.fit_users, data.fit_items)}
    assert len(rows[False][0]) == data.num_fit < len(rows[True][0]) == data.manifest["counts"]["train_interactions"]
    for include_valid, (all_u, all_i) in rows.items():
        for lo, hi in ((0, 300), (0, 120), (120, 300), (77, 78), (150, 150)):
            keep = (all_u >= lo) & (all_u < hi)
            u, i = data.pairs(include_valid, lo, hi)
            assert sorted(zip(u.tolist(), i.tolist())) == sorted(zip(all_u[keep].tolist(), all_i[keep].tolist()))
