"""Benchmark: per-rank peak memory of a row-wise sharded job on 1, 2 and 4 ranks (scale-out).

    python benchmarks/scale_out.py [--users 16000000] [--items 1000000] [--interactions 20000000]
                                   [--worlds 1,2,4] [--dim 96] [--tiny-dim 4] [--steps 200] [--stack-dim 16]
                                   [--out benchmarks/results] [--keep DIR]

One synthetic dataset is prepared first, into a temporary directory (or --keep DIR)::

    python -m recsys.prepare data=synthetic data.num_users=U data.num_items=I data.num_interactions=N
        data.loader=stream data.root=ROOT

then, for each world size W of --worlds and each table width D (--dim, the real tables, and
--tiny-dim, tables small enough to be noise, on the same data), the job::

    python -m torch.distributed.run --standalone --nproc_per_node=W -m recsys.train <the data overrides>
        model=mf model.embedding_dim=D train.max_steps=200 train.batch_size=4096 loss.num_negatives=1024
        train.sharding_types=[row_wise] eval.max_users=5000 model.stack_spectral_dim=16
        model.stack_spectral_weights=[1.0] export.enabled=true export.faiss=none log.plots=false hydra.run.dir=RUN

with OMP_NUM_THREADS=1 when W > 1; its output goes to RUN.log. The streamed loader (what a dataset
of this size is for): each rank reads its share of the row groups, the evaluation sets and the
training pairs of its own users (the closed form), nothing of the whole dataset.

Each rank of the job writes RUN/memory/rank-RRRRR.json (recsys/memory.py): its exact peak RSS in
each phase, its share of the tables (weights + optimizer state) and all ranks' together. Per rank:

- peak = the largest phase peak (and that phase), for the real and for the tiny tables;
- excess = peak(real) - peak(tiny) of the same rank: the memory that grows with the tables;
- ratio = excess / the real run's table bytes (all ranks together).

Row-wise sharding leaves 1/W of every table on each rank, so the ratio should fall like 1/W; a rank
that holds or gathers a whole table stays >= 1. Target: at the largest world size every rank's
ratio <= 0.35. Per phase, the largest ratio over ranks of (phase peak real - phase peak tiny) shows
which phase grows with the table. Also recorded: each job's wall time and final test recall@20.
Prints markdown tables; writes scale_out.json, scale_out.md and scale_out.png under --out. Exit
code 0 when the target is met, 1 when not, 2 when a command fails or a memory report is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, NoReturn, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.atomic import write_atomic, write_json_atomic, write_text_atomic  # noqa: E402

TARGET = 0.35
MB = 2**20


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def shown(cmd: List[str]) -> str:
    return "python " + " ".join(cmd[1:])


def run_logged(cmd: List[str], log: Path, env: Optional[Dict[str, str]] = None) -> float:
    """Run `cmd` in the repository, its output into `log`; its wall time. A failure ends the script
    with the log's tail."""
    print(f"running: {shown(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        fail(f"exit code {rc} after {wall:.0f} s: {shown(cmd)}\n{tail}\n(the whole log: {log})")
    return wall


def train_command(args: argparse.Namespace, data: List[str], world: int, dim: int, run_dir: Path) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
            "-m", "recsys.train", *data, "model=mf", f"model.embedding_dim={dim}", f"train.max_steps={args.steps}",
            "train.batch_size=4096", "loss.num_negatives=1024", "train.sharding_types=[row_wise]",
            "eval.max_users=5000", f"model.stack_spectral_dim={args.stack_dim}", "model.stack_spectral_weights=[1.0]",
            "export.enabled=true", "export.faiss=none", "log.plots=false", f"hydra.run.dir={run_dir}"]


def read_reports(run_dir: Path, world: int) -> List[dict]:
    """The job's memory reports, one per rank, checked."""
    reports = []
    for rank in range(world):
        path = run_dir / "memory" / f"rank-{rank:05d}.json"
        if not path.exists():
            fail(f"{path} is missing: recsys.train writes one memory report per rank (recsys/memory.py), "
                 f"RUN_DIR/memory/rank-RRRRR.json")
        report = json.loads(path.read_text())
        if report.get("rank") != rank or report.get("world") != world:
            fail(f"{path} says rank {report.get('rank')} of {report.get('world')}, expected rank {rank} of {world}")
        if not report["phases"] or any(p["peak_rss_bytes"] is None for p in report["phases"]):
            fail(f"{path} has no phase or a phase without its peak RSS: {report['phases']}")
        reports.append(report)
    return reports


