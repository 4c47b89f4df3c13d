"""Stack a trained run's exported vectors with the spectral closed form (a prototype of the next step).

    python benchmarks/stack_spectral.py --run outputs/bench-quality/gowalla/gowalla_mf

The stacked model is still a dot product: user = [u_run, w * c * u_spec / |u_spec|], item =
[i_run, i_spec], where (u_spec, i_spec) are the spectral two-tower's vectors (`recsys.spectral`,
dim `--dim`, alpha 0) and c is one global scale that matches the spread of the spectral scores to
the run's on 500 users. The weight w is chosen on the run's validation holdout (its `valid`
rows), with spectral tables computed from the fit part only; on test the spectral tables are
recomputed from the whole training split (as `model.spectral_refit` does) and the run's vectors
are used as exported. Use a run whose exported user vectors do not depend on the validation
interactions (MF, or a two-tower without history bags): a history bag pools them in.

Prints a table; writes benchmarks/results/stack_spectral_<run>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from recsys.data import CSR, Dataset  # noqa: E402
from recsys.evaluate import ranking_metric_sums  # noqa: E402
from recsys.spectral import spectral_tables  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KS = (20,)


def exported(run: Path, name: str, column: str, raw_ids: np.ndarray) -> np.ndarray:
    """The run's exported vectors in the prepared dataset's row order."""
    table = pq.read_table(run / "export" / f"{name}.parquet")
    ids = table[column].to_numpy(zero_copy_only=False)
    position = {v: k for k, v in enumerate(ids.tolist())}
    missing = [r for r in raw_ids.tolist() if r not in position]
    if missing:
        sys.exit(f"{run}/export/{name}.parquet: {len(missing)} ids of the prepared dataset are missing")
    vectors = np.stack(table["vector"].to_numpy(zero_copy_only=False))
    return vectors[[position[r] for r in raw_ids.tolist()]].astype(np.float32)


def spectral_vectors(users, items, num_users, num_items, dim):
    tables = spectral_tables(users, items, num_users, num_items, dim, alpha=0.0)
    history = torch.sparse_coo_tensor(np.stack([users, items]), torch.ones(len(users)), (num_users, num_items))
    return torch.sparse.mm(history.coalesce(), tables["history"]), tables["item"]


def metrics(user_vecs, item_vecs, train: CSR, test: CSR) -> tuple:
    users = np.nonzero(np.diff(test.indptr))[0]  # the users with validation / test items
    sums = ranking_metric_sums(user_vecs[torch.from_numpy(users)], item_vecs, users, train, test, KS)
    return round(sums["recall@20"] / sums["users"], 4), round(sums["ndcg@20"] / sums["users"], 4)


def stacked(run_u, run_i, spec_u, spec_i, weights, train: CSR, test: CSR) -> dict:
    unit = spec_u / spec_u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sample = torch.from_numpy(np.random.default_rng(0).choice(run_u.shape[0], min(500, run_u.shape[0]), replace=False))
    scale = float((run_u[sample] @ run_i.T).std() / (unit[sample] @ spec_i.T).std())
    out = {"run": metrics(run_u, run_i, train, test), "spectral": metrics(spec_u, spec_i, train, test)}
    for w in weights:
        out[str(w)] = metrics(torch.cat([run_u, w * scale * unit], 1), torch.cat([run_i, spec_i], 1), train, test)
        print(f"  w {w}: {out[str(w)]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run directory with export/ and metrics.json")
    p.add_argument("--dim", type=int, default=1024, help="spectral dimension")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0156, 0.031, 0.0625, 0.125, 0.25, 0.5, 1, 2])
    args = p.parse_args()
    t0 = time.perf_counter()
    metrics_json = json.loads((args.run / "metrics.json").read_text())
    data = Dataset.load(ROOT / metrics_json["data"]["path"])
    if not data.has_valid:
        sys.exit(f"{args.run}: the run has no validation holdout (data.valid_fraction) to choose the weight on")
    n_u, n_i = data.num_users, data.num_items
    run_u = torch.from_numpy(exported(args.run, "users", "user_id",
                                      pq.read_table(data.path / "users.parquet")["user_id"].to_numpy()))
    run_i = torch.from_numpy(exported(args.run, "items", "item_id",
                                      pq.read_table(data.path / "items.parquet")["item_id"].to_numpy()))
    fit_u, fit_i = data.fit_pairs()
    print(f"{args.run.name}: validation (spectral tables from the {len(fit_u):,} fit interactions)", flush=True)
    spec_u, spec_i = spectral_vectors(fit_u, fit_i, n_u, n_i, args.dim)
    valid = stacked(run_u, run_i, spec_u, spec_i, args.weights, data.train_csr(include_valid=False), data.valid_csr())
    chosen = max(args.weights, key=lambda w: valid[str(w)])  # Recall@20, then NDCG@20
    print(f"test (spectral tables from all {len(data.train_users):,} training interactions); validation chose w {chosen}",
          flush=True)
    spec_u, spec_i = spectral_vectors(data.train_users, data.train_items, n_u, n_i, args.dim)
    test = stacked(run_u, run_i, spec_u, spec_i, args.weights, data.train_csr(),
                   CSR.from_pairs(data.test_users, data.test_items, n_u))
    result = {"run": str(args.run), "dim": args.dim, "chosen_weight": chosen, "valid": valid, "test": test,
              "seconds": round(time.perf_counter() - t0, 1)}
    rows = [f"| {f'**{w}** (chosen on validation)' if w == chosen else w} | {valid[str(w)][0]:.4f} / "
            f"{valid[str(w)][1]:.4f} | {test[str(w)][0]:.4f} / {test[str(w)][1]:.4f} |" for w in args.weights]
    table = "\n".join([f"# {args.run.name} stacked with the spectral closed form (dim {args.dim})", "",
                       "| w | valid Recall@20 / NDCG@20 | test Recall@20 / NDCG@20 |", "|---|---|---|",
                       f"| run alone | {valid['run'][0]:.4f} / {valid['run'][1]:.4f} | {test['run'][0]:.4f} / {test['run'][1]:.4f} |",
                       f"| spectral alone | {valid['spectral'][0]:.4f} / {valid['spectral'][1]:.4f} | "
                       f"{test['spectral'][0]:.4f} / {test['spectral'][1]:.4f} |", *rows, ""])
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(result, RESULTS / f"stack_spectral_{args.run.name}.json")
    write_text_atomic(table, RESULTS / f"stack_spectral_{args.run.name}.md")
    print(f"wrote {RESULTS}/stack_spectral_{args.run.name}.json, .md ({result['seconds']} s)")


if __name__ == "__main__":
    main()
