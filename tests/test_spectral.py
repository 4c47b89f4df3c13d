"""Spectral initialisation (recsys/spectral.py) against numpy references."""

import numpy as np
import pytest
import torch

from recsys.spectral import load_tables, spectral_tables


def _pairs(num_users, num_items, density, seed):
    rng = np.random.default_rng(seed)
    dense = rng.random((num_users, num_items)) < density
    dense[np.arange(num_users), rng.integers(0, num_items, num_users)] = True  # every user has an item
    dense[rng.integers(0, num_users, num_items), np.arange(num_items)] = True  # every item has a user
    u, i = np.nonzero(dense)
    return u, i, dense.astype(np.float64)


def _scores(tables, dense):
    user = dense @ tables["history"].double().numpy()  # sum-pooled history bag
    return user @ tables["item"].double().numpy().T


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_full_rank_equals_the_closed_form_filter(alpha):
    # With every singular vector kept, V V^T = I and V S^2 V^T = R~^T R~: the score is
    # r D^-1/2 (I + alpha R~^T R~) D^1/2, computed here without any SVD.
    u, i, dense = _pairs(30, 12, 0.3, 0)
    repeated_u, repeated_i = np.concatenate([u, u[:5]]), np.concatenate([i, i[:5]])  # repeats count once
    tables, _ = spectral_tables(repeated_u, repeated_i, 0, 30, 30, 12, dim=12, alpha=alpha, niter=6)
    du, di = dense.sum(1), dense.sum(0)
    norm = dense / np.sqrt(du[:, None] * di[None, :])
    filt = np.eye(12) + alpha * norm.T @ norm
    expected = dense @ np.diag(di**-0.5) @ filt @ np.diag(di**0.5)
    np.testing.assert_allclose(_scores(tables, dense), expected, rtol=1e-4, atol=1e-5)
    assert set(tables) == {"item", "history"}  # the user table starts at zero (load_tables' `zero`)


def test_truncated_equals_numpy_svd_subspace():
    u, i, dense = _pairs(60, 40, 0.15, 1)
    k = 6
    tables, _ = spectral_tables(u, i, 0, 60, 60, 40, dim=k, alpha=0.0, niter=30)
    du, di = dense.sum(1), dense.sum(0)
    _, s, vt = np.linalg.svd(dense / np.sqrt(du[:, None] * di[None, :]))
    assert s[k - 1] - s[k] > 1e-3  # a gap: the top-k subspace is well defined
    v = vt[:k].T
    expected = dense @ np.diag(di**-0.5) @ v @ v.T @ np.diag(di**0.5)
    np.testing.assert_allclose(_scores(tables, dense), expected, rtol=1e-3, atol=1e-4)


def test_load_tables_checks_names_and_shapes():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = torch.nn.Module()
            self.ebc.embedding_bags = torch.nn.ModuleDict({"item": torch.nn.EmbeddingBag(4, 3)})

    model = Plain()
    load_tables(model, {"item": torch.ones(4, 3)})
    assert torch.equal(model.ebc.embedding_bags["item"].weight.detach(), torch.ones(4, 3))
    load_tables(model, {}, zero=("item",))
    assert torch.equal(model.ebc.embedding_bags["item"].weight.detach(), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="shape"):
        load_tables(model, {"item": torch.ones(5, 3)})
    with pytest.raises(ValueError, match="no initial values"):
        load_tables(model, {})
    with pytest.raises(ValueError, match="larger than the number"):
        spectral_tables(np.array([0]), np.array([0]), 0, 1, 1, 1, dim=2, alpha=0.0)


def test_training_two_ranks_exports_the_refit_closed_form(tmp_path, two_ranks, train_here):
    """`model.init=spectral train.epochs=0` through the real train() on 2 gloo ranks: validation
    metrics from the fit part, then the tables recomputed from all of train.txt; the exported
    vectors are the closed-form filter of the whole training split (numpy reference, full rank)."""
    import json

    from recsys.exporter import read_vectors

    rng = np.random.default_rng(0)
    lg = tmp_path / "lg"
    lg.mkdir()
    train = {}
    lines_train, lines_test = [], []
    for u in range(80):
        picks = [int(i) for i in rng.choice(24, 9, replace=False)]
        train[u] = picks[:7]
        lines_train.append(" ".join(map(str, [u, *picks[:7]])))
        lines_test.append(" ".join(map(str, [u, *picks[7:]])))
    (lg / "train.txt").write_text("\n".join(lines_train) + "\n")
    (lg / "test.txt").write_text("\n".join(lines_test) + "\n")
    run_dir = tmp_path / "run"
    two_ranks(train_here, ["data=lightgcn", f"data.path={lg}", "data.valid_fraction=0.3", f"data.root={tmp_path / 'data'}",
                           "model=two_tower", "model.init=spectral", "model.embedding_dim=24", "model.spectral_alpha=1.0",
                           "model.spectral_niter=6", "model.history_weight=1.0", "model.history_pooling=sum",
                           "model.share_item_table=false", "model.normalize=false", "train.epochs=0",
                           "train.batch_size=64", "loss.num_negatives=32", "eval.ks=[5,10]",
                           "eval.select_metric=recall@10", "train.progress=false", "log.plots=false"], str(run_dir))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train"]["steps"] == 0 and 0 < m["valid"]["recall@10"] <= 1 and m["valid"]["users"] > 0

    dense = np.zeros((80, 24))
    for u, items in train.items():
        dense[u, items] = 1
    di = dense.sum(0)
    norm = dense / np.sqrt(dense.sum(1)[:, None] * di[None, :])
    expected = dense @ np.diag(di**-0.5) @ (np.eye(24) + norm.T @ norm) @ np.diag(di**0.5)
    user_ids, user_vecs = read_vectors(run_dir / "export", "users")
    item_ids, item_vecs = read_vectors(run_dir / "export", "items")
    scores = user_vecs.astype(np.float64) @ item_vecs.T.astype(np.float64)
    np.testing.assert_allclose(scores, expected[np.ix_(user_ids, item_ids)], rtol=1e-3, atol=1e-4)


