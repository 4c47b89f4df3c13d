"""Benchmark 3: full evaluation (exact Recall@K / NDCG@K over every item, training items masked)
on Gowalla-size data, ours against a straightforward numpy implementation of the same metric.

    python benchmarks/eval.py [--data ../shared/data/gowalla] [--runs 5] [--dim 64]

The (user, item) pairs are the LightGCN Gowalla split (train.txt masked, test.txt relevant:
29,858 users x 40,981 items, 810,128 + 217,242 pairs), read at run time from --data when it
exists, else random pairs of the same sizes. The vectors are random (seeded, float32, dim 64),
each user's planted near its own items (`planted_vectors`) so that the metrics are far from 0
and 1. Compared side by side in one process, each run in turn (the machine is shared: medians of
--runs):

- ours: ``recsys.evaluation.ranking.ranking_metric_sums`` (blocks of users x items, top K by group maxima,
  worker threads, torch's default number of threads);
- numpy: per chunk of 1024 users, scores = U @ V.T (float32), training items set to -inf,
  ``np.argpartition`` for the top K, then sorted (score descending, lower item first), relevance
  from a dense boolean test matrix of the chunk; numpy/OpenBLAS's default threads;
- previous: the evaluator before this change (per 1024 users: U @ V.T, mask, ``torch.topk``,
  relevance by binary search), for reference.

The metrics of the three must agree to 1e-6 (asserted; the largest difference is printed). A
single-threaded profile of ours and of the previous evaluator (CPU seconds per phase) follows.
Writes benchmarks/results/eval.json and eval.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from recsys.data import eval_sets  # noqa: E402
from recsys.data.dataset import CSR  # noqa: E402
from recsys.evaluation import ranking as E  # noqa: E402

KS = [10, 20, 50]
GOWALLA = {"num_users": 29858, "num_items": 40981, "train": 810128, "test": 217242}


# ---- data --------------------------------------------------------------------------------------


def load_pairs(data: Path, seed: int) -> Dict:
    """Train and test (user, item) pairs: the Gowalla files when present, else random ones."""
    if (data / "train.txt").is_file() and (data / "test.txt").is_file():
        from recsys.data.readers import read_lightgcn_file

        train, test = read_lightgcn_file(data / "train.txt"), read_lightgcn_file(data / "test.txt")
        tu, ti = train["user_id"].to_numpy(), train["item_id"].to_numpy()
        eu, ei = test["user_id"].to_numpy(), test["item_id"].to_numpy()
        source = f"{data} (LightGCN Gowalla split)"
        num_users = int(max(tu.max(), eu.max())) + 1
        num_items = int(max(ti.max(), ei.max())) + 1
    else:
        num_users, num_items = GOWALLA["num_users"], GOWALLA["num_items"]
        rng = np.random.default_rng(seed)
        keys = rng.choice(num_users * num_items, GOWALLA["train"] + GOWALLA["test"], replace=False)
        rng.shuffle(keys)
        tu, ti = np.divmod(keys[: GOWALLA["train"]], num_items)
        eu, ei = np.divmod(keys[GOWALLA["train"] :], num_items)
        source = f"random pairs of the Gowalla sizes ({data} not found)"
    return {"source": source, "num_users": num_users, "num_items": num_items,
            "train": CSR.from_pairs(tu.astype(np.int64), ti.astype(np.int64), num_users),
            "test": CSR.from_pairs(eu.astype(np.int64), ei.astype(np.int64), num_users)}


def planted_vectors(data: Dict, dim: int, seed: int):
    """Random item vectors; each user's vector is the sum of its test items' vectors and 0.3 x
    its training items' ones: the user's own items score high (so the masking and the hits
    matter) and the metrics are far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(data["num_items"], dim, generator=g)
    users = torch.zeros(data["num_users"], dim)
    for csr, weight in ((data["test"], 1.0), (data["train"], 0.3)):
        rows = torch.from_numpy(np.repeat(np.arange(data["num_users"]), csr.counts()))
        users.index_add_(0, rows, items[torch.from_numpy(csr.indices)], alpha=weight)
    return items, users


