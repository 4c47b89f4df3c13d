"""Data sources (recsys.sources): the evaluated users and their record, the model inputs, the
streamed evaluation sets read in one pass."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recsys.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig
from recsys.data import prepare
from recsys.evaluate import eval_users, load_eval_sets
from recsys.model import build_task
from recsys.sources import InMemoryData, StreamedData, data_config, make_features, open_data

CPU = torch.device("cpu")


def config(tmp_path, loader: str, model: str = "mf", max_users: int = 40, progress: bool = False) -> Config:
    return Config(data=DataConfig(root=str(tmp_path / "data"), loader=loader, num_users=300, num_items=100,
                                  num_interactions=8000, row_group_size=700, valid_fraction=0.1),
                  model=ModelConfig(name=model, embedding_dim=8), eval=EvalConfig(max_users=max_users),
                  train=TrainConfig(progress=progress))


def opened(cfg: Config):
    data = open_data(cfg, prepare(data_config(cfg)))
    return data, build_task(cfg, data.num_users, data.num_items).model


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_sample_of_evaluated_users_is_logged_and_recorded(tmp_path, caplog, loader):
    cfg = config(tmp_path, loader)
    data, model = opened(cfg)
    assert isinstance(data, InMemoryData if loader == "memory" else StreamedData) and data.eval_info == {}
    with caplog.at_level(logging.INFO, logger="recsys.sources"):
        data.setup(cfg, model, 0, 1, CPU)
    of = data.manifest["counts"]["test_users"] if loader == "stream" else int(np.count_nonzero(data.test_csr.counts()))
    assert of > 40 and data.eval_info == {"eval_users": 40, "eval_users_of": of}
    assert f"evaluating 40 of {of} test users (eval.max_users)" in caplog.text
    assert len(data.test_users) == len(data.valid_users) == 40
    if loader == "memory":  # the users evaluate_model would have sampled itself
        assert np.array_equal(data.test_users, eval_users(data.test_csr.counts(), 40))
        assert np.array_equal(data.valid_users, eval_users(data.valid_csr.counts(), 40))

    caplog.clear()
    everyone = config(tmp_path, loader, max_users=0)
    other = open_data(everyone, prepare(data_config(everyone)))
    with caplog.at_level(logging.INFO, logger="recsys.sources"):
        other.setup(everyone, model, 0, 1, CPU)
    assert other.eval_info == {"eval_users": of, "eval_users_of": of} and "evaluating" not in caplog.text
    assert data.eval_info["eval_users"] == 40  # each source its own record


def test_features_of_each_source(tmp_path):
    cfg = config(tmp_path, "memory", model="two_tower")
    data, model = opened(cfg)
    assert model.has_history
    for include_valid in (True, False):
        want = make_features(cfg, data.dataset, model, include_valid)
        got = data.features(model, include_valid)
        assert np.array_equal(got.history.indptr, want.history.indptr)
        assert np.array_equal(got.history.indices, want.history.indices)
    full, fit = data.features(model), data.features(model, include_valid=False)
    assert full.history.indices.size > fit.history.indices.size  # the validation holdout is in the default
    assert data.features(model, False, training=True).dropout == cfg.model.history_dropout

    cfg = config(tmp_path, "stream")
    data, model = opened(cfg)
    features = data.features(model)
    assert features.history is None and features.item_history is None


def test_streamed_sets_are_read_in_one_pass_with_a_progress_bar_on_request(tmp_path, monkeypatch, capsys):
    cfg = config(tmp_path, "stream", progress=True)
    data, model = opened(cfg)
    pieces = {part: len(json.loads((data.path / part / "pieces.json").read_text())) for part in ("train", "test")}
    reads = []
    real = pq.ParquetFile.read_row_group

    def counted(self, *args, **kwargs):
        reads.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    data.setup(cfg, model, 0, 1, CPU)
    assert len(reads) == pieces["train"] + pieces["test"]  # train/ once for the test and validation sets
    err = capsys.readouterr().err
    assert "eval sets: train" in err and "eval sets: test" in err
    monkeypatch.undo()
    for split, users, sets in (("test", data.test_users, (data.train_mask, data.test_csr)),
                               ("valid", data.valid_users, (data.fit_mask, data.valid_csr))):
        want = load_eval_sets(data.path, users, split, progress=False)
        for got_sets, want_sets in zip(sets, want):
            for a, b in zip(got_sets.pairs(users), want_sets.pairs(users)):
                assert np.array_equal(a, b), split

    quiet = config(tmp_path, "stream", progress=False)
    data.setup(quiet, model, 0, 1, CPU)
    err = capsys.readouterr().err  # (the bars' labels; log records may mention "eval sets" too)
    assert "eval sets: train" not in err and "eval sets: test" not in err
    data.setup(cfg, model, 1, 2, CPU)  # another rank than 0: no bar
    err = capsys.readouterr().err
    assert "eval sets: train" not in err and "eval sets: test" not in err
