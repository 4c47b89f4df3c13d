"""Benchmark 4: training throughput of the sharded model against a plain PyTorch implementation of
the same model and loss, side by side in one run.

    python benchmarks/throughput.py                                # 1 process, CPU (gloo)
    python benchmarks/throughput.py --device cuda                  # 1 GPU (NCCL)
    python benchmarks/throughput.py --device cuda --dim 128 --batch-size 16384 --loss bpr  # the lookup-bound case
    torchrun --nproc_per_node 2 benchmarks/throughput.py           # 2 ranks (gloo on CPU, NCCL on GPUs)

Both train matrix factorisation (user and item id tables, cosine scores) with the project's loss,
``RetrievalTask`` over ``recsys.loss.sampled_softmax_loss`` (in-batch positives of every rank +
uniform negatives, logQ correction, accidental hits masked), on the same pre-built batches
(``recsys.data.batches.TrainBatches`` over the demo's synthetic dataset), same global batch, same
negatives, same initial weights:

- **ours**: the training path of ``recsys.train``: tables built on meta, planned by TorchRec's
  planner, ``DistributedModelParallel``, RowWiseAdagrad fused into the backward (FBGEMM table-batched
  embeddings), ``TrainPipelineSparseDist`` (input distribution of the next batch overlapped);
- **plain**: two ``nn.EmbeddingBag(mode="sum", sparse=True)`` tables on the device, replicated on
  every rank, ``torch.optim.Adagrad`` on their sparse gradients (the same work as RowWiseAdagrad
  per touched row, with an element-wise instead of a row-wise accumulator), a plain loop
  (``loss.backward(); optimizer.step()``); with several ranks the sparse gradients are averaged
  over ranks by an all-gather of (rows, values), as DDP does for sparse gradients.

The two are timed in alternating rounds (ours, plain, plain, ours, ...) after a warm-up, so
that the noise of a shared machine falls on both. The first step's loss of the two, from the same
weights and batch, is checked to agree (same model, same loss). Also printed: a memory-bandwidth
bound, the bytes a step must move per interaction (table rows read by the lookup, read and written
by the update, the row-wise state, the pooled gradient, and the logits of the loss written and read
forward and backward) over the device's copy bandwidth measured here with a large tensor copy.

Writes benchmarks/results/throughput.json (one entry per device / ranks / table type, merged
with the entries already there) and throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.atomic import write_atomic, write_json_atomic  # noqa: E402
from recsys.config import DataConfig  # noqa: E402
from recsys.data.batches import BatchOptions, TrainBatches  # noqa: E402
from recsys.data.dataset import Dataset  # noqa: E402
from recsys.data.features import Batch  # noqa: E402
from recsys.data.prepare import prepare  # noqa: E402
from recsys.distributed import rank_and_world  # noqa: E402
from recsys.loss import gather_rows  # noqa: E402
from recsys.model import RetrievalTask, TwoTower  # noqa: E402
from recsys.parallelize import (describe_plan, destroy_distributed, init_distributed, init_rows,  # noqa: E402
                                init_tables, shard_model)

for message in (".*deprecating ShardedTensor.*", ".*is_fx_tracing.*", ".*all_gather.* is deprecated.*"):
    warnings.filterwarnings("ignore", message=message)


class PlainMF(nn.Module):
    """Matrix factorisation in plain PyTorch: two ``nn.EmbeddingBag`` tables on the device, the
    tower interface ``RetrievalTask`` calls (``towers`` / ``finish``), so the loss code is the same."""

    def __init__(self, num_users: int, num_items: int, dim: int, normalize: bool, device: torch.device) -> None:
        super().__init__()
        self.normalize = normalize
        self.user = nn.EmbeddingBag(num_users, dim, mode="sum", sparse=True, device=device)
        self.item = nn.EmbeddingBag(num_items, dim, mode="sum", sparse=True, device=device)

    def finish(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v, dim=-1) if self.normalize else v

    def towers(self, batch: Batch):
        users, items = batch.user_ids, batch.item_ids  # single-hot bags: one row each
        return (self.user(users[:, None]), self.item(items[:, None]))


def average_sparse_gradients(params: List[torch.Tensor]) -> None:
    """Each rank's sparse gradient replaced by the mean over ranks (an all-gather of rows and values,
    what DDP does for sparse gradients); the gradient of the mean of the ranks' losses."""
    _, world = rank_and_world()
    if world == 1:
        return
    for p in params:
        g = p.grad.coalesce()
        rows, values = g.indices()[0], g.values()
        sizes = gather_rows(torch.tensor([rows.numel()], device=rows.device), differentiable=False).tolist()
        width = max(sizes)
        pad_rows = torch.zeros(width, dtype=rows.dtype, device=rows.device)
        pad_values = torch.zeros(width, values.shape[1], dtype=values.dtype, device=values.device)
        pad_rows[: len(rows)], pad_values[: len(rows)] = rows, values
        all_rows = gather_rows(pad_rows, differentiable=False)
        all_values = gather_rows(pad_values, differentiable=False)
        keep = torch.cat([torch.arange(width, device=rows.device) < n for n in sizes])
        p.grad = torch.sparse_coo_tensor(all_rows[keep][None], all_values[keep] / world, p.shape).coalesce()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy on `device` (bytes read + bytes written)."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bytes_per_interaction(dim: int, weight_bytes: int, local_batch: int, local_negatives: int, world: int,
                          state_bytes_per_row: float, loss: str = "sampled_softmax") -> Dict[str, float]:
    """The least memory traffic of one training interaction (one row of the local batch).

    Table rows per interaction: its user, its positive item and a share of the uniform negatives.
    Per row: the lookup reads it, the update reads and writes it (weight_bytes per value), reads the
    pooled gradient (fp32) and reads and writes the optimizer state. The loss: the row's logits over
    the world's candidates (W*B + W*N, fp32) are written by the forward product, read by the
    softmax, written as a gradient and read by the backward product. BPR has no logits matrix: its
    cost is the vectors of the rows (counted with the tables). ``tables`` alone is the lookup bound's."""
    rows = 2 + local_negatives / local_batch
    per_row = 3 * dim * weight_bytes + 4 * dim + 2 * state_bytes_per_row
    candidates = world * (local_batch + local_negatives)
    tables = rows * per_row
    loss = 4 * candidates * 4 if loss == "sampled_softmax" else 0.0
    return {"tables": tables, "loss": loss, "total": tables + loss}


