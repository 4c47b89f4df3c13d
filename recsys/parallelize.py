"""Parallelism: process group, planner, sharders, DistributedModelParallel and fused optimizers.

Model code stays single-device; everything that knows about ranks and devices lives here.
The same calls run on CPU with gloo (tests, laptops) and on CUDA with NCCL (clusters).
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn as nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import ShardingOption, Stats, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.distributed import rank_and_world
from recsys.errors import DeviceError, PlanError
from recsys.logs import quiet_libraries

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


class _AnyGloo(type(dist.ProcessGroupGloo)):
    """Every gloo backend is an instance: torch fetches its backends back as the base class, and its
    own isinstance(..., ProcessGroupGloo) checks see SerialGloo once it replaces that name."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, dist.ProcessGroupGloo)


class SerialGloo(dist.ProcessGroupGloo, metaclass=_AnyGloo):
    """ProcessGroupGloo with one worker thread instead of gloo's two.

    torch 2.13's gloo corrupts the heap when async collectives of one group run on its two
    worker threads at the same time (an all-to-all next to all-gathers, as the train pipeline's
    input dist overlaps the loss's gathers): 1 in ~10 two-rank training runs died by SIGABRT
    ("malloc(): unaligned tcache chunk detected") or SIGSEGV inside gloo, and a few thousand steps
    of plain concurrent torch collectives crash most runs. One thread runs a group's collectives
    in the order every rank issues them. Devices follow GLOO_SOCKET_IFNAME as torch's own do."""

    def __init__(self, store, rank: int, size: int, timeout=datetime.timedelta(minutes=30)) -> None:
        if isinstance(timeout, dist.ProcessGroupGloo._Options):
            options = timeout
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            interfaces = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
            options._devices = ([dist.ProcessGroupGloo.create_device(interface=i) for i in interfaces]
                                or [dist.ProcessGroupGloo.create_default_device()])
        options._threads = 1
        super().__init__(store, rank, size, options)


def use_serial_gloo() -> None:
    """Every gloo group made from now on (the default one, TorchRec's node groups) is a SerialGloo."""
    c10d.ProcessGroupGloo = SerialGloo


