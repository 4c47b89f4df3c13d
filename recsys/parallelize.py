"""Parallelism: process group, planner, sharders, DistributedModelParallel and fused optimizers.

Model code stays single-device; everything that knows about ranks and devices lives here.
The same calls run on CPU with gloo (tests, laptops) and on CUDA with NCCL (clusters).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import Stats
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.loss import rank_and_world

logger = logging.getLogger(__name__)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


# Topology() is the constructor every TorchRec release has (TopologyFactory is recent): mute its nag.
logging.getLogger("torchrec.distributed.planner.types").addFilter(_DropMessages("TopologyFactory"))


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job (env://), or make a 1-rank group for a plain `python -m` run.

    NCCL on CUDA, gloo on CPU; the device is cuda:LOCAL_RANK, never a hard-coded index."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # without it gloo sometimes aborts at exit
        dist.destroy_process_group()


class EmbeddingBagSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EBC sharder, offering row-wise sharding on CPU too, and no data_parallel.

    TorchRec refuses row_wise on CPU only because of an old gloo check; row-wise sharded
    tables train identically to the unsharded reference on gloo (tests/test_distributed.py).
    data_parallel is withheld: with the optimizer fused into the backward, replicated tables
    do not match the unsharded reference after one step (measured on 2 gloo ranks), so
    replicas could drift apart."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = [t for t in super().sharding_types(compute_device_type) if t != ShardingType.DATA_PARALLEL.value]
        if compute_device_type == "cpu":
            types += [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types


def table_optimizer(name: str):
    """The fused in-backward optimizer class for the tables (RowWiseAdagrad runs on CPU and GPU)."""
    return {"rowwise_adagrad": RowWiseAdagrad, "sgd": torch.optim.SGD}[name]


def embedding_modules(model: nn.Module) -> List[EmbeddingBagCollection]:
    return [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]


def fuse_table_optimizer(model: nn.Module, optim_name: str, lr: float, eps: float) -> None:
    """Fuse the table optimizer into the backward of every EmbeddingBagCollection of `model`
    (before planning: the planner then sees the fused kernels and their optimizer state)."""
    kwargs = {"lr": lr, "eps": eps} if optim_name == "rowwise_adagrad" else {"lr": lr}
    for ebc in embedding_modules(model):
        apply_optimizer_in_backward(table_optimizer(optim_name), ebc.parameters(), kwargs)


def plan_sharding(model: nn.Module, world_size: int, device_type: str, sharding_types: List[str],
                  pg: Optional[dist.ProcessGroup] = None, batch_size: int = 512,
                  local_world_size: Optional[int] = None, hbm_cap: Optional[int] = None,
                  ddr_cap: Optional[int] = None, stats: Optional[List[Stats]] = None) -> ShardingPlan:
    """Run TorchRec's planner (collectively when `pg` is given, so all ranks agree).

    `local_world_size` defaults to $LOCAL_WORLD_SIZE (else `world_size`); `hbm_cap` / `ddr_cap`
    (bytes per device / host) to TorchRec's defaults; `stats` to TorchRec's EmbeddingStats.
    The dry run (recsys.plan) sets them to plan a cluster from one process."""
    constraints: Dict[str, ParameterConstraints] = {}
    if sharding_types:
        for ebc in embedding_modules(model):
            for table in ebc.embedding_bag_configs():
                constraints[table.name] = ParameterConstraints(sharding_types=list(sharding_types))
    local_world = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device_type, local_world_size=local_world,
                          hbm_cap=hbm_cap, ddr_cap=ddr_cap),
        constraints=constraints or None,
        batch_size=batch_size,
        storage_reservation=FixedPercentageStorageReservation(0.15),
        stats=stats,
    )
    sharders = [EmbeddingBagSharder()]
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


def shard_model(
    model: nn.Module,
    device: torch.device,
    optim_name: str,
    lr: float,
    eps: float,
    dense_lr: float,
    sharding_types: List[str],
    local_batch_size: int = 512,
) -> tuple[DistributedModelParallel, torch.optim.Optimizer, ShardingPlan]:
    """Fuse the table optimizer into the backward, plan, and shard `model` (built on meta).

    Returns the DMP module, the optimizer the train pipeline steps (fused table optimizer +
    Adam for dense parameters, if any) and the sharding plan."""
    fuse_table_optimizer(model, optim_name, lr, eps)
    plan = plan_sharding(model, dist.get_world_size(), device.type, sharding_types, dist.group.WORLD,
                         local_batch_size)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=[EmbeddingBagSharder()])
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizers = [dmp.fused_optimizer]
    if dense:
        optimizers.append(KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adam(params, lr=dense_lr)))
    return dmp, CombinedOptimizer(optimizers), plan


def describe_plan(plan: ShardingPlan) -> str:
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            ranks = sorted({r for r in (ps.ranks or [])})
            shards = ""
            if ps.sharding_spec is not None:
                shards = " shards=" + ", ".join(
                    f"rank{s.placement.rank()}:rows{s.shard_offsets[0]}+{s.shard_sizes[0]}"
                    f"/cols{s.shard_offsets[1]}+{s.shard_sizes[1]}" for s in ps.sharding_spec.shards)
            lines.append(f"  {module_path}.{table}: {ps.sharding_type} kernel={ps.compute_kernel} ranks={ranks}{shards}")
    return "sharding plan:\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Initialisation that does not depend on the sharding
# ---------------------------------------------------------------------------------------------

_INIT_BLOCK = 8192


def init_rows(table_index: int, row_start: int, num_rows: int, dim: int, std: float, seed: int) -> torch.Tensor:
    """Rows [row_start, row_start + num_rows) of a table's N(0, std^2) initialisation.

    Rows are generated in fixed blocks seeded by (seed, table, block), so any shard of any
    sharding gets the same values as the full table: 1-rank and N-rank runs start identical."""
    out = torch.empty(num_rows, dim)
    first, last = row_start // _INIT_BLOCK, (row_start + num_rows - 1) // _INIT_BLOCK
    for block in range(first, last + 1):
        g = torch.Generator().manual_seed(hash((seed, table_index, block)) & 0x7FFF_FFFF_FFFF_FFFF)
        values = torch.randn(_INIT_BLOCK, dim, generator=g) * std
        lo = max(row_start, block * _INIT_BLOCK)
        hi = min(row_start + num_rows, (block + 1) * _INIT_BLOCK)
        out[lo - row_start : hi - row_start] = values[lo - block * _INIT_BLOCK : hi - block * _INIT_BLOCK]
    return out


def table_weights(model: nn.Module) -> Dict[str, object]:
    """The embedding table weights of a (sharded or plain) model's state dict, by table name."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "embedding_bags" and parts[-1] == "weight":
            out[parts[-2]] = value
    return out


