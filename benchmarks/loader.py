"""Benchmark 1: the streaming loader alone against the trainer, on the same streamed data.

    python benchmarks/loader.py [--interactions 10000000] [--loader-steps 4000] [--train-steps 400]
                                [--rounds 2] [--root data] [--out benchmarks/results]

The data: the default synthetic config (20,000 users x 5,000 items) with
``data.num_interactions=N``, prepared for streaming (``data.loader=stream``, row groups of
``data.row_group_size``; prepared once under --root and reused).

- Loader alone: ``recsys.data.loader.StreamBatches`` for epoch 0 of one rank, the default train
  config's batch (1024 interactions + 256 uniform negatives), the default shuffle buffer, each
  batch built into the model's input (a ``Batch`` of KeyedJaggedTensors) as the trainer receives
  it, for 1 and 2 loader workers (and 0: read in the training process, for reference); time from
  the iterator's creation (worker start included) to the last of --loader-steps batches.
- Trainer: ``python -m recsys.train data.num_interactions=N data.loader=stream
  train.max_steps=S`` (the default config: mf, dim 64, sampled softmax, 1 loader worker; no export,
  plots or in-loop evaluation), its ``train.interactions_per_s`` from metrics.json (the loop's time,
  waiting for the loader included).

The machine is noisy (2 shared cores): measurements alternate in --rounds rounds and the table
gives each one's median (the lower middle one for an even number of rounds). Prints a markdown table; writes loader.json and loader.md under --out.
Target: loader >= 5x the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 5.0


def prepared(root: str, interactions: int) -> Path:
    from recsys.config import DataConfig
    from recsys.data.prepare import prepare

    t0 = time.perf_counter()
    path = prepare(DataConfig(num_interactions=interactions, loader="stream", root=root), progress=False)
    print(f"dataset {path} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return path


def loader_rate(path: Path, workers: int, steps: int) -> dict:
    """Interactions/s of StreamBatches alone (the default train/loss/data configs)."""
    from recsys.config import DataConfig, LossConfig, TrainConfig
    from recsys.data.batches import BatchOptions
    from recsys.data.loader import Pieces, StreamBatches

    data, loss, train = DataConfig(), LossConfig(), TrainConfig()
    num_items = json.loads((path / "manifest.json").read_text())["counts"]["num_items"]
    t0 = time.perf_counter()
    options = BatchOptions(train.batch_size, loss.num_negatives, 0, 0, 1, workers, data.shuffle_buffer)
    batches = StreamBatches(Pieces.read(path), num_items, options, 0, max_batches=steps)
    first, n = None, 0
    for batch in batches:
        n += 1
        if first is None:
            first = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    assert n == len(batches) and batch.user_ids.shape[0] == train.batch_size
    return {"interactions_per_s": n * train.batch_size / wall, "batches": n, "wall_s": wall, "first_batch_s": first}


def trainer_rate(root: str, interactions: int, steps: int) -> dict:
    """Interactions/s of the real training loop on the same prepared data (one process)."""
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        cmd = [sys.executable, "-m", "recsys.train", f"data.num_interactions={interactions}", "data.loader=stream",
               f"data.root={root}", f"train.max_steps={steps}", f"hydra.run.dir={tmp}/run", "train.progress=false",
               "export.enabled=false", "log.plots=false", "eval.popularity=false", "eval.test_every_epoch=false",
               "train.checkpoint_at_end=false", "train.checkpoint_every_steps=0"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        m = json.loads((Path(tmp) / "run" / "metrics.json").read_text())["train"]
    return {"interactions_per_s": m["interactions_per_s"], "steps": m["steps"], "wall_s": m["wall_s"],
            "command_s": time.perf_counter() - t0}


def table(result: dict) -> str:
    t = result["trainer"]["interactions_per_s"]
    lines = [f"Streaming loader vs trainer: synthetic {result['interactions']:,} interactions "
             f"({result['num_users']:,} users x {result['num_items']:,} items), batch {result['batch_size']} "
             f"+ {result['num_negatives']} negatives, {result['cpus']} CPU cores, median of {result['rounds']} rounds "
             "(the lower middle one for an even number)",
             "", "| what | interactions/s | x trainer | first batch (s) |", "| --- | ---: | ---: | ---: |"]
    for w in result["workers"]:
        r = result["loader"][str(w)]
        lines.append(f"| loader alone, {w} worker{'s' if w != 1 else ''}{' (in process)' if w == 0 else ''} "
                     f"| {r['interactions_per_s']:,.0f} | {r['interactions_per_s'] / t:.1f} | {r['first_batch_s']:.2f} |")
    lines.append(f"| trainer (mf, dim 64, 1 rank, 1 loader worker) | {t:,.0f} | 1.0 | |")
    lines += ["", f"Target: loader >= {TARGET:g}x the trainer with 1 and 2 workers: "
                  f"{'met' if result['pass'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interactions", type=int, default=10_000_000)
    p.add_argument("--loader-steps", type=int, default=4000, help="batches per loader measurement")
    p.add_argument("--train-steps", type=int, default=400, help="train.max_steps of the trainer measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--root", default=str(ROOT / "data"), help="data.root (the prepared dataset is reused)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from recsys.config import LossConfig, TrainConfig

    path = prepared(args.root, args.interactions)
    manifest = json.loads((path / "manifest.json").read_text())
    workers = (0, 1, 2)
    samples = {str(w): [] for w in workers}
    trainer = []
    for r in range(args.rounds):
        for w in workers:
            samples[str(w)].append(loader_rate(path, w, args.loader_steps))
            print(f"round {r}: loader, {w} workers: {samples[str(w)][-1]['interactions_per_s']:,.0f} interactions/s",
                  flush=True)
        trainer.append(trainer_rate(args.root, args.interactions, args.train_steps))
        print(f"round {r}: trainer: {trainer[-1]['interactions_per_s']:,.0f} interactions/s", flush=True)

    def median(runs: list) -> dict:
        i = int(np.argsort([x["interactions_per_s"] for x in runs])[(len(runs) - 1) // 2])
        return {**runs[i], "samples": [round(x["interactions_per_s"], 1) for x in runs]}

    loader = {w: median(s) for w, s in samples.items()}
    train = median(trainer)
    ratios = {w: loader[w]["interactions_per_s"] / train["interactions_per_s"] for w in loader}
    result = {
        "interactions": args.interactions, "num_users": manifest["counts"]["num_users"],
        "num_items": manifest["counts"]["num_items"], "train_interactions": manifest["counts"]["train_interactions"],
        "row_groups": manifest.get("train_row_groups"), "batch_size": TrainConfig().batch_size,
        "num_negatives": LossConfig().num_negatives, "cpus": os.cpu_count(), "rounds": args.rounds,
        "workers": list(workers), "loader": loader, "trainer": train,
        "ratio": {w: round(x, 2) for w, x in ratios.items()}, "target": TARGET,
        "pass": all(ratios[str(w)] >= TARGET for w in (1, 2)),
    }
    md = table(result)
    print("\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from recsys.atomic import write_json_atomic, write_text_atomic

    write_json_atomic(result, out / "loader.json")
    write_text_atomic(md, out / "loader.md")
    print(f"written: {out}/loader.json, loader.md")


if __name__ == "__main__":
    main()