def cuda_unavailable_reason() -> Optional[str]:
    """None when this process can use CUDA; else why not, in words (with torch's own warning, e.g.
    a driver too old for the CUDA build, when it gives one)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    detail = "; ".join(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip())
    return (f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no usable GPU"
            + (f" with CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
            + (f": {detail}" if detail else ""))


def gpu_present() -> bool:
    """Whether this machine has NVIDIA GPUs (their device files), whether or not torch can use them."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def select_device(device: str, local_rank: int) -> torch.device:
    """The device of this rank for ``train.device`` (`device`): ``cpu``; ``cuda`` (cuda:LOCAL_RANK,
    a ``DeviceError`` naming the reason when CUDA cannot start or there are fewer GPUs than local
    ranks: a GPU job never runs on the CPU by surprise); ``auto`` (CUDA when usable, else the CPU,
    with a warning when the machine has GPUs that torch cannot use). The GPU launchers pass
    ``train.device=cuda``."""
    if device == "cpu":
        return torch.device("cpu")
    reason = cuda_unavailable_reason()
    if reason is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DeviceError(f"train.device={device}: local rank {local_rank} but {count} GPU(s) visible: start "
                              "one rank per GPU (torchrun --nproc_per_node), or pass train.device=cpu")
        return torch.device("cuda", local_rank)
    if device == "cuda":
        raise DeviceError(f"train.device=cuda: {reason}")
    if gpu_present():
        logger.warning("train.device=auto runs on the CPU: this machine has NVIDIA GPUs but %s "
                       "(train.device=cuda makes this an error)", reason)
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_minutes: Optional[float] = None) -> DistInfo:
    """Join the torchrun job (env://), or make a 1-rank group for a plain `python -m` run.

    NCCL on CUDA, gloo on CPU; the device is cuda:LOCAL_RANK (``select_device``), never a
    hard-coded index. `timeout_minutes`: how long a collective may wait (the other ranks wait
    while rank 0 prepares the dataset); None: torch's default (10 minutes with NCCL, 30 with gloo)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = select_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = "nccl" if use_cuda else "gloo"
    if backend == "gloo":
        use_serial_gloo()  # the heap corruption it avoids is gloo's; NCCL jobs keep torch's classes
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
            dist.init_process_group(backend=backend, device_id=dev if use_cuda else None, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    quiet_libraries(dist.get_rank())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()  # without it gloo sometimes aborts at exit
        dist.destroy_process_group()


class EmbeddingBagSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EBC sharder, offering row-wise sharding on CPU too, and only the sharding types
    and kernels whose in-place writes and optimizer this project has checked.

    TorchRec refuses row_wise on CPU only because of an old gloo check; row-wise sharded
    tables train identically to the unsharded reference on gloo (tests/test_distributed.py).
    Withheld: data_parallel (with the optimizer fused into the backward, replicated tables do
    not match the unsharded reference after one step, measured on 2 gloo ranks, so replicas
    could drift apart); grid_shard (CUDA only, never compared with the reference); on CUDA the
    kernels other than ``fused`` (HBM) and ``fused_uvm`` (rows in host memory read over UVM):
    ``fused_uvm_caching`` keeps a cache of rows in HBM that the in-place writes of
    ``init_tables``, ``init_spectral`` and ``restore_weights`` would bypass (the cache would keep
    serving the old rows), and the key-value / SSD kernels keep rows in another store.

    `stochastic_rounding`: how FBGEMM's CUDA kernels round fp16 table updates (its default: on; the
    CPU kernels round to nearest). Off, CUDA and CPU updates agree to fp16 rounding."""

    def __init__(self, stochastic_rounding: bool = True) -> None:
        super().__init__(fused_params={"stochastic_rounding": stochastic_rounding})

    def sharding_types(self, compute_device_type: str) -> List[str]:
        withheld = (ShardingType.DATA_PARALLEL.value, ShardingType.GRID_SHARD.value)
        types = [t for t in super().sharding_types(compute_device_type) if t not in withheld]
        if compute_device_type == "cpu":
            types += [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        if compute_device_type == "cuda":
            kernels = [k for k in kernels if k in (EmbeddingComputeKernel.FUSED.value,
                                                   EmbeddingComputeKernel.FUSED_UVM.value)]
        return kernels


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


@dataclass
class ShardPlacement:
    rank: int
    row_offset: int
    rows: int
    col_offset: int
    cols: int
    hbm_bytes: int
    """The planner's estimate of the shard's device memory: weights, optimizer state, lookup buffers."""
    ddr_bytes: int
    """Its estimate of host memory (CPU tables, UVM-offloaded tables on CUDA)."""


@dataclass
class TablePlacement:
    name: str
    """The table's path in the model, as in the sharding plan (``model.user_ebc.user``)."""
    rows: int
    dim: int
    dtype: str
    """Storage type of the weights: ``fp32`` or ``fp16``."""
    sharding_type: str
    compute_kernel: str
    shards: List[ShardPlacement]

    @property
    def ranks(self) -> List[int]:
        return sorted({s.rank for s in self.shards})

    @property
    def weight_bytes(self) -> int:
        return self.rows * self.dim * (2 if self.dtype == "fp16" else 4)


@dataclass
class RankMemory:
    rank: int
    shards: int
    hbm_bytes: int
    ddr_bytes: int


@dataclass
class Placement:
    """The planner's answer: where every shard goes, what each rank holds, against what capacity."""

    world_size: int
    local_world_size: int
    device: str
    hbm_per_rank: int
    """Device memory per rank (bytes) given to the planner."""
    ddr_per_rank: int
    usable_hbm_per_rank: int
    """What the planner may fill with table shards (device memory less its reservation)."""
    usable_ddr_per_rank: int
    tables: List[TablePlacement]
    ranks: List[RankMemory]


@dataclass
class PlacedPlan(ShardingPlan):
    """TorchRec's ShardingPlan (what DistributedModelParallel takes) with the planner's placement
    and memory estimates, for ``describe_plan``."""

    placement: Optional[Placement] = None


class PlanRecorder(Stats):
    """A planner ``Stats`` hook: keeps the sharding options of the chosen plan (the planner's last
    proposal when it fails), with its storage estimate of every shard, and the capacities."""

    def __init__(self) -> None:
        self.best_plan: List[ShardingOption] = []
        self.topology: Optional[Topology] = None
        self.usable: Optional[Topology] = None

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans,
            run_time, best_plan, *args, **kwargs) -> None:
        self.best_plan = list(best_plan)
        self.topology = topology
        self.usable = storage_reservation.last_reserved_topology

    def placement(self, local_world_size: int) -> Placement:
        tables = []
        for so in sorted(self.best_plan, key=lambda so: so.fqn):
            shards = [ShardPlacement(s.rank, s.offset[0], s.size[0], s.offset[1], s.size[1], s.storage.hbm,
                                     s.storage.ddr) for s in so.shards]
            dtype = "fp16" if so.tensor.dtype == torch.float16 else "fp32"
            tables.append(TablePlacement(so.fqn, so.tensor.shape[0], so.tensor.shape[1], dtype, so.sharding_type,
                                         so.compute_kernel, shards))
        world = len(self.topology.devices)
        ranks = [RankMemory(r, 0, 0, 0) for r in range(world)]
        for t in tables:
            for s in t.shards:
                ranks[s.rank].shards += 1
                ranks[s.rank].hbm_bytes += s.hbm_bytes
                ranks[s.rank].ddr_bytes += s.ddr_bytes
        device, usable = self.topology.devices[0].storage, self.usable.devices[0].storage
        return Placement(world, local_world_size, self.topology.compute_device, device.hbm, device.ddr, usable.hbm,
                         usable.ddr, tables, ranks)


