"""Benchmark 2: peak memory of a short training run on 10M vs 100M synthetic interactions.

    python benchmarks/memory.py [--sizes 10000000,100000000] [--steps 200] [--interval 0.2]
                                [--out benchmarks/results] [--keep DIR]

Each size runs the plain command, as a subprocess::

    python -m recsys.train data=synthetic data.num_interactions=N train.max_steps=200

with ``data.root`` and ``hydra.run.dir`` in a fresh temporary directory, so dataset generation and
preparation are part of the measurement; the id spaces are the default ones (20,000 users x
5,000 items) for both sizes. Every --interval seconds the whole process tree (the command and
its descendants: loader workers) is sampled:

- RSS: resident memory of each process, summed (psutil when installed, else /proc/PID/statm).
  Pages shared by forked workers with their parent are counted once per process.
- PSS: proportional set size from /proc/PID/smaps_rollup (each shared page divided among the
  processes sharing it), summed: the tree's actual footprint.

The command's log lines are timestamped as they arrive, so the peak of each phase is reported
too (generation, the two prepare passes, model, evaluation sets, training, the final evaluation
and export): the place to look when the ratio grows. Prints a markdown table; writes memory.json
and memory.md under --out. Target: peak(100M) / peak(10M) <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.3
PAGE = os.sysconf("SC_PAGE_SIZE")

# (phase, the log line that starts it); a phase ends where the next one found starts.
PHASES = [
    ("start + generate", None),
    ("prepare pass 1 (vocabulary)", re.compile(r"generated \d+ synthetic interactions")),
    ("prepare pass 2 (encode)", re.compile(r"pass 1: \d+ rows")),
    ("open data + model", re.compile(r"prepared dataset|reusing prepared dataset")),
    ("evaluation sets", re.compile(r"world size \d+, device")),
    ("training", re.compile(r"\d+ steps of \d+ interactions")),
    ("final evaluation + export", re.compile(r"epoch \d+: \d+ steps, loss")),
    ("report + plots", re.compile(r"recall@10\s+ndcg@10")),
]

try:
    import psutil
except ImportError:  # the /proc fallback
    psutil = None


def tree(pid: int) -> List[int]:
    """`pid` and all its descendants."""
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            return [pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_bytes(pid: int) -> int:
    try:
        if psutil is not None:
            return psutil.Process(pid).memory_info().rss
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except Exception:  # the process ended between listing and reading
        return 0


def pss_bytes(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def run_sampled(cmd: List[str], interval: float, log_path: Path) -> dict:
    """Run `cmd`, sampling its process tree's memory; returns the samples and the timed log lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: List[Tuple[float, str]] = []

    def read() -> None:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))
                log.write(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples = []  # (t, rss tree, pss tree or None, processes, rss of the main process)
    while proc.poll() is None:
        pids = tree(proc.pid)
        rss = [rss_bytes(p) for p in pids]
        pss = [pss_bytes(p) for p in pids]
        samples.append((time.perf_counter() - t0, sum(rss), None if None in pss else sum(pss), len(pids),
                        rss[0] if rss else 0))
        time.sleep(interval)
    reader.join()
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0, "samples": samples, "lines": lines}


