"""Stacking the spectral closed form after training (recsys/stack.py), through the real entry point:
the exported vectors are the concatenation, the figures training reports are those of the exported
vectors (numpy brute force), validation used tables of the fit part only and the scale matches the
score spreads, the weight is the best on validation (the selection rule on its own with stubbed
evaluations), evaluate / export from the checkpoint stack the same way; MF and a history two-tower,
one process and 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recsys.config import EvalConfig, ExportConfig
from recsys.data.dataset import Dataset
from recsys.data.eval_sets import EvalSets, EvalSplit
from recsys.data.features import Features
from recsys.errors import ConfigError
from recsys.evaluate import evaluate_run
from recsys.export import export_checkpoint
from recsys.exporter import read_vectors
from recsys.spectral import spectral_tables

DIM, SPEC = 16, 8
KS = (10, 20, 50)


@pytest.fixture(scope="module")
def stacked(tiny):
    """The tiny experiment with a 10% validation holdout and the spectral closed form stacked."""
    return lambda root, *extra: [*tiny(root), "data.valid_fraction=0.1", f"model.stack_spectral_dim={SPEC}",
                                 "log.plots=false", *extra]


def spectral_reference(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int):
    """Unit spectral user vectors (sum of the user's items' context rows, pairs counted once) and
    spectral item vectors, in numpy from the closed form's tables."""
    tables, _ = spectral_tables(users, items, 0, num_users, num_users, num_items, SPEC, alpha=0.0)
    history, item = tables["history"].numpy().astype(np.float64), tables["item"].numpy()
    keys = np.unique(users.astype(np.int64) * num_items + items)
    spec_u = np.zeros((num_users, SPEC))
    np.add.at(spec_u, keys // num_items, history[keys % num_items])
    return spec_u / np.maximum(np.linalg.norm(spec_u, axis=1, keepdims=True), 1e-12), item


def lists(users: np.ndarray, items: np.ndarray, num_users: int) -> list:
    out = [set() for _ in range(num_users)]
    for u, i in zip(users.tolist(), items.tolist()):
        out[u].add(i)
    return out


def check_stacked(run_dir: Path, brute_force, history: bool = False) -> dict:
    """The invariants of a stacked run of the tiny config (`history`: a two-tower with history bags,
    whose validation-time user vectors the exported ones do not give)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stack = metrics["stack"]
    data = Dataset.load(Path(metrics["data"]["path"]))
    n_u, n_i = data.num_users, data.num_items
    w = stack["chosen_weight"]
    assert w > 0, "the tiny problem's spectral part helps: a weight > 0 is chosen"
    # the weight: the best validation recall@20 among w = 0 (the trained model alone) and the grid
    # (extended by factors of 2 at its edges, see test_weight_selection), ties to the smaller
    grid = stack["valid"]
    given = [str(x) for x in stack["weights"]]
    assert list(grid)[: len(given) + 1] == ["0.0"] + given
    best = max(grid, key=lambda key: (grid[key]["recall@20"], -float(key)))
    assert float(best) == w and metrics["valid"] == grid[str(w)]

    user_ids, users = read_vectors(run_dir / "export", "users")
    item_ids, items = read_vectors(run_dir / "export", "items")
    assert users.shape == (n_u, DIM + SPEC) and items.shape == (n_i, DIM + SPEC)
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["dimension"] == DIM + SPEC and manifest["score"] == "dot"
    # the trained part keeps its cosine vectors; the spectral part is the closed form of all training pairs
    np.testing.assert_allclose(np.linalg.norm(users[:, :DIM], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(items[:, :DIM], axis=1), 1.0, atol=1e-5)
    unit_u, spec_i = spectral_reference(data.train_users, data.train_items, n_u, n_i)
    np.testing.assert_allclose(items[:, DIM:], spec_i, atol=1e-5)
    np.testing.assert_allclose(users[:, DIM:], w * stack["test_scale"] * unit_u, atol=1e-5)
    # c matches the spreads of the two scores (over 500 sampled users: all of them here)
    assert n_u == 500
    c = np.std(users[:, :DIM] @ items[:, :DIM].T, ddof=1) / np.std(unit_u @ spec_i.T, ddof=1)
    assert stack["test_scale"] == pytest.approx(c, rel=1e-4)

    # the test figures are those of the exported vectors' dot products
    train = lists(data.train_users, data.train_items, n_u)
    test = lists(data.test_users, data.test_items, n_u)
    want = brute_force(users @ items.T, train, test, KS)
    for key, value in want.items():
        assert metrics["test"][key] == pytest.approx(value, abs=1e-6), key
    if history:
        return metrics
    # validation: the same trained vectors (MF: no history) with spectral tables of the fit part only
    fit_u, fit_i = data.fit_pairs()
    unit_fit, spec_fit = spectral_reference(fit_u, fit_i, n_u, n_i)
    c = np.std(users[:, :DIM] @ items[:, :DIM].T, ddof=1) / np.std(unit_fit @ spec_fit.T, ddof=1)
    assert stack["valid_scale"] == pytest.approx(c, rel=1e-4)
    valid_users = np.hstack([users[:, :DIM], w * stack["valid_scale"] * unit_fit])
    valid_items = np.hstack([items[:, :DIM], spec_fit])
    want = brute_force(valid_users @ valid_items.T, lists(fit_u, fit_i, n_u),
                       lists(data.train_users[data.valid], data.train_items[data.valid], n_u), KS)
    for key, value in want.items():
        assert metrics["valid"][key] == pytest.approx(value, abs=1e-6), key
    return metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root, train_here, stacked):
    """One-process stacked runs: MF, and a two-tower with history bags (in the item table)."""
    tmp = tmp_path_factory.mktemp("stack")
    train_here(stacked(data_root), tmp / "mf")
    train_here(stacked(data_root, "model=two_tower", f"model.embedding_dim={DIM}"), tmp / "history")
    return tmp


def test_stacked_export_is_the_concatenation_and_is_what_was_evaluated(runs, brute_force):
    check_stacked(runs / "mf", brute_force)
    check_stacked(runs / "history", brute_force, history=True)


def test_evaluate_and_export_from_the_checkpoint_stack_the_same_way(runs, in_process):
    run_dir = runs / "history"
    in_process(evaluate_run, run_dir)
    ev, want = json.loads((run_dir / "eval.json").read_text()), json.loads((run_dir / "metrics.json").read_text())
    assert ev["stack"]["chosen_weight"] == want["stack"]["chosen_weight"]
    for part in ("test", "valid"):
        for key, value in want[part].items():
            assert ev[part][key] == pytest.approx(value, abs=1e-9), (part, key)
    # the trained towers alone, validated by the stage here (fit histories, fit mask) as the training
    # loop validated its selected epoch
    epoch = want["train"]["history"][want["selected_epoch"]]["valid"]
    for key, value in epoch.items():
        assert ev["stack"]["valid"]["0.0"][key] == pytest.approx(value, abs=1e-9), key
    # again, with another number of threads than the run's (the summation order changes with it)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        in_process(export_checkpoint, run_dir, ExportConfig(dir="again"))
    finally:
        torch.set_num_threads(threads)
    for name in ("users", "items"):
        ids, vecs = read_vectors(run_dir / "again", name)
        ref_ids, ref = read_vectors(run_dir / "export", name)
        assert ids == ref_ids
        # Recomputed from the checkpoint: the closed form and its scale are computed in float64 and
        # rounded to float32 once (recsys.spectral), so another summation order (threads, load) moves
        # them by ~1e-15 relative: each element is the run's, or one float32 ulp (<= 2^-23 relative)
        # away where the float64 value sits on a rounding boundary; 1e-12 absolute covers elements
        # near zero, whose float64 error (~1e-16 of the vectors' unit scale) is many of their own ulps.
        np.testing.assert_allclose(vecs, ref, rtol=2.0**-23, atol=1e-12)


def test_two_ranks_stack_the_same_way(tmp_path, data_root, two_ranks, train_here, stacked, brute_force):
    run_dir = tmp_path / "two"
    two_ranks(train_here, stacked(data_root, "train.sharding_types=[row_wise]"), str(run_dir))
    metrics = check_stacked(run_dir, brute_force)
    assert metrics["train"]["world_size"] == 2


class _Towers:
    embedding_dim, normalize = 2, False


@pytest.mark.parametrize("weights,curve,chosen,tried", [
    # an interior best: the grid as given
    ([0.25, 0.5, 1.0, 2.0], lambda w: -abs(w - 0.5), 0.5, [0.25, 0.5, 1.0, 2.0]),
    # ties everywhere: w = 0, the trained towers alone, returned as they are
    ([0.25, 0.5, 1.0], lambda w: 0.0, 0.0, [0.25, 0.5, 1.0]),
    # the best at the top: doubled while it improves (up to 8; 16 loses)
    ([0.25, 0.5, 1.0], lambda w: -abs(np.log2(w) - 3) if w else -9.0, 8.0, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]),
    # still improving: 4 doublings at most
    ([0.5, 1.0], lambda w: w, 16.0, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]),
    # the best at the bottom (and better than 0): halved while it improves
    ([0.25, 0.5, 1.0], lambda w: 1 - abs(w - 0.1) if w else 0.0, 0.125, [0.25, 0.5, 1.0, 0.125, 0.0625]),
    # one weight: used as given (still validated)
    ([0.5], lambda w: -w, 0.5, [0.5]),
])
def test_weight_selection(monkeypatch, weights, curve, chosen, tried):
    import torch

    import recsys.stack as stack

    monkeypatch.setattr(stack, "spectral_vectors", lambda *a, **k: stack.SpectralVectors(torch.zeros(4, 3), 0,
                                                                                         torch.zeros(5, 3)))
    monkeypatch.setattr(stack, "score_scale", lambda *a, **k: 10.0)
    seen = []

    def fake_evaluate(model, *args, **kwargs):
        w = model.scale / 10.0 if isinstance(model, stack.StackedTowers) else 0.0
        seen.append(w)
        return {"recall@20": float(curve(w))}

    monkeypatch.setattr(stack, "evaluate_model", fake_evaluate)

    class Data:
        num_users, num_items, num_fit = 4, 5, 7
        manifest = {"counts": {"train_interactions": 8}}

        def pairs(self, include_valid=True, lo=0, hi=None):
            return None

    split = EvalSplit(np.arange(4), 4, 5, Features(), None, None)
    options = stack.StackOptions(dim=3, weights=weights, alpha=0.0, niter=1, seed=0,
                                 eval=EvalConfig(ks=[20], user_chunk=8))
    base = _Towers()
    model, info = stack.stack_spectral(base, Data(), EvalSets(split, split), options, torch.device("cpu"))
    assert info["chosen_weight"] == chosen
    assert seen == ([0.0] if len(weights) > 1 else []) + tried
    if chosen == 0.0:
        assert model is base and "test_scale" not in info
    else:
        assert isinstance(model, stack.StackedTowers) and model.scale == chosen * 10.0 and model.embedding_dim == 5
        assert info["chosen_valid"] == {"recall@20": float(curve(chosen))}


def test_one_weight_is_used_as_given(tmp_path, data_root, train_here, stacked):
    stack = train_here(stacked(data_root, "model.stack_spectral_weights=[0.01]", "data.valid_fraction=0",
                               "export.enabled=false"), tmp_path / "given")["stack"]
    assert stack["chosen_weight"] == 0.01 and "valid" not in stack and stack["test_scale"] > 0


@pytest.mark.parametrize("extra,message", [
    (["data.valid_fraction=0"], "several weights are chosen among on the validation holdout"),
    (["model.stack_spectral_weights=[0.5,-1]"], "model.stack_spectral_weights must be positive"),
    (["model.stack_spectral_weights=[]"], "model.stack_spectral_weights: give at least one weight"),
    (["data.valid_fraction=0.01"], "left no validation interaction"),
    (["model.stack_spectral_dim=600"], "model.stack_spectral_dim=600 is larger than the number of users (500)"),
])
def test_bad_stacking_options_are_refused(tmp_path, data_root, train_here, stacked, extra, message):
    with pytest.raises(Exception) as refused:  # composing the config (its checks), or train() before any work
        train_here(stacked(data_root, *extra), tmp_path / "bad")
    error = refused.value.__cause__ or refused.value
    assert isinstance(error, ConfigError) and message in str(error), repr(error)
    assert not (tmp_path / "bad").exists()


def test_two_ranks_stack_a_streamed_dataset(tmp_path, data_root, two_ranks, train_here, stacked):
    """data.loader=stream: each rank reads its own users' training pairs (one pass over train/) for
    the distributed closed form; the exported spectral parts are the closed form of all the
    streamed training pairs (numpy reference from the prepared Parquet files)."""
    run_dir = tmp_path / "stream"
    two_ranks(train_here, stacked(data_root, "data.loader=stream", "train.sharding_types=[row_wise]"), str(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["loader"] == "stream" and metrics["stack"]["chosen_weight"] > 0
    train = pq.read_table(sorted((Path(metrics["data"]["path"]) / "train").glob("*.parquet")))
    n_u, n_i = metrics["data"]["num_users"], metrics["data"]["num_items"]
    unit_u, spec_i = spectral_reference(train["user"].to_numpy(), train["item"].to_numpy(), n_u, n_i)
    _, users = read_vectors(run_dir / "export", "users")
    _, items = read_vectors(run_dir / "export", "items")
    np.testing.assert_allclose(items[:, DIM:], spec_i, atol=1e-5)
    w, scale = metrics["stack"]["chosen_weight"], metrics["stack"]["test_scale"]
    np.testing.assert_allclose(users[:, DIM:], w * scale * unit_u, atol=1e-5)