def plan_sharding(model: nn.Module, world_size: int, device_type: str, sharding_types: List[str],
                  pg: Optional[dist.ProcessGroup] = None, batch_size: int = 512,
                  local_world_size: Optional[int] = None, hbm_cap: Optional[int] = None,
                  ddr_cap: Optional[int] = None, stats: Optional[List[Stats]] = None,
                  recorder: Optional[PlanRecorder] = None,
                  sharder: Optional[EmbeddingBagSharder] = None) -> PlacedPlan:
    """Run TorchRec's planner (collectively when `pg` is given, so all ranks agree).

    `local_world_size` defaults to $LOCAL_WORLD_SIZE (else `world_size`); `hbm_cap` / `ddr_cap`
    (bytes per device / host) to TorchRec's defaults (32 GiB of HBM per GPU, 128 GiB of host
    memory per rank); `stats`: more planner statistics hooks (TorchRec's EmbeddingStats table);
    `recorder` keeps the planner's proposals (also when it fails). The dry run (recsys.plan) sets
    them to plan a cluster from one process.

    A table larger than one rank's memory is split: row-wise (rows over the ranks of the job, or
    of a node with table_row_wise; CPU too, see EmbeddingBagSharder) or column-wise (TorchRec
    cuts column shards of at least 128 columns, so only wider tables; each column shard keeps
    its own RowWiseAdagrad state, unlike the unsharded table). `sharding_types` restricts the
    planner's choice (e.g. [row_wise] for huge tables on GPU)."""
    constraints: Dict[str, ParameterConstraints] = {}
    if sharding_types:
        for ebc in embedding_modules(model):
            for table in ebc.embedding_bag_configs():
                constraints[table.name] = ParameterConstraints(sharding_types=list(sharding_types))
    local_world = min(local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), world_size)
    recorder = recorder or PlanRecorder()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device_type, local_world_size=local_world,
                          hbm_cap=hbm_cap, ddr_cap=ddr_cap),
        constraints=constraints or None,
        batch_size=batch_size,
        storage_reservation=FixedPercentageStorageReservation(0.15),
        stats=[*(stats or []), recorder],
    )
    sharders = [sharder or EmbeddingBagSharder()]
    if pg is None:
        plan = planner.plan(model, sharders)
        placement = recorder.placement(local_world)
    else:  # rank 0 plans; every rank gets its plan and placement
        plan = planner.collective_plan(model, sharders, pg)
        holder = [recorder.placement(local_world) if dist.get_rank(pg) == 0 else None]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(pg, 0), group=pg)
        placement = holder[0]
    return PlacedPlan(plan.plan, placement)


