"""Is a LightGCN-format test file a random per-user holdout of the interactions, like our validation split?

    python benchmarks/split_shift.py ../shared/data/gowalla

For every user with test items: the mean item id of their test items minus that of their training
items, averaged over users, against the same statistic after re-splitting each user's items at
random (same sizes, seeded). Under a random per-user split both are ~0. A shift means the test
file is not drawn like a random holdout of train.txt, so a random validation holdout (ours) cannot
show what the test file rewards. (If item ids were numbered in order of first appearance in the
raw log, a positive shift means newer test items; the files alone do not say how ids were given.)
Prints a table and writes benchmarks/results/split_shift_<name>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.atomic import write_json_atomic  # noqa: E402
from recsys.data.readers import read_lightgcn_file  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def read_lines(path: Path) -> dict:
    """{user: its items in line order} of a LightGCN-format file (the project's reader)."""
    table = read_lightgcn_file(path)
    users, items = table["user_id"].to_numpy(), table["item_id"].to_numpy()
    order = np.argsort(users, kind="stable")
    keys, starts = np.unique(users[order], return_index=True)
    return dict(zip(keys.tolist(), np.split(items[order], starts[1:])))


def shift(train: dict, test: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    observed, null = [], []
    for user, test_items in test.items():
        train_items = train.get(user)
        if train_items is None or len(train_items) == 0:
            continue
        observed.append(test_items.mean() - train_items.mean())
        both = rng.permutation(np.concatenate([train_items, test_items]))
        null.append(both[:len(test_items)].mean() - both[len(test_items):].mean())
    observed, null = np.array(observed), np.array(null)

    def summary(x):
        return {"mean": float(x.mean()), "se": float(x.std() / np.sqrt(len(x))), "share_positive": float((x > 0).mean())}

    return {"users": len(observed), "test": summary(observed), "random_resplit": summary(null),
            "z": float((observed.mean() - null.mean()) / np.hypot(observed.std(), null.std()) * np.sqrt(len(observed)))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a directory with train.txt and test.txt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    result = {"dataset": args.path.name, **shift(read_lines(args.path / "train.txt"),
                                                   read_lines(args.path / "test.txt"), args.seed)}
    print(f"{result['dataset']}: {result['users']} users; mean over users of (mean test item id - mean train item id)")
    print(f"  {'split':<16} {'mean':>8} {'SE':>6} {'users with test ids above train':>32}")
    for name, key in (("test.txt", "test"), ("random re-split", "random_resplit")):
        s = result[key]
        print(f"  {name:<16} {s['mean']:8.1f} {s['se']:6.1f} {s['share_positive']:32.3f}")
    print(f"  difference: z = {result['z']:.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = write_json_atomic(result, RESULTS / f"split_shift_{result['dataset']}.json")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