def run_job(args: argparse.Namespace, data: List[str], tmp: Path, world: int, dim: int, keep: bool) -> dict:
    run_dir = tmp / f"world{world}-dim{dim}"
    cmd = train_command(args, data, world, dim, run_dir)
    wall = run_logged(cmd, tmp / f"{run_dir.name}.log", {"OMP_NUM_THREADS": "1"} if world > 1 else None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = {"world": world, "dim": dim, "command": shown(cmd), "wall_s": round(wall, 1),
              "recall@20": metrics["test"]["recall@20"], "ranks": read_reports(run_dir, world)}
    print(f"W={world} D={dim}: {wall:.0f} s, recall@20 {record['recall@20']:.4f}", flush=True)
    if not keep:  # checkpoint and exported vectors: several GB each at full scale
        shutil.rmtree(run_dir)
    return record


def peak(report: dict) -> dict:
    """The rank's largest phase peak."""
    return max(report["phases"], key=lambda p: p["peak_rss_bytes"])


def compare(real: dict, tiny: dict) -> dict:
    """Per rank, the peaks of the real and tiny tables and the excess; per phase, the largest ratio."""
    ranks, phases = [], {}
    for r, t in zip(real["ranks"], tiny["ranks"]):
        table = r["total_table_bytes"]
        top_real, top_tiny = peak(r), peak(t)
        excess = top_real["peak_rss_bytes"] - top_tiny["peak_rss_bytes"]
        ranks.append({"rank": r["rank"], "peak_real_bytes": top_real["peak_rss_bytes"], "peak_phase": top_real["phase"],
                      "peak_tiny_bytes": top_tiny["peak_rss_bytes"], "excess_bytes": excess,
                      "local_table_bytes": r["local_table_bytes"], "total_table_bytes": table,
                      "ratio": round(excess / table, 4)})
        tiny_phases = {p["phase"]: p["peak_rss_bytes"] for p in t["phases"]}
        for p in r["phases"]:
            if p["phase"] in tiny_phases:
                ratio = (p["peak_rss_bytes"] - tiny_phases[p["phase"]]) / table
                phases[p["phase"]] = round(max(ratio, phases.get(p["phase"], ratio)), 4)
    return {"world": real["world"], "ranks": ranks, "phase_ratios": phases}


def job(result: dict, world: int, dim: int) -> dict:
    return next(j for j in result["jobs"] if j["world"] == world and j["dim"] == dim)


def tables(result: dict) -> str:
    c_last = result["comparisons"][-1]
    lines = [f"Per-rank peak RSS of `torchrun --nproc_per_node=W -m recsys.train` (row-wise tables, "
             f"{result['users']:,} users x {result['items']:,} items, {result['interactions']:,} interactions, "
             f"{result['steps']} steps; real tables dim {result['dim']}, tiny dim {result['tiny_dim']}; "
             f"{result['cpus']} CPU cores). Table bytes: weights + optimizer state of the real tables, all ranks.", "",
             "| world | rank | peak RSS real (MB) | phase of peak | peak RSS tiny (MB) | excess (MB) | "
             "local table (MB) | all tables (MB) | excess / table bytes | target |",
             "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in result["comparisons"]:
        for r in c["ranks"]:
            verdict = ("pass" if r["ratio"] <= TARGET else "FAIL") if c is c_last else "-"
            lines.append(f"| {c['world']} | {r['rank']} | {r['peak_real_bytes'] / MB:,.0f} | {r['peak_phase']} | "
                         f"{r['peak_tiny_bytes'] / MB:,.0f} | {r['excess_bytes'] / MB:,.0f} | "
                         f"{r['local_table_bytes'] / MB:,.0f} | {r['total_table_bytes'] / MB:,.0f} | "
                         f"{r['ratio']:.3f} | {verdict} |")
    phases = list(dict.fromkeys(p for c in result["comparisons"] for p in c["phase_ratios"]))
    lines += ["", "Largest ratio over ranks of (phase peak real - phase peak tiny) / table bytes, by phase:", "",
              "| phase | " + " | ".join(f"{c['world']} rank(s)" for c in result["comparisons"]) + " |",
              "| --- |" + " ---: |" * len(result["comparisons"])]
    for name in phases:
        cells = [f"{c['phase_ratios'][name]:.3f}" if name in c["phase_ratios"] else "-" for c in result["comparisons"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| world | dim | wall (s) | test recall@20 |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {j['world']} | {j['dim']} | {j['wall_s']:.0f} | {j['recall@20']:.4f} |" for j in result["jobs"]]
    inexact = [f"{j['world']} rank(s), dim {j['dim']}" for j in result["jobs"] if not all(
        r.get("exact", True) for r in j["ranks"])]
    if inexact:
        lines += ["", "Not exact (VmHWM could not be reset: each phase's peak is the peak so far): " + "; ".join(inexact)]
    lines += ["", f"Target: at {c_last['world']} rank(s) every rank's excess / table bytes <= {TARGET}: "
                  f"{'met' if result['pass'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Per world size: peak RSS per phase and rank (bars: real tables; black ticks: tiny tables) and,
    dashed, each rank's tiny-table peak + TARGET x table bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [c["world"] for c in result["comparisons"]]
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4.8), sharey=True, squeeze=False)
    for ax, w in zip(axes[0], worlds):
        real, tiny = job(result, w, result["dim"]), job(result, w, result["tiny_dim"])
        phases = [p["phase"] for p in real["ranks"][0]["phases"]]
        width = 0.8 / w
        for i, (r, t) in enumerate(zip(real["ranks"], tiny["ranks"])):
            x = [k - 0.4 + width * (i + 0.5) for k in range(len(phases))]
            real_mb = {p["phase"]: p["peak_rss_bytes"] / MB for p in r["phases"]}
            tiny_mb = {p["phase"]: p["peak_rss_bytes"] / MB for p in t["phases"]}
            ax.bar(x, [real_mb[p] for p in phases], width, color=f"C{i}", label=f"rank {r['rank']}")
            ax.scatter(x, [tiny_mb.get(p, float("nan")) for p in phases], marker="_", s=300 * width, color="black",
                       label="tiny tables" if i == 0 else None, zorder=3)
            ax.axhline(max(tiny_mb.values()) + TARGET * r["total_table_bytes"] / MB, color=f"C{i}", ls="--", lw=1)
        ax.set_xticks(range(len(phases)))
        ax.set_xticklabels(phases, rotation=30, ha="right")
        ax.set_title(f"{w} rank(s): tables {real['ranks'][0]['total_table_bytes'] / MB:,.0f} MB")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("peak RSS per rank (MB)")
    fig.suptitle(f"Peak RSS by phase, real tables (dim {result['dim']}) as bars, tiny (dim {result['tiny_dim']}) as "
                 f"black ticks; dashed: each rank's tiny peak + {TARGET} x table bytes (the target)", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=16_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--interactions", type=int, default=20_000_000)
    p.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes (ranks per job)")
    p.add_argument("--dim", type=int, default=96,
                   help="embedding dimension of the real tables (96: 4.2 GB of weights and optimizer state for "
                        "the ~10M users and ~0.9M items seen in the default data's training split)")
    p.add_argument("--tiny-dim", type=int, default=4, help="embedding dimension of the tiny tables (the baseline)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--stack-dim", type=int, default=16, help="model.stack_spectral_dim")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--keep", default=None, help="keep the dataset, run directories and logs under this directory")
    args = p.parse_args()
    worlds = sorted(int(w) for w in args.worlds.split(","))
    if args.tiny_dim >= args.dim:
        p.error(f"--tiny-dim ({args.tiny_dim}) must be smaller than --dim ({args.dim})")
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-out-", dir=args.keep))
    data = ["data=synthetic", f"data.num_users={args.users}", f"data.num_items={args.items}",
            f"data.num_interactions={args.interactions}", "data.loader=stream", f"data.root={tmp / 'data'}"]
    prepare = [sys.executable, "-m", "recsys.prepare", *data]
    result = {"users": args.users, "items": args.items, "interactions": args.interactions, "steps": args.steps,
              "dim": args.dim, "tiny_dim": args.tiny_dim, "stack_dim": args.stack_dim, "cpus": os.cpu_count(),
              "target": TARGET, "prepare": {"command": shown(prepare),
                                            "wall_s": round(run_logged(prepare, tmp / "prepare.log"), 1)}}
    result["jobs"] = [run_job(args, data, tmp, w, d, keep=bool(args.keep))
                      for w in worlds for d in (args.dim, args.tiny_dim)]
    result["comparisons"] = [compare(job(result, w, args.dim), job(result, w, args.tiny_dim)) for w in worlds]
    over = [r for r in result["comparisons"][-1]["ranks"] if r["ratio"] > TARGET]
    result["pass"] = not over
    md = tables(result)
    print("\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result, out / "scale_out.json")
    write_text_atomic(md + "\n![per-rank peak RSS by phase](scale_out.png)\n", out / "scale_out.md")
    plot(result, out / "scale_out.png")
    print(f"written: {out}/scale_out.json, scale_out.md, scale_out.png")
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    if over:
        print(f"target not met: at {worlds[-1]} rank(s), rank(s) " + ", ".join(
            f"{r['rank']} ({r['ratio']:.3f}, peak in {r['peak_phase']})" for r in over)
              + f" keep more than {TARGET} x the table bytes beyond the tiny tables' peak", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