def shard_model(
    model: nn.Module,
    device: torch.device,
    optim_name: str,
    lr: float,
    eps: float,
    dense_lr: float,
    sharding_types: List[str],
    local_batch_size: int = 512,
    stochastic_rounding: bool = True,
    reserved_device_bytes: int = 0,
) -> tuple[DistributedModelParallel, torch.optim.Optimizer, PlacedPlan]:
    """Fuse the table optimizer into the backward, plan, and shard `model` (built on meta).

    Returns the DMP module, the optimizer the train pipeline steps (fused table optimizer +
    Adam for dense parameters, if any) and the sharding plan (with the planner's placement).
    `stochastic_rounding`: of fp16 table updates on CUDA (``EmbeddingBagSharder``);
    `reserved_device_bytes`: GPU memory per rank the run needs besides the tables and their
    lookups (the evaluation's item vectors and score blocks), kept out of the planner's reach."""
    fuse_table_optimizer(model, optim_name, lr, eps)
    # On GPUs the planner gets the device's memory (TorchRec assumes 32 GiB) less what the rest of
    # the run needs: an 80 GiB GPU holds what fits in the rest less the planner's reservation
    # before a table has to be split.
    hbm_cap = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if reserved_device_bytes >= total // 2:
            raise PlanError(f"the evaluation's item vectors and score blocks need {format_bytes(reserved_device_bytes)} "
                            f"of each GPU's {format_bytes(total)}: too little is left for the tables (fewer items, a "
                            "smaller model.embedding_dim or eval.score_budget_mb)")
        hbm_cap = total - reserved_device_bytes
    sharder = EmbeddingBagSharder(stochastic_rounding)
    plan = plan_sharding(model, dist.get_world_size(), device.type, sharding_types, dist.group.WORLD,
                         local_batch_size, hbm_cap=hbm_cap, sharder=sharder)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=[sharder])
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizers = [dmp.fused_optimizer]
    if dense:
        optimizers.append(KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adam(params, lr=dense_lr)))
    return dmp, CombinedOptimizer(optimizers), plan


GIB, MIB = 1024**3, 1024**2


def format_bytes(n: float) -> str:
    if n == 0:
        return "0"
    for name, size in (("GiB", GIB), ("MiB", MIB)):
        if n >= size:
            return f"{n / size:.3f} {name}"
    return f"{n / 1024:.3f} KiB"


def _shard_shapes(t: TablePlacement) -> str:
    """``8 shards of 125,000 x 64`` (equal shards) or ``2,500 x 64 + 2,499 x 64``."""
    shapes = [f"{s.rows:,} x {s.cols}" for s in sorted(t.shards, key=lambda s: (s.row_offset, s.col_offset))]
    if len(set(shapes)) == 1:
        return f"{len(shapes)} shards of {shapes[0]}" if len(shapes) > 1 else f"1 shard of {shapes[0]}"
    return " + ".join(shapes) if len(shapes) <= 4 else f"{len(shapes)} shards ({shapes[0]} ... {shapes[-1]})"


