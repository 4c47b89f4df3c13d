"""Stacking the spectral closed form after training (recsys/stack.py), through the real entry point:
the exported vectors are the concatenation, the figures training reports are those of the exported
vectors (numpy brute force), validation used tables of the fit part only, the weight is the best
on validation, evaluate / export from the checkpoint stack the same way; one process and 2 ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsys.data import Dataset
from recsys.export import read_vectors
from recsys.spectral import spectral_tables
from tests.dist_utils import free_port
from tests.test_evaluate import brute_force
from tests.test_train import run, tiny

DIM, SPEC = 16, 8
KS = (10, 20, 50)


def stacked_args(tmp_path: Path, run_dir: Path, *extra: str) -> list:
    return [*tiny(tmp_path, run_dir), "data.valid_fraction=0.1", f"model.stack_spectral_dim={SPEC}",
            "log.plots=false", *extra]


def spectral_reference(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int):
    """Unit spectral user vectors (sum of the user's items' context rows, pairs counted once) and
    spectral item vectors, in numpy from the closed form's tables."""
    tables = spectral_tables(users, items, num_users, num_items, SPEC, alpha=0.0)
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


def check_stacked(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stack = metrics["stack"]
    data = Dataset.load(Path(metrics["data"]["path"]))
    n_u, n_i = data.num_users, data.num_items
    w = stack["chosen_weight"]
    assert w > 0, "the tiny problem's spectral part helps: a weight > 0 is chosen"
    # the weight: the best validation recall@20 among w = 0 (the trained model alone) and the grid, ties to the smaller
    grid = stack["valid"]
    assert list(grid) == ["0.0"] + [str(x) for x in stack["weights"]]
    best = max(grid, key=lambda key: (grid[key]["recall@20"], -float(key)))
    assert float(best) == w
    assert grid["0.0"] == metrics["train"]["history"][metrics["selected_epoch"]]["valid"]
    assert metrics["valid"] == grid[str(w)]

    user_ids, users = read_vectors(run_dir / "export" / "users.parquet")
    item_ids, items = read_vectors(run_dir / "export" / "items.parquet")
    assert users.shape == (n_u, DIM + SPEC) and items.shape == (n_i, DIM + SPEC)
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["dimension"] == DIM + SPEC and manifest["score"] == "dot"
    # the trained MF part keeps its cosine vectors; the spectral part is the closed form of all training pairs
    np.testing.assert_allclose(np.linalg.norm(users[:, :DIM], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(items[:, :DIM], axis=1), 1.0, atol=1e-5)
    unit_u, spec_i = spectral_reference(data.train_users, data.train_items, n_u, n_i)
    np.testing.assert_allclose(items[:, DIM:], spec_i, atol=1e-5)
    np.testing.assert_allclose(users[:, DIM:], w * stack["test_scale"] * unit_u, atol=1e-5)

    # the test figures are those of the exported vectors' dot products
    train = lists(data.train_users, data.train_items, n_u)
    test = lists(data.test_users, data.test_items, n_u)
    want = brute_force(users @ items.T, train, test, KS)
    for key, value in want.items():
        assert metrics["test"][key] == pytest.approx(value, abs=1e-6), key
    # validation: the same trained vectors (MF: no history) with spectral tables of the fit part only
    fit_u, fit_i = data.fit_pairs()
    unit_fit, spec_fit = spectral_reference(fit_u, fit_i, n_u, n_i)
    valid_users = np.hstack([users[:, :DIM], w * stack["valid_scale"] * unit_fit])
    valid_items = np.hstack([items[:, :DIM], spec_fit])
    want = brute_force(valid_users @ valid_items.T, lists(fit_u, fit_i, n_u),
                       lists(data.train_users[data.valid], data.train_items[data.valid], n_u), KS)
    for key, value in want.items():
        assert metrics["valid"][key] == pytest.approx(value, abs=1e-6), key
    return metrics


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    run_dir = tmp / "one"
    run([sys.executable, "-m", "recsys.train", *stacked_args(tmp, run_dir)], tmp)
    return tmp, run_dir


def test_stacked_export_is_the_concatenation_and_is_what_was_evaluated(one_process):
    _, run_dir = one_process
    metrics = check_stacked(run_dir)
    assert metrics["test"]["recall@20"] > metrics["stack"]["valid"]["0.0"]["recall@20"] - 0.2  # sanity: same scale


def test_evaluate_and_export_from_the_checkpoint_stack_the_same_way(one_process):
    tmp, run_dir = one_process
    out = subprocess.run([sys.executable, "-m", "recsys.evaluate", str(run_dir)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    ev, want = json.loads((run_dir / "eval.json").read_text()), json.loads((run_dir / "metrics.json").read_text())
    assert ev["stack"]["chosen_weight"] == want["stack"]["chosen_weight"]
    for part in ("test", "valid"):
        for key, value in want[part].items():
            assert ev[part][key] == pytest.approx(value, abs=1e-9), (part, key)
    out = subprocess.run([sys.executable, "-m", "recsys.export", f"export.run_dir={run_dir}", "export.dir=again"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    for name in ("users", "items"):
        ids, vecs = read_vectors(run_dir / "again" / f"{name}.parquet")
        ref_ids, ref = read_vectors(run_dir / "export" / f"{name}.parquet")
        assert ids == ref_ids
        np.testing.assert_allclose(vecs, ref, atol=1e-6)


def test_two_ranks_stack_the_same_way(tmp_path):
    run_dir = tmp_path / "two"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "recsys.train", *stacked_args(tmp_path, run_dir, "train.sharding_types=[row_wise]")], tmp_path)
    metrics = check_stacked(run_dir)
    assert metrics["train"]["world_size"] == 2


def test_one_weight_is_used_as_given(tmp_path):
    run_dir = tmp_path / "given"
    run([sys.executable, "-m", "recsys.train", *stacked_args(tmp_path, run_dir, "model.stack_spectral_weights=[0.01]",
                                                              "data.valid_fraction=0", "export.enabled=false")],
        tmp_path)
    stack = json.loads((run_dir / "metrics.json").read_text())["stack"]
    assert stack["chosen_weight"] == 0.01 and "valid" not in stack and stack["test_scale"] > 0


@pytest.mark.parametrize("extra,message", [
    (["data.valid_fraction=0"], "several weights are chosen among on the validation holdout"),
    (["model.stack_spectral_weights=[0.5,-1]"], "model.stack_spectral_weights must be positive"),
    (["data.loader=stream"], "stacking the spectral closed form needs the training pairs in memory"),
    ([f"model.stack_spectral_dim=600"], "model.stack_spectral_dim=600 is larger than the number of users (500)"),
])
def test_bad_stacking_options_are_refused(tmp_path, extra, message):
    proc = run([sys.executable, "-m", "recsys.train", *stacked_args(tmp_path, tmp_path / "bad", *extra)], tmp_path,
               check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "metrics.json").exists()
