"""CUDA against CPU, the same model side by side in one process (a stage of the GPU kit, kit.py).

    python benchmarks/gpu/parity.py --device cuda --out parity.json
    python benchmarks/gpu/parity.py --device cpu                     # dry run: the CPU against itself

One process, one rank, a process group with gloo for CPU tensors and NCCL for CUDA tensors, so the
project's sharded model (planner, DistributedModelParallel, RowWiseAdagrad fused into the
backward, FBGEMM's kernels) is built twice, on the CPU and on `--device`, from the same
initialisation, and fed the same batches of a small synthetic dataset. Checks, each printed with
its figure and tolerance:

- **steps**: the loss of 5 training steps, and the tables after them (fp32): the kernels sum in
  another order, so they agree to float32 rounding, not bit for bit;
- **fp16 tables**: the same with ``optim.stochastic_rounding=false`` (CUDA rounds to nearest like the
  CPU: a few fp16 units in the last place), and the difference with it on (reported only);
- **evaluator**: Recall/NDCG@20 of the two models given the same weights (the device's tables
  copied into the CPU model), by the project's exact full-ranking evaluator on each device;
- **checkpoint**: the device's model with a best-epoch snapshot saved by DCP, loaded into a fresh
  model on the device (tables, snapshot and optimizer state bit for bit) and into a CPU model
  (tables bit for bit).

Exit code 1 when a check fails; the JSON holds every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from recsys.config import DataConfig, EvalConfig  # noqa: E402
from recsys.data.batches import BatchOptions, TrainBatches  # noqa: E402
from recsys.data.features import FeatureSpec  # noqa: E402
from recsys.data.prepare import prepare  # noqa: E402
from recsys.data.source import open_source  # noqa: E402
from recsys.evaluation.metrics import evaluate_model  # noqa: E402
from recsys.model import RetrievalTask, TwoTower  # noqa: E402
from recsys.parallelize import gather_tables, init_tables, shard_model, snapshot_weights  # noqa: E402
from recsys.spectral import load_tables  # noqa: E402
from recsys.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

for message in (".*deprecating ShardedTensor.*", ".*TopologyFactory.*"):
    warnings.filterwarnings("ignore", message=message)
logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)

DIM, BATCH, NEGATIVES, LR, STEPS = 64, 1024, 512, 0.3, 5
FP16_ULP = 2.0**-10  # fp16's unit in the last place, relative


class Checks:
    def __init__(self) -> None:
        self.rows: List[Dict] = []

    def add(self, key: str, name: str, figure: float, tolerance: float, report_only: bool = False) -> None:
        ok = True if report_only else bool(figure <= tolerance)
        self.rows.append({"key": key, "check": name, "figure": float(figure),
                          "tolerance": None if report_only else tolerance, "ok": ok})
        bound = "(reported)" if report_only else f"<= {tolerance:.3g}"
        print(f"{'ok  ' if ok else 'FAIL'} {key}: {name}: {figure:.3g} {bound}", flush=True)


def build(num_users: int, num_items: int, device: torch.device, dtype: str = "fp32", rounding: bool = True):
    task = RetrievalTask(TwoTower(num_users, num_items, DIM, normalize=True, table_dtype=dtype), "sampled_softmax",
                         0.2, True)
    dmp, optimizer, _ = shard_model(task, device, "rowwise_adagrad", LR, 1e-8, 1e-3, [], BATCH, rounding)
    init_tables(dmp, 0.1, 0)
    return dmp, optimizer


def train_steps(dmp, optimizer, batches, device: torch.device) -> List[float]:
    losses = []
    for batch in batches:
        loss, _ = dmp(batch.to(device))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None, help="JSON of the checks")
    args = p.parse_args()
    t0 = time.perf_counter()
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    cpu = torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    checks = Checks()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = prepare(DataConfig(root=tmp, num_users=4000, num_items=3000, num_interactions=120_000))
            data = open_source(data_dir, FeatureSpec(), "memory")
            nu, ni = data.num_users, data.num_items
            batches = list(data.batches(BatchOptions(BATCH, NEGATIVES, seed=0), epoch=0, max_batches=STEPS))

            # ---- steps, fp32
            on_device, opt_device = build(nu, ni, device)
            on_cpu, opt_cpu = build(nu, ni, cpu)
            loss_device = train_steps(on_device, opt_device, batches, device)
            loss_cpu = train_steps(on_cpu, opt_cpu, batches, cpu)
            checks.add("fp32_loss", "fp32 loss, 5 steps: max relative difference",
                       max(abs(a - b) / abs(b) for a, b in zip(loss_device, loss_cpu)), 1e-4)
            tables_device, tables_cpu = gather_tables(on_device), gather_tables(on_cpu)
            scale = max(float(t.abs().max()) for t in tables_cpu.values())
            checks.add("fp32_tables", "fp32 tables after 5 steps: max difference / max |weight|",
                       max_diff(tables_device, tables_cpu) / scale, 1e-4)

            # ---- fp16 tables: rounding to nearest on both, then stochastic on the device
            for rounding in (False, True):
                half_device, half_opt = build(nu, ni, device, "fp16", rounding)
                half_cpu, half_cpu_opt = build(nu, ni, cpu, "fp16", rounding)
                train_steps(half_device, half_opt, batches, device)
                train_steps(half_cpu, half_cpu_opt, batches, cpu)
                a, b = gather_tables(half_device), gather_tables(half_cpu)
                ulps = max_diff(a, b) / (FP16_ULP * max(float(t.abs().max()) for t in b.values()))
                checks.add(f"fp16_{'stochastic' if rounding else 'nearest'}",
                           f"fp16 tables after 5 steps, stochastic_rounding={str(rounding).lower()}: max difference in "
                           "units of the largest weight's last place", ulps, 8.0, report_only=rounding and cuda)

            # ---- the evaluator on each device, the same weights
            load_tables(on_cpu, {k: v.to(torch.float32) for k, v in tables_device.items()})
            sets = data.eval_sets(0)
            options = EvalConfig(ks=[20])
            on_device.eval()
            on_cpu.eval()
            m_device = evaluate_model(on_device.module.model, sets.test, [20], device, options)
            m_cpu = evaluate_model(on_cpu.module.model, sets.test, [20], cpu, options)
            print(f"     evaluator: {args.device} {m_device}, cpu {m_cpu}", flush=True)
            # near-ties may order differently on the two devices: a few users' top-20 at most
            for metric in ("recall@20", "ndcg@20"):
                checks.add(f"eval_{metric}", f"evaluator {metric}: |{args.device} - cpu|",
                           abs(m_device[metric] - m_cpu[metric]), 3.0 / m_cpu["users"])

            # ---- checkpoint: save on the device with a best-epoch snapshot, load on the device and on the CPU
            on_device.train()
            snapshot = snapshot_weights(on_device)
            written = save_checkpoint(Path(tmp) / "run", STEPS, on_device, opt_device, snapshot, {}, {}, 1)
            fresh, fresh_opt = build(nu, ni, device)
            _, best = load_checkpoint(Path(written["path"]), fresh, fresh_opt, load_best=True)
            checks.add("ckpt_tables", "checkpoint on the device: tables, max difference",
                       max_diff(gather_tables(fresh), tables_device), 0.0)
            checks.add("ckpt_best", "checkpoint on the device: best-epoch snapshot, max difference",
                       max(float((x.float() - y.float()).abs().max()) for x, y in zip(best, snapshot)), 0.0)
            state_a, state_b = opt_device.state_dict()["state"], fresh_opt.state_dict()["state"]
            diffs = [float((_local(state_a[k][s]) - _local(state_b[k][s])).abs().max())
                     for k in state_a for s in state_a[k] if torch.is_tensor(_local(state_a[k][s]))]
            checks.add("ckpt_optimizer", "checkpoint on the device: optimizer state, max difference",
                       max(diffs or [0.0]), 0.0)
            on_host, host_opt = build(nu, ni, cpu)
            load_checkpoint(Path(written["path"]), on_host, host_opt, load_best=False)
            checks.add("ckpt_to_cpu", f"checkpoint from {args.device} into a CPU model: tables, max difference",
                       max_diff(gather_tables(on_host), tables_device), 0.0)
    finally:
        dist.destroy_process_group()
    ok = all(r["ok"] for r in checks.rows)
    out = {"device": args.device, "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
           "torch": torch.__version__, "checks": checks.rows, "ok": ok, "seconds": round(time.perf_counter() - t0, 1)}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"parity: {sum(r['ok'] for r in checks.rows)}/{len(checks.rows)} checks passed in {out['seconds']} s",
          flush=True)
    sys.exit(0 if ok else 1)


def _local(value):
    """A tensor's local data (the fused optimizer's state is sharded like its table)."""
    if hasattr(value, "local_shards"):
        shards = value.local_shards()
        return shards[0].tensor.float() if shards else torch.zeros(1)
    if hasattr(value, "to_local"):
        return value.to_local().float()
    return value.float() if torch.is_tensor(value) else value


if __name__ == "__main__":
    main()