def describe_plan(plan: ShardingPlan) -> str:
    """The sharding plan as a table (printed at the start of training and by the dry run): per
    table its sharding type, kernel, ranks, size, storage type and shards; with the planner's
    placement (``PlacedPlan``), also the estimated memory of every rank (consecutive ranks with
    the same figures on one line) against what the planner may use."""
    placement = getattr(plan, "placement", None)
    if placement is None:
        lines = []
        for module_path, module_plan in plan.plan.items():
            for table, ps in module_plan.items():
                ranks = sorted(set(ps.ranks or []))
                lines.append(f"  {module_path}.{table}: {ps.sharding_type} kernel={ps.compute_kernel} ranks={ranks}")
        return "sharding plan:\n" + "\n".join(lines)
    p = placement
    heads = [f"  {t.name}: {t.sharding_type} kernel={t.compute_kernel} ranks={t.ranks}" for t in p.tables]
    width = max(len(h) for h in heads)
    size_width = max(10, *(len(f"{t.rows:,} x {t.dim}") for t in p.tables))
    columns = f"{'rows x dim':>{size_width}} type {'weights':>12}"
    lines = [f"sharding plan: {p.world_size} {p.device} rank(s), {p.local_world_size} per node",
             f"{'  table: sharding kernel ranks':<{width}}  | {columns} | shards (rows x columns)"]
    for head, t in zip(heads, p.tables):
        lines.append(f"{head:<{width}}  | {f'{t.rows:,} x {t.dim}':>{size_width}} {t.dtype} "
                     f"{format_bytes(t.weight_bytes):>12} | {_shard_shapes(t)}")
    largest = max(max(m.hbm_bytes, m.ddr_bytes) for m in p.ranks)
    unit, size = ("GiB", GIB) if largest >= GIB else ("MiB", MIB) if largest >= MIB else ("KiB", 1024)

    def share(used: int, usable: int) -> str:
        return f"{100 * used / usable:.1f}%" if usable else "-"

    def span(first: int, last: int) -> str:
        return str(first) if first == last else f"{first}-{last}"

    lines += ["estimated memory per rank (the planner's: table shards' weights, optimizer state and lookup "
              "buffers; 'use': share of what it may fill):",
              f"  {'ranks':>11} {'nodes':>7} {'shards':>7} {'HBM ' + unit:>10} {'DDR ' + unit:>10} {'HBM use':>8} "
              f"{'DDR use':>8}"]
    groups: List[List[RankMemory]] = []
    for m in p.ranks:
        if groups and (groups[-1][0].shards, groups[-1][0].hbm_bytes, groups[-1][0].ddr_bytes) == \
                (m.shards, m.hbm_bytes, m.ddr_bytes):
            groups[-1].append(m)
        else:
            groups.append([m])
    for g in groups:
        m, last = g[0], g[-1].rank
        nodes = span(m.rank // p.local_world_size, last // p.local_world_size)
        lines.append(f"  {span(m.rank, last):>11} {nodes:>7} {m.shards:>7} {m.hbm_bytes / size:>10.3f} "
                     f"{m.ddr_bytes / size:>10.3f} {share(m.hbm_bytes, p.usable_hbm_per_rank):>8} "
                     f"{share(m.ddr_bytes, p.usable_ddr_per_rank):>8}")
    lines.append(f"  {'total':>11} {'':>7} {sum(m.shards for m in p.ranks):>7} "
                 f"{sum(m.hbm_bytes for m in p.ranks) / size:>10.3f} {sum(m.ddr_bytes for m in p.ranks) / size:>10.3f}")
    return "\n".join(lines)


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


def local_blocks(weight) -> List[tuple]:
    """This rank's blocks of a table: (tensor, (first row, first column), (rows, columns)) for each
    local shard of a sharded table, or the whole of a plain one: where in-place writes go."""
    if isinstance(weight, ShardedTensor):
        return [(s.tensor, s.metadata.shard_offsets, s.metadata.shard_sizes) for s in weight.local_shards()]
    return [(weight, (0, 0), tuple(weight.shape))]


@torch.no_grad()
def init_tables(model: nn.Module, std: float, seed: int) -> None:
    """Fill every table (full tensor or local shards) with its sharding-independent init, one
    init block of rows at a time (no copy of a whole shard)."""
    for index, (name, weight) in enumerate(sorted(table_weights(model).items())):
        dim = weight.size(1)
        for tensor, (r0, c0), (nr, nc) in local_blocks(weight):
            start = r0
            while start < r0 + nr:
                stop = min(r0 + nr, (start // _INIT_BLOCK + 1) * _INIT_BLOCK)  # within one init block
                rows = init_rows(index, start, stop - start, dim, std, seed)
                tensor[start - r0 : stop - r0].copy_(rows[:, c0 : c0 + nc])
                start = stop


@torch.no_grad()
def gather_tables(model: nn.Module, dst: int = 0) -> Dict[str, torch.Tensor]:
    """Full (unsharded) copies of every embedding table on rank `dst`, on its CPU (empty dict
    elsewhere). Each table passes whole through `dst`'s device (NCCL gathers into device memory
    only): for tests and parity checks of small tables, never the training path.

    Collective: every rank must call it."""
    rank, _ = rank_and_world()
    out: Dict[str, torch.Tensor] = {}
    for name, weight in sorted(table_weights(model).items()):
        if isinstance(weight, ShardedTensor):
            # the device ShardedTensor.gather itself sends from (CUDA under NCCL, the CPU under gloo)
            on = weight._get_preferred_device()
            full = torch.empty(weight.size(), dtype=weight.dtype, device=on) if rank == dst else None
            weight.gather(dst=dst, out=full)
        else:
            full = weight.detach().clone()
        if rank == dst:
            out[name] = full.cpu()
    return out


def local_table_bytes(model: nn.Module) -> int:
    """Bytes allocated for this rank's table weights: the storages behind its shards (FBGEMM keeps
    the tables of one kernel group in one buffer), each counted once. Measured, not estimated."""
    storages = {}
    for weight in table_weights(model).values():
        tensors = [s.tensor for s in weight.local_shards()] if isinstance(weight, ShardedTensor) else [weight]
        for t in tensors:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def local_optimizer_bytes(optimizer) -> int:
    """Bytes of this rank's optimizer state (the local shards of the fused tables' state, and any
    dense state), each storage counted once (like ``local_table_bytes``)."""
    storages = {}

    def visit(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        else:
            if isinstance(value, ShardedTensor):
                tensors = [s.tensor for s in value.local_shards()]
            elif isinstance(value, DTensor):
                tensors = [value.to_local()]
            else:
                tensors = [value] if torch.is_tensor(value) else []
            for t in tensors:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    visit(optimizer.state_dict().get("state", {}))
    return sum(storages.values())


def _local_entries(model: nn.Module) -> List[tuple]:
    """(this rank's storage, whether it is a DTensor's) of every state-dict entry, in key order."""
    out: List[tuple] = []
    for _, value in sorted(model.state_dict().items()):
        if isinstance(value, ShardedTensor):
            out.extend((shard.tensor, False) for shard in value.local_shards())
        elif isinstance(value, DTensor):
            out.append((value.to_local(), True))
        elif torch.is_tensor(value):
            out.append((value, False))
    return out


def local_tensors(model: nn.Module) -> List[torch.Tensor]:
    """This rank's storage of every state-dict entry (local shards of sharded tables)."""
    return [t for t, _ in _local_entries(model)]


@torch.no_grad()
def snapshot_weights(model: nn.Module) -> List[torch.Tensor]:
    """A copy of this rank's weights (the best epoch so far) in host memory, not on the GPU whose
    memory the planner gave to the tables; no communication. (A DTensor's local part stays on
    its device: DTensor.from_local would move it back there to checkpoint it.)"""
    return [t.detach().clone() if dtensor else t.detach().to("cpu", copy=True)
            for t, dtensor in _local_entries(model)]


@torch.no_grad()
def restore_weights(model: nn.Module, snapshot: List[torch.Tensor]) -> None:
    """Write a `snapshot_weights` copy back in place (same model, same sharding)."""
    tensors = local_tensors(model)
    if len(tensors) != len(snapshot):
        raise ValueError("restore_weights: the snapshot does not match the model")
    for t, s in zip(tensors, snapshot):
        t.copy_(s)