def test_the_closed_form_does_not_depend_on_the_number_of_threads():
    """The closed form is computed in float64 and rounded to float32 once: with 1 and 2 threads (other
    summation orders in the sparse products and LAPACK) the tables are equal, or one float32 ulp
    apart where the float64 value sits on a rounding boundary. In float32 the same computation moved
    singular vectors by 5e-5 here (3,000 x 1,000 interactions, 32 vectors) between the two thread
    counts: a stacked run exported again from its checkpoint on another machine did not match."""
    import torch

    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 3000, 60_000), rng.zipf(1.2, 60_000) % 1000
    threads = torch.get_num_threads()
    tables = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            tables.append(spectral_tables(users, items, 0, 3000, 3000, 1000, dim=32, alpha=1.0)[0])
    finally:
        torch.set_num_threads(threads)
    for name in ("item", "history"):
        # one float32 ulp is at most 2^-23 of the value; 1e-12 absolute for values near zero, whose
        # float64 error (~1e-16 of the unit-norm singular vectors) spans many of their own ulps
        np.testing.assert_allclose(tables[0][name].numpy(), tables[1][name].numpy(), rtol=2.0**-23, atol=1e-12)


def distributed_svd_rank(num_users: int, num_items: int, k: int, seed: int, niter: int):
    """On each rank: the pairs of its own users only, the distributed closed form's factors."""
    from recsys.parallelize import destroy_distributed, init_distributed
    from recsys.distributed import own_rows
    from recsys.spectral import spectral_factors

    init_distributed("cpu")
    u, i, _ = _pairs(num_users, num_items, 0.15, seed)
    lo, hi = own_rows(num_users)
    mine = (u >= lo) & (u < hi)
    s, v, di, _ = spectral_factors(u[mine], i[mine], lo, hi, num_users, num_items, k, niter=niter, seed=3)
    destroy_distributed()
    return {"s": s, "v": v, "di": di, "rows": hi - lo}


@pytest.mark.parametrize("world,num_users,num_items,k", [(1, 61, 40, 6), (2, 61, 40, 6), (3, 61, 40, 6),
                                                        (3, 8, 12, 2)])  # (3, 8, 12, 2): blocks of < q rows
def test_distributed_svd_equals_numpy_svd_subspace(world, num_users, num_items, k, start_ranks):
    """Each rank holds its users' rows only: the singular values and the right singular subspace
    equal numpy's dense SVD, identical on every rank, the same for 1, 2 and 3 ranks, also when the
    ranks' row blocks are smaller than the sketch (TSQR of short blocks)."""
    niter = 60
    _, _, dense = _pairs(num_users, num_items, 0.15, 1)
    out = start_ranks(distributed_svd_rank, world, num_users, num_items, k, 1, niter).wait()
    assert sum(o["rows"] for o in out) == num_users and all(o["rows"] < num_users for o in out[1:])
    du, di = dense.sum(1), dense.sum(0)
    _, s, vt = np.linalg.svd(dense / np.sqrt(du[:, None] * di[None, :]))
    assert s[k - 1] - s[k] > 1e-3  # a gap: the top-k subspace is well defined
    for o in out:
        np.testing.assert_array_equal(o["v"], out[0]["v"])  # rank 0's factors everywhere
        np.testing.assert_array_equal(o["di"], di)  # the item degrees summed over ranks
    # Halko et al.: with q = k + 10 sketch vectors the subspace error shrinks as
    # (s[q] / s[k-1])^(2 niter + 1) (here 6e-6 with 20 iterations, as measured; 4e-16 with 60),
    # on top of float64 rounding (1e-15 relative, times the 40 x 40 products' sums)
    q = min(k + 10, num_users, num_items)
    bound = (s[q] / s[k - 1]) ** (2 * niter + 1) if q < min(num_users, num_items) else 0.0
    tol = 10 * bound + 1e-12
    np.testing.assert_allclose(out[0]["s"], s[:k], rtol=tol)
    np.testing.assert_allclose(out[0]["v"] @ out[0]["v"].T, vt[:k].T @ vt[:k], atol=tol)
    v = out[0]["v"]
    assert (v[np.abs(v).argmax(0), np.arange(k)] > 0).all()  # the sign convention