def first_loss(task: nn.Module, batch: Batch, device: torch.device) -> float:
    with torch.no_grad():
        loss, _ = task(batch.to(device))
    losses = [None] * rank_and_world()[1]
    dist.all_gather_object(losses, float(loss))
    return float(np.mean(losses))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--num-users", type=int, default=20_000, help="synthetic users (the demo's)")
    p.add_argument("--num-items", type=int, default=5_000)
    p.add_argument("--num-interactions", type=int, default=500_000)
    p.add_argument("--data-root", default=str(ROOT / "data"), help="prepared datasets (reused)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1024, help="global batch (all ranks)")
    p.add_argument("--num-negatives", type=int, default=256, help="uniform negatives per step (all ranks)")
    p.add_argument("--table-dtype", default="fp32", choices=["fp32", "fp16"], help="ours: table storage type")
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--loss", default="sampled_softmax", choices=["sampled_softmax", "bpr"],
                   help="sampled_softmax: the logits of all ranks' candidates (B x (B + N) per rank, usually the "
                        "larger cost at GPU batch sizes); bpr: one negative per row (the tables' traffic dominates)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of each implementation first")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds; each runs both implementations")
    p.add_argument("--steps", type=int, default=30, help="steps per implementation per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    info = init_distributed(args.device)
    rank, world, device = info.rank, info.world_size, info.device
    torch.manual_seed(0)
    try:
        # ---- the same data for both: the demo's synthetic dataset, batches built once
        data_dir = [None]
        if rank == 0:
            data_dir[0] = str(prepare(DataConfig(root=args.data_root, num_users=args.num_users,
                                                 num_items=args.num_items, num_interactions=args.num_interactions)))
        dist.broadcast_object_list(data_dir, src=0)
        dataset = Dataset.load(Path(data_dir[0]))
        users, items = dataset.fit_pairs()
        counts = dataset.item_counts(include_valid=False)
        log_prob = torch.from_numpy(np.log(np.maximum(counts, 1) / counts.sum())).float().to(device)
        num_batches = 64
        options = BatchOptions(args.batch_size, args.num_negatives, 0, rank, world)
        batches = list(TrainBatches(users, items, dataset.num_items, options, 0, max_batches=num_batches))
        if len(batches) < num_batches:
            raise SystemExit(f"error: only {len(batches)} batches of {args.batch_size} in the dataset")
        if device.type == "cuda":  # page-locked: the host-to-device copies of both run asynchronously
            batches = [batch.pin_memory() for batch in batches]
        b, n = args.batch_size // world, args.num_negatives // world

        def loss_module(model: nn.Module) -> RetrievalTask:  # the project's loss, configured as the demo's
            return RetrievalTask(model, args.loss, 0.2, True, log_prob, 0.0, 0.0)

        # ---- ours: planner, DMP, fused RowWiseAdagrad, TrainPipelineSparseDist
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        ours_task = loss_module(TwoTower(dataset.num_users, dataset.num_items, args.dim, True,
                                         table_dtype=args.table_dtype))
        dmp, optimizer, plan = shard_model(ours_task, device, "rowwise_adagrad", args.lr, 1e-8, 1e-3, [], b)
        init_tables(dmp, 0.1, 0)
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
        if rank == 0:
            print(describe_plan(plan), flush=True)

        # ---- plain: nn.EmbeddingBag tables (replicated), sparse gradients, torch.optim.Adagrad
        plain = PlainMF(dataset.num_users, dataset.num_items, args.dim, True, device)
        with torch.no_grad():  # the same initial weights (rounded as ours stores them)
            for index, table in enumerate((plain.item, plain.user)):  # init_tables numbers tables by name
                rows = init_rows(index, 0, table.weight.shape[0], args.dim, 0.1, 0)
                table.weight.copy_(rows.half().float() if args.table_dtype == "fp16" else rows)
        plain_task = loss_module(plain)
        plain_params = [plain.user.weight, plain.item.weight]
        plain_optimizer = torch.optim.Adagrad(plain_params, lr=args.lr, eps=1e-8)

        dmp.eval()
        check = {"ours": first_loss(dmp, batches[0], device), "plain": first_loss(plain_task, batches[0], device)}
        dmp.train()
        if abs(check["ours"] - check["plain"]) > 1e-4 * abs(check["plain"]):
            raise SystemExit(f"error: the two implementations disagree on the first loss: {check}")

        def run_ours(steps: int, start: int) -> float:
            it = iter([batches[(start + i) % num_batches] for i in range(steps)])
            last = None
            while True:
                try:
                    (last,) = pipeline.progress(it)
                except StopIteration:
                    break
            return float(last)  # waits for the step to finish

        def run_plain(steps: int, start: int) -> float:
            loss = None
            for i in range(steps):
                batch = batches[(start + i) % num_batches].to(device, non_blocking=True)
                loss, _ = plain_task(batch)
                plain_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_sparse_gradients(plain_params)
                plain_optimizer.step()
            return float(loss.detach())

        runners = {"ours": run_ours, "plain": run_plain}
        for name, fn in runners.items():
            fn(args.warmup, 0)
        seconds = {name: 0.0 for name in runners}
        rounds = {name: [] for name in runners}  # rank 0's seconds per round: the noise of the machine
        losses = {name: [] for name in runners}
        for r in range(args.rounds):
            order = ["ours", "plain"] if r % 2 == 0 else ["plain", "ours"]
            for name in order:
                dist.barrier()
                sync(device)
                t0 = time.perf_counter()
                losses[name].append(runners[name](args.steps, args.warmup + r * args.steps))
                sync(device)
                seconds[name] += time.perf_counter() - t0
                rounds[name].append(round(time.perf_counter() - t0, 4))
        dist.barrier()
        elapsed = torch.tensor([seconds["ours"], seconds["plain"]], dtype=torch.float64, device=device)
        if world > 1:  # the slowest rank sets the pace
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds = dict(zip(("ours", "plain"), elapsed.cpu().tolist()))
        final = torch.tensor([losses["ours"][-1], losses["plain"][-1]], dtype=torch.float64, device=device)
        if world > 1:  # the loss of the global batch: the mean of the ranks' losses
            dist.all_reduce(final)
        final = dict(zip(("ours", "plain"), (final / world).cpu().tolist()))
        steps = args.rounds * args.steps
        rate = {name: steps * args.batch_size / s for name, s in seconds.items()}

        dist.barrier()  # every rank measures at once: ranks sharing a memory bus get their share
        bandwidth = copy_bandwidth(device, 1024 if device.type == "cuda" else 512)
        weight_bytes = 2 if args.table_dtype == "fp16" else 4
        traffic = {"ours": bytes_per_interaction(args.dim, weight_bytes, b, n, world, 4, args.loss),
                   "plain": bytes_per_interaction(args.dim, 4, b, n, world, 4 * args.dim, args.loss)}
        bound = {name: bandwidth / t["total"] * world for name, t in traffic.items()}  # every rank moves its share
        lookup_bound = {name: bandwidth / t["tables"] * world for name, t in traffic.items()}

        if rank == 0:
            threads = torch.get_num_threads()
            label = (f"{device.type}-{world}rank{'s' if world > 1 else ''}-{args.table_dtype}"
                     + (f"-dim{args.dim}-batch{args.batch_size}" if device.type == "cuda" else "")
                     + ("" if args.loss == "sampled_softmax" else f"-{args.loss}")
                     + (f"-{threads}thread{'s' if threads > 1 else ''}" if device.type == "cpu" else ""))
            entry = {
                "label": label,
                "device": device.type,
                "device_name": device_name(device),
                "cpu_count": os.cpu_count(),
                "threads": threads,
                "world_size": world,
                "torch": torch.__version__,
                "config": {"num_users": dataset.num_users, "num_items": dataset.num_items, "dim": args.dim,
                           "global_batch": args.batch_size, "num_negatives": args.num_negatives,
                           "table_dtype_ours": args.table_dtype, "lr": args.lr, "warmup": args.warmup,
                           "rounds": args.rounds, "steps_per_round": args.steps,
                           "loss": ("sampled_softmax T=0.2, logQ, accidental hits masked" if args.loss ==
                                    "sampled_softmax" else "bpr T=0.2, one uniform negative per row"),
                           "ours": "DMP + planner, fused RowWiseAdagrad (FBGEMM TBE), TrainPipelineSparseDist",
                           "plain": "nn.EmbeddingBag(sparse=True) x2, torch.optim.Adagrad on sparse gradients"},
                "first_loss": check,
                "final_loss": final,
                "seconds": seconds,
                "round_seconds": rounds,
                "interactions_per_s": rate,
                "ratio_ours_over_plain": rate["ours"] / rate["plain"],
                "copy_bandwidth_gb_s": bandwidth / 1e9,
                "bytes_per_interaction": traffic,
                "bandwidth_bound_interactions_per_s": bound,
                "share_of_bound": {name: rate[name] / bound[name] for name in rate},
                "lookup_bound_interactions_per_s": lookup_bound,
                "share_of_lookup_bound": {name: rate[name] / lookup_bound[name] for name in rate},
                "plan": describe_plan(plan),
            }
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            path = out / "throughput.json"
            results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
            results["runs"][label] = entry
            write_json_atomic(results, path)
            table = markdown(results)
            write_atomic(out / "throughput.md", lambda tmp: tmp.write_text(table))
            print(report(entry), "", table, f"results: {path}, {out / 'throughput.md'}", sep="\n", flush=True)
    finally:
        destroy_distributed()


def report(e: Dict) -> str:
    r, c = e["interactions_per_s"], e["config"]
    t = e["bytes_per_interaction"]["ours"]
    return "\n".join([
        f"{e['label']}: batch {c['global_batch']}, {c['num_negatives']} negatives, dim {c['dim']}, "
        f"{c['num_users']:,} users x {c['num_items']:,} items; first loss ours {e['first_loss']['ours']:.6f} "
        f"plain {e['first_loss']['plain']:.6f}",
        f"  ours  {r['ours']:>12,.0f} interactions/s",
        f"  plain {r['plain']:>12,.0f} interactions/s",
        f"  ratio ours / plain: {e['ratio_ours_over_plain']:.2f}",
        f"memory-bandwidth bound: {t['total']:,.0f} bytes per interaction (tables {t['tables']:,.0f}, "
        f"loss logits {t['loss']:,.0f}) / copy bandwidth {e['copy_bandwidth_gb_s']:.1f} GB/s per rank = "
        f"{e['bandwidth_bound_interactions_per_s']['ours']:,.0f} interactions/s; ours reaches "
        f"{100 * e['share_of_bound']['ours']:.1f}% of it"
        + (f"; of the lookup bound (tables only, {e['lookup_bound_interactions_per_s']['ours']:,.0f}/s): "
           f"{100 * e['share_of_lookup_bound']['ours']:.1f}%" if "share_of_lookup_bound" in e else "")])


def markdown(results: Dict) -> str:
    lines = ["# Training throughput: ours vs plain PyTorch (benchmark 4)", "",
             "Same model (MF, cosine), same loss (`RetrievalTask` / `sampled_softmax_loss`: in-batch + uniform "
             "negatives, logQ, accidental hits masked), same pre-built batches, same initial weights, timed in "
             "alternating rounds in one run. **ours**: planner + DistributedModelParallel, RowWiseAdagrad fused "
             "into the backward (FBGEMM), TrainPipelineSparseDist. **plain**: `nn.EmbeddingBag(sparse=True)` "
             "tables, `torch.optim.Adagrad` on the sparse gradients (sparse all-gather across ranks).", "",
             "| run | device | batch | negatives | dim | tables (ours) | ours (interactions/s) | plain "
             "(interactions/s) | ours / plain | bytes / interaction | copy GB/s | bound (interactions/s) "
             "| ours / bound | ours / lookup bound |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, e in sorted(results["runs"].items()):
        c, r = e["config"], e["interactions_per_s"]
        lines.append(f"| {label} | {e['device_name']} ({e['threads']} thread(s)) | {c['global_batch']} | "
                     f"{c['num_negatives']} | {c['dim']} | {c['table_dtype_ours']} | {r['ours']:,.0f} | "
                     f"{r['plain']:,.0f} | {e['ratio_ours_over_plain']:.2f} | "
                     f"{e['bytes_per_interaction']['ours']['total']:,.0f} | {e['copy_bandwidth_gb_s']:.1f} | "
                     f"{e['bandwidth_bound_interactions_per_s']['ours']:,.0f} | "
                     f"{100 * e['share_of_bound']['ours']:.1f}% | "
                     + (f"{100 * e['share_of_lookup_bound']['ours']:.1f}% |" if "share_of_lookup_bound" in e else "- |"))
    lines += ["", "Bytes per interaction: the table rows one interaction touches (user, positive, its share of "
              "the negatives), each read by the lookup, read and written by the update, plus the pooled "
              "gradient and the row-wise state; and the interaction's logits row (all ranks' candidates, fp32) "
              "written and read forward and backward. The bound is the measured copy bandwidth (bytes read + "
              "written by a large tensor copy) divided by that, times the ranks. The lookup bound counts the table "
              "rows' traffic alone (what the embedding kernels must move; the loss's logits left out).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