@torch.no_grad()
def init_tables(model: nn.Module, std: float, seed: int) -> None:
    """Fill every table (full tensor or local shards) with its sharding-independent init."""
    for index, (name, weight) in enumerate(sorted(table_weights(model).items())):
        if isinstance(weight, ShardedTensor):
            for shard in weight.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                dim = weight.size(1)
                rows = init_rows(index, r0, nr, dim, std, seed)
                shard.tensor.copy_(rows[:, c0 : c0 + nc])
        else:
            weight.copy_(init_rows(index, 0, weight.shape[0], weight.shape[1], std, seed))


@torch.no_grad()
def gather_tables(model: nn.Module, dst: int = 0) -> Dict[str, torch.Tensor]:
    """Full (unsharded) copies of every embedding table on rank `dst` (empty dict elsewhere).

    Collective: every rank must call it."""
    rank, _ = rank_and_world()
    out: Dict[str, torch.Tensor] = {}
    for name, weight in sorted(table_weights(model).items()):
        if isinstance(weight, ShardedTensor):
            full = torch.empty(weight.size(), dtype=weight.dtype) if rank == dst else None
            weight.gather(dst=dst, out=full)
        else:
            full = weight.detach().cpu().clone()
        if rank == dst:
            out[name] = full.cpu()
    return out


def _local_tensors(model: nn.Module) -> List[torch.Tensor]:
    """This rank's storage of every state-dict entry (local shards of sharded tables)."""
    out: List[torch.Tensor] = []
    for _, value in sorted(model.state_dict().items()):
        if isinstance(value, ShardedTensor):
            out.extend(shard.tensor for shard in value.local_shards())
        elif isinstance(value, DTensor):
            out.append(value.to_local())
        elif torch.is_tensor(value):
            out.append(value)
    return out


@torch.no_grad()
def snapshot_weights(model: nn.Module) -> List[torch.Tensor]:
    """A local copy of this rank's weights (the best epoch so far); no communication."""
    return [t.detach().clone() for t in _local_tensors(model)]


@torch.no_grad()
def restore_weights(model: nn.Module, snapshot: List[torch.Tensor]) -> None:
    """Write a `snapshot_weights` copy back in place (same model, same sharding)."""
    tensors = _local_tensors(model)
    if len(tensors) != len(snapshot):
        raise ValueError("restore_weights: the snapshot does not match the model")
    for t, s in zip(tensors, snapshot):
        t.copy_(s)