def _rows(csr: CSR, rows: np.ndarray):
    """(position in rows, item) of the rows' items."""
    starts, lengths = csr.indptr[rows], csr.indptr[rows + 1] - csr.indptr[rows]
    pos = np.repeat(np.arange(len(rows)), lengths)
    offsets = np.arange(len(pos)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return pos, csr.indices[np.repeat(starts, lengths) + offsets], lengths


# ---- the implementations -----------------------------------------------------------------------


def numpy_metrics(user_vecs: np.ndarray, item_vecs: np.ndarray, users: np.ndarray, train: CSR, test: CSR,
                  ks: Sequence[int], chunk: int = 1024) -> Dict[str, float]:
    """The same metric, straightforwardly in numpy: argpartition per chunk, masked with -inf."""
    kmax, num_items = max(ks), len(item_vecs)
    discount = 1.0 / np.log2(np.arange(2, kmax + 2))
    ideal = np.cumsum(discount)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for start in range(0, len(users), chunk):
        rows = users[start : start + chunk]
        scores = user_vecs[start : start + chunk] @ item_vecs.T
        pos, items, _ = _rows(train, rows)
        scores[pos, items] = -np.inf
        top = np.argpartition(-scores, kmax - 1, axis=1)[:, :kmax]
        order = np.lexsort((top, -np.take_along_axis(scores, top, 1)), axis=1)  # score desc, then lower item
        top = np.take_along_axis(top, order, 1)
        relevant = np.zeros((len(rows), num_items), dtype=bool)
        pos, items, n_test = _rows(test, rows)
        relevant[pos, items] = True
        rel = np.take_along_axis(relevant, top, 1).astype(np.float64)
        for k in ks:
            sums[f"recall@{k}"] += float((rel[:, :k].sum(1) / n_test).sum())
            sums[f"ndcg@{k}"] += float(((rel[:, :k] * discount[:k]).sum(1) / ideal[np.minimum(n_test, k) - 1]).sum())
    sums["users"] = float(len(users))
    return sums


@torch.no_grad()
def previous_metrics(user_vecs: torch.Tensor, item_vecs: torch.Tensor, users: np.ndarray, train: CSR, test: CSR,
                     ks: Sequence[int], chunk: int = 1024, phases: Dict[str, float] | None = None) -> Dict[str, float]:
    """The evaluator before blocks by items and group maxima (recsys/evaluate.py at f60268e)."""
    num_items, kmax = item_vecs.shape[0], max(ks)
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64))
    ideal = torch.cumsum(discount, 0)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    clock = _Phases(phases)
    for start in range(0, len(users), chunk):
        rows = users[start : start + chunk]
        c = len(rows)
        scores = user_vecs[start : start + c] @ item_vecs.T
        clock("matmul")
        pos, items, _ = _rows(train, rows)
        scores[torch.from_numpy(pos), torch.from_numpy(items)] = float("-inf")
        clock("mask")
        top = torch.topk(scores, kmax, dim=1).indices
        clock("top K")
        pos, items, lengths = _rows(test, rows)
        keys = torch.from_numpy(pos * num_items + items)
        query = torch.arange(c)[:, None] * num_items + top
        found = torch.searchsorted(keys, query).clamp_(max=max(len(keys) - 1, 0))
        rel = (keys[found] == query).double()
        n_test = torch.from_numpy(lengths).double()
        for k in ks:
            sums[f"recall@{k}"] += float((rel[:, :k].sum(1) / n_test).sum())
            idcg = ideal[(torch.clamp(n_test, max=k) - 1).long()]
            sums[f"ndcg@{k}"] += float(((rel[:, :k] * discount[:k]).sum(1) / idcg).sum())
        clock("relevance + metrics")
    sums["users"] = float(len(users))
    return sums


