"""Preparation speed and memory: DuckDB (this code) vs the previous preparation, side by side in one run.

    python benchmarks/prepare.py [--sizes 10000000 100000000] [--baseline 2972d45] [--spark-rows 10000000]

Inputs: the synthetic event log written as Parquet (``recsys.data.synthetic.generate_stream``,
users = rows / 10, items = rows / 100), prepared as a ``data=parquet`` source; and the LightGCN
Gowalla files from ``../shared/data/gowalla`` when present. Each preparation runs in a fresh
process (peak RSS: ``ru_maxrss`` of the process plus the peak of its live children, e.g. Spark's JVM):

- ``duckdb``: this code, ``data.engine_threads`` 0 (all cores) and 1 (at the smallest size), and
  with ``data.engine_memory=1GB`` at 100M rows (it spills beyond);
- ``previous stream``: the previous code's two-pass streaming preparation (``data.loader=stream``:
  pair-hashed split, repeats kept; what ``data.loader=auto`` ran at these sizes), from a git
  worktree of ``--baseline``;
- ``previous memory``: the previous in-memory preparation (per-user holdout, repeats dropped: the
  meaning DuckDB now has at every size), at the smallest size only (it holds the whole log: 2.1 GB
  at 10M rows, so about 20 GB at 100M, which this 24 GB machine cannot be trusted to survive);
- ``spark local[2]``: this code on Spark, at ``--spark-rows`` (for clusters: a reference figure).

Writes benchmarks/results/prepare.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
GOWALLA = ROOT.parent / "shared" / "data" / "gowalla"

RUN = r"""
import json, resource, sys, time, logging
from recsys.config import DataConfig
from recsys.data.prepare import prepare
kw = json.loads(sys.argv[1])
engine = kw.pop("_engine", None)
runner = None
if engine == "spark":
    from recsys.data.spark_engine import local_session, spark_runner
    runner = spark_runner(local_session(2, "6g"))
t = time.perf_counter()
out = prepare(DataConfig(**kw), progress=False, **({"engine": runner} if runner else {}))
dt = time.perf_counter() - t
m = json.loads((out / "manifest.json").read_text())
import os
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for pid in os.listdir("/proc"):  # live children (Spark's JVM): their own peaks, added
    try:
        if pid.isdigit() and int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid():
            peak += int(next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
print("RESULT", json.dumps({"seconds": dt, "peak_mb": peak / 1024, "rows": m["counts"]["raw_interactions"],
                            "train": m["counts"]["train_interactions"], "test": m["counts"]["test_interactions"]}))
"""


def run(pythonpath: Path, kw: dict, label: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(kw)], env=env, capture_output=True, text=True,
                          cwd=pythonpath)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{kw}: failed\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][7:])
    result["rows_per_s"] = result["rows"] / result["seconds"]
    print(f"  {label}: {result['seconds']:.1f} s, {result['rows_per_s']:,.0f} rows/s, "
          f"peak {result['peak_mb']:,.0f} MB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--baseline", default="2972d45", help="git revision of the previous preparation")
    parser.add_argument("--spark-rows", type=int, default=10_000_000)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from recsys.data.synthetic import generate_stream

    work = Path(args.work or tempfile.mkdtemp(prefix="recsys-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    baseline = work / "baseline"
    if not baseline.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline], check=True,
                       capture_output=True)
    rows = []
    try:
        inputs = []
        for n in args.sizes:
            raw = work / f"raw-{n}"
            if not raw.exists():
                generate_stream(raw, max(n // 10, 100), max(n // 100, 10), n, 16, 1.0, 3.0, 0, progress=False)
            inputs.append((f"synthetic {n:,}", n, raw))
        if GOWALLA.is_dir():
            inputs.append(("gowalla (LightGCN files)", None, GOWALLA))
        for label, n, raw in inputs:
            print(label, flush=True)
            gowalla = n is None
            base = (dict(name="lightgcn", path=str(raw), split="given") if gowalla else
                    dict(name="parquet", path=str(raw), timestamp_column="timestamp", num_users=0, num_items=0))
            plans = [("duckdb (all cores)", ROOT, dict(engine_threads=0)),
                     ("duckdb (1 thread)", ROOT, dict(engine_threads=1))]
            if not gowalla:
                plans.append(("previous stream", baseline, dict(loader="stream")))
            if gowalla or n == min(args.sizes):
                plans.append(("previous memory", baseline, dict(loader="memory")))
            if n and n != min(args.sizes):
                plans = [p for p in plans if p[0] != "duckdb (1 thread)"]
            if not gowalla and n == args.spark_rows:
                plans.append(("spark local[2]", ROOT, dict(_engine="spark")))
            if n and n >= 100_000_000:
                plans = [p for p in plans if p[0] != "duckdb (1 thread)"]
                plans.insert(1, ("duckdb (engine_memory=1GB)", ROOT, dict(engine_threads=0, engine_memory="1GB")))
            for name, code, extra in plans:
                root = work / "prepared" / name.split()[0]
                shutil.rmtree(root, ignore_errors=True)
                result = run(code, {**base, **extra, "root": str(root)}, name)
                rows.append({"input": label, "what": name, **result})
                shutil.rmtree(root, ignore_errors=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], capture_output=True)
    for r in rows:
        ref = next((x for x in rows if x["input"] == r["input"] and x["what"] == "previous stream"), None) or \
            next((x for x in rows if x["input"] == r["input"] and x["what"] == "previous memory"), None)
        r["x_previous"] = r["rows_per_s"] / ref["rows_per_s"] if ref else None
        r["memory_x_previous"] = r["peak_mb"] / ref["peak_mb"] if ref else None
    lines = ["Preparation: rows/s and peak RSS, 2 CPU cores, one run (each preparation in a fresh process). "
             "'x previous': rows/s over the previous streaming preparation (the in-memory one where there is no "
             "streaming run); 'mem x': peak RSS over it.", "",
             "| input | what | seconds | rows/s | x previous | peak RSS (MB) | mem x |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['input']} | {r['what']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | "
                     f"{r['x_previous']:.2f} | {r['peak_mb']:,.0f} | {r['memory_x_previous']:.2f} |")
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prepare.md").write_text(text + "\n")
    (OUT / "prepare.json").write_text(json.dumps({"rows": rows, "sizes": args.sizes, "baseline": args.baseline,
                                                  "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