def phases(samples: list, lines: list, wall: float) -> Dict[str, dict]:
    """Peak RSS / PSS of the tree in each phase (by the log line that starts it)."""
    starts = [(PHASES[0][0], 0.0)]
    for name, pattern in PHASES[1:]:
        hit = next((t for t, line in lines if pattern.search(line) and t >= starts[-1][1]), None)
        if hit is not None:
            starts.append((name, hit))
    out = {}
    for i, (name, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else wall
        inside = [s for s in samples if start <= s[0] < end]
        out[name] = {"start_s": round(start, 1), "end_s": round(end, 1),
                     "peak_rss_mb": round(max((s[1] for s in inside), default=0) / 2**20, 1),
                     "peak_pss_mb": round(max((s[2] or 0 for s in inside), default=0) / 2**20, 1)}
    return out


def measure(n: int, steps: int, interval: float, keep: Optional[Path]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-memory-{n}-", dir=keep))
    cmd = [sys.executable, "-m", "recsys.train", "data=synthetic", f"data.num_interactions={n}",
           f"train.max_steps={steps}", f"data.root={tmp / 'data'}", f"hydra.run.dir={tmp / 'run'}"]
    print(f"running: {' '.join(cmd[1:])}", flush=True)
    r = run_sampled(cmd, interval, tmp / "log.txt")
    if r["returncode"] != 0:
        tail = "\n".join(line for _, line in r["lines"][-40:])
        raise SystemExit(f"the command failed ({r['returncode']}):\n{tail}")
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    s = r["samples"]
    peak = max(s, key=lambda x: x[1])
    pss = [x[2] for x in s if x[2] is not None]
    result = {
        "num_interactions": n, "command": "python " + " ".join(cmd[1:]), "wall_s": round(r["wall_s"], 1),
        "peak_rss_tree_mb": round(peak[1] / 2**20, 1), "peak_rss_at_s": round(peak[0], 1),
        "peak_pss_tree_mb": round(max(pss) / 2**20, 1) if pss else None,
        "peak_rss_main_mb": round(max(x[4] for x in s) / 2**20, 1), "max_processes": max(x[3] for x in s),
        "samples": len(s), "phases": phases(s, r["lines"], r["wall_s"]),
        "loader": metrics["data"].get("loader", "stream" if "eval_users" in metrics["data"] else "memory"),
        "train_interactions": metrics["data"]["train_interactions"], "steps": metrics["train"]["steps"],
        "test_recall@20": metrics["test"]["recall@20"], "test_users": metrics["test"]["users"],
        "timeline": [(round(t, 1), round(rss / 2**20), None if p is None else round(p / 2**20)) for t, rss, p, _, _ in s],
    }
    if keep is None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        result["dir"] = str(tmp)
    return result


def compact_json(result: dict) -> str:
    """Indented JSON with each innermost list (a timeline sample) on one line."""
    text = json.dumps(result, indent=1)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def table(result: dict) -> str:
    runs = result["runs"]
    lines = [f"Peak memory of `python -m recsys.train data=synthetic data.num_interactions=N train.max_steps="
             f"{result['steps']}` (generation included; whole process tree, sampled every {result['interval']} s; "
             f"{result['cpus']} CPU cores)", "",
             "| interactions | wall (s) | peak RSS tree (MB) | peak PSS tree (MB) | peak RSS main (MB) | processes |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        lines.append(f"| {r['num_interactions']:,} | {r['wall_s']:.0f} | {r['peak_rss_tree_mb']:,.0f} | "
                     f"{r['peak_pss_tree_mb'] or 0:,.0f} | {r['peak_rss_main_mb']:,.0f} | {r['max_processes']} |")
    lines += ["", "Peak RSS of the tree by phase (MB):", "",
              "| phase | " + " | ".join(f"{r['num_interactions']:,}" for r in runs) + " |",
              "| --- |" + " ---: |" * len(runs)]
    names = [name for name, _ in PHASES if any(name in r["phases"] for r in runs)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['phases'][name]['peak_rss_mb']:,.0f}" if name in r["phases"]
                                                  else "-" for r in runs) + " |")
    if "ratio" in result:
        ratio = result["ratio"]
        lines += ["", f"Ratio {runs[-1]['num_interactions']:,} / {runs[0]['num_interactions']:,}: RSS "
                      f"{ratio['rss']:.2f}, PSS {ratio['pss']:.2f} (target <= {TARGET}: "
                      f"{'met' if result['pass'] else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000000,100000000", help="comma-separated data.num_interactions")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--keep", default=None, help="keep each run's data, run directory and log under this directory")
    args = p.parse_args()
    keep = Path(args.keep) if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in (int(x) for x in args.sizes.split(",")):
        runs.append(measure(n, args.steps, args.interval, keep))
        r = runs[-1]
        print(f"{n:,}: peak RSS tree {r['peak_rss_tree_mb']:,.0f} MB, PSS {r['peak_pss_tree_mb'] or 0:,.0f} MB, "
              f"{r['wall_s']:.0f} s", flush=True)
    result = {"steps": args.steps, "interval": args.interval, "cpus": os.cpu_count(),
              "sampler": "psutil" if psutil is not None else "/proc", "runs": runs, "target": TARGET}
    if len(runs) > 1:
        first, last = runs[0], runs[-1]
        result["ratio"] = {"rss": round(last["peak_rss_tree_mb"] / first["peak_rss_tree_mb"], 3),
                           "pss": round((last["peak_pss_tree_mb"] or 0) / max(first["peak_pss_tree_mb"] or 0, 1e-9), 3)}
        result["pass"] = result["ratio"]["rss"] <= TARGET and (first["peak_pss_tree_mb"] is None
                                                               or result["ratio"]["pss"] <= TARGET)
    md = table(result)
    print("\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from recsys.atomic import write_text_atomic

    write_text_atomic(compact_json(result), out / "memory.json")
    write_text_atomic(md, out / "memory.md")
    print(f"written: {out}/memory.json, memory.md")


if __name__ == "__main__":
    main()