class _Phases:
    """Adds the CPU time since the last call to phases[name] (no-op without a dict)."""

    def __init__(self, phases: Dict[str, float] | None) -> None:
        self.phases, self.last = phases, time.process_time()

    def __call__(self, name: str) -> None:
        if self.phases is not None:
            now = time.process_time()
            self.phases[name] = self.phases.get(name, 0.0) + now - self.last
            self.last = now


@torch.no_grad()
def profile_ours(user_vecs: torch.Tensor, item_vecs: torch.Tensor, users: np.ndarray, train: CSR, test: CSR,
                 ks: Sequence[int]) -> Dict[str, float]:
    """CPU seconds per phase of ranking_metric_sums's block loop (one thread, same blocks)."""
    num_items, kmax = item_vecs.shape[0], max(ks)
    train_sets, test_sets = eval_sets.as_item_sets(train, num_items), eval_sets.as_item_sets(test, num_items)
    rows, width = E.block_shape(num_items, 1024)
    groups, padded = E._plan(width, kmax)
    buffer = torch.empty(padded * rows)
    phases: Dict[str, float] = {}
    clock = _Phases(phases)
    for first in range(0, len(users), rows):
        chunk = users[first : first + rows]
        c = len(chunk)
        scores_t = buffer[: padded * c].view(padded, c)
        torch.mm(item_vecs, user_vecs[first : first + c].T, out=scores_t[:num_items])
        scores_t[num_items:] = float("-inf")
        clock("matmul")
        E._mask(scores_t, train_sets, chunk, train_sets.pairs(chunk), 0, num_items)
        clock("mask")
        keys = E._block_top_keys(scores_t, num_items, 0, groups, kmax)
        clock("top K")
        E._relevant(test_sets, chunk, E._items_of(keys))
        clock("relevance + metrics")
    return phases


# ---- the benchmark -----------------------------------------------------------------------------


def timed(fn: Callable[[], Dict[str, float]]):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def means(sums: Dict[str, float]) -> Dict[str, float]:
    return {k: v / sums["users"] for k, v in sums.items() if k != "users"}


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gowalla"),
                   help="a LightGCN-format directory (train.txt, test.txt); random pairs of the same size if absent")
    p.add_argument("--runs", type=int, default=5, help="timed runs of each implementation (median reported)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-previous", action="store_true", help="skip the previous evaluator (the slowest)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    data = load_pairs(Path(args.data), args.seed)
    users = np.flatnonzero(data["test"].counts() > 0)
    item_vecs, user_vecs = planted_vectors(data, args.dim, args.seed)
    user_vecs = user_vecs[users].contiguous()
    u_np, v_np = user_vecs.numpy(), item_vecs.numpy()
    train, test = data["train"], data["test"]
    print(f"data: {data['source']}\n{len(users):,} evaluated users x {data['num_items']:,} items, dim {args.dim}, "
          f"{int(train.counts().sum()):,} masked / {int(test.counts().sum()):,} test pairs; K = {KS}; "
          f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    impls = {
        "ours": lambda: E.ranking_metric_sums(user_vecs, item_vecs, users, train, test, KS),
        "numpy": lambda: numpy_metrics(u_np, v_np, users, train, test, KS),
    }
    if not args.no_previous:
        impls["previous"] = lambda: previous_metrics(user_vecs, item_vecs, users, train, test, KS)
    times = {name: {"wall_s": [], "cpu_s": []} for name in impls}
    results: Dict[str, Dict[str, float]] = {}
    loads = []
    for run in range(args.runs):  # interleaved: each run of each implementation sees the same machine
        for name, fn in impls.items():
            loads.append(os.getloadavg()[0])
            sums, wall, cpu = timed(fn)
            times[name]["wall_s"].append(round(wall, 3))
            times[name]["cpu_s"].append(round(cpu, 3))
            results[name] = means(sums)
            print(f"run {run + 1}/{args.runs} {name:>8}: {wall:6.2f} s wall, {cpu:6.2f} s CPU", flush=True)

    diffs = {name: max(abs(results[name][k] - results["ours"][k]) for k in results["ours"]) for name in results}
    print("largest metric difference from ours: " + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()))
    assert all(d <= 1e-6 for d in diffs.values()), f"metrics differ by more than 1e-6: {diffs}"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profile = {"ours": profile_ours(user_vecs, item_vecs, users, train, test, KS)}
        if not args.no_previous:
            profile["previous"] = {}
            previous_metrics(user_vecs, item_vecs, users, train, test, KS, phases=profile["previous"])
    finally:
        torch.set_num_threads(threads)

    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    summary = {
        "benchmark": "eval", "data": data["source"], "num_users_evaluated": int(len(users)),
        "num_items": data["num_items"], "dim": args.dim, "ks": KS,
        "masked_pairs": int(train.counts().sum()), "test_pairs": int(test.counts().sum()),
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": threads, "processor": platform.processor(),
                    "load_average_during_runs": {"min": min(loads), "median": statistics.median(loads),
                                                 "max": max(loads)},
                    "torch": torch.__version__, "numpy": np.__version__},
        "runs": args.runs, "times": times, "median": med,
        "speedup_vs_numpy": {"wall": med["numpy"]["wall_s"] / med["ours"]["wall_s"],
                             "cpu": med["numpy"]["cpu_s"] / med["ours"]["cpu_s"]},
        "target": "full evaluation <= 2 s on 2 CPU cores",
        "metrics": results, "max_abs_difference_from_ours": diffs,
        "profile_cpu_s_one_thread": {n: {k: round(v, 3) for k, v in ph.items()} for n, ph in profile.items()},
    }
    md = table(summary)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, out / "eval.json")
    write_text_atomic(md, out / "eval.md")
    print(f"written: {out / 'eval.json'}, {out / 'eval.md'}")
    return 0


def table(s: Dict) -> str:
    lines = [
        "# Benchmark 3: full evaluation on Gowalla-size data",
        "",
        f"{s['num_users_evaluated']:,} users x {s['num_items']:,} items, dim {s['dim']}, {s['masked_pairs']:,} masked "
        f"and {s['test_pairs']:,} test pairs ({s['data']}); Recall/NDCG@{','.join(map(str, s['ks']))}; "
        f"{s['machine']['cpu_cores']} CPU cores, torch threads {s['machine']['torch_threads']}; median of "
        f"{s['runs']} interleaved runs; the machine is shared (load average during the runs: median "
        f"{s['machine']['load_average_during_runs']['median']:.1f}, CPU time is the less noisy figure).",
        "",
        "| implementation | wall s (median) | CPU s (median) | recall@20 | ndcg@20 | max abs diff vs ours |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {"ours": "ours (recsys.evaluation)", "numpy": "numpy (argpartition, -inf mask)",
             "previous": "previous evaluator (torch.topk per 1024 users)"}
    for name, m in s["median"].items():
        r = s["metrics"][name]
        lines.append(f"| {names[name]} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {r['recall@20']:.6f} | "
                     f"{r['ndcg@20']:.6f} | {s['max_abs_difference_from_ours'][name]:.1e} |")
    ours = s["median"]["ours"]
    lines += ["", f"Ours vs numpy: {s['speedup_vs_numpy']['wall']:.1f}x faster (wall), "
                  f"{s['speedup_vs_numpy']['cpu']:.1f}x less CPU time.", "",
              f"Target: {s['target']}. Measured here: {ours['wall_s']:.2f} s wall on the shared machine; "
              f"{ours['cpu_s']:.2f} CPU seconds in all, i.e. {ours['cpu_s'] / 2:.2f} s on each of 2 cores were they "
              "free (the two worker threads share the blocks evenly; an estimate, not a measurement).", "",
              "CPU seconds per phase, one thread:", "",
              "| implementation | " + " | ".join(next(iter(s["profile_cpu_s_one_thread"].values()))) + " | total |",
              "| --- |" + " ---: |" * (len(next(iter(s["profile_cpu_s_one_thread"].values()))) + 1)]
    for name, ph in s["profile_cpu_s_one_thread"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in ph.values()) + f" | {sum(ph.values()):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
