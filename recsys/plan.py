"""Dry run: plan a cluster job's sharding in one process, on any machine, and exit.

    python -m recsys.plan plan.world_size=64 plan.device=cuda [the same overrides as recsys.train]

Builds the model as ``recsys.train`` does (tables on the meta device, the fused table optimizer,
``train.sharding_types`` as planner constraints, local batch ``train.batch_size / world_size``),
runs TorchRec's planner for ``plan.world_size`` ranks of type ``plan.device`` with no process
group and no device touched, prints the sharding plan and the planner's memory estimate per
rank, and writes both to ``<run dir>/plan.json``. Exit 0: the tables fit; exit 2 (one-line
error): the planner cannot place them, or the configuration is invalid.

Table sizes come from the prepared dataset (``recsys.data.prepare``, reused when already
prepared) unless ``plan.num_users`` and ``plan.num_items`` are given, in which case no data is
read: a billion-row table can be planned on a laptop.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import hydra
import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Stats, Topology
from torchrec.distributed.planner.stats import EmbeddingStats

from recsys.config import Config, ConfigError, register_configs, register_resolvers, typed_config
from recsys.data import DataError, prepare, write_json_atomic
from recsys.model import RetrievalTask
from recsys.parallelize import describe_plan, embedding_modules, fuse_table_optimizer, plan_sharding
from recsys.train import build_task as train_module

logger = logging.getLogger("recsys.plan")
warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*")

GIB = 1024**3


class PlanError(ValueError):
    """The planner cannot place the tables on the given ranks."""


@dataclass
class Shard:
    rank: int
    row_offset: int
    rows: int
    col_offset: int
    cols: int
    hbm_bytes: int
    ddr_bytes: int


@dataclass
class TablePlan:
    name: str
    """The table's path in the model, as in the sharding plan (``model.user_ebc.user``)."""
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    shards: List[Shard]

    @property
    def ranks(self) -> List[int]:
        return sorted({s.rank for s in self.shards})


@dataclass
class RankMemory:
    rank: int
    shards: int
    hbm_bytes: int
    ddr_bytes: int


@dataclass
class DryRun:
    """The planner's answer for a cluster: where every shard goes and what each rank holds."""

    world_size: int
    device: str
    local_world_size: int
    batch_size_per_rank: int
    hbm_per_rank: int
    """Device memory per rank (bytes) given to the planner."""
    ddr_per_rank: int
    usable_hbm_per_rank: int
    """What the planner may fill with table shards (device memory less its reservation)."""
    usable_ddr_per_rank: int
    tables: List[TablePlan]
    ranks: List[RankMemory] = field(default_factory=list)
    plan_text: str = ""
    """The sharding plan as ``recsys.train`` logs it (``describe_plan``)."""

    @property
    def total_hbm(self) -> int:
        return sum(r.hbm_bytes for r in self.ranks)

    @property
    def total_ddr(self) -> int:
        return sum(r.ddr_bytes for r in self.ranks)


class _Recorder(Stats):
    """A planner ``Stats`` hook: keeps the sharding options of the chosen plan (with the
    planner's storage estimate of every shard) and the capacities it planned against."""

    def __init__(self) -> None:
        self.best_plan: List[ShardingOption] = []
        self.topology: Optional[Topology] = None
        self.usable: Optional[Topology] = None

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans,
            run_time, best_plan, *args, **kwargs) -> None:
        self.best_plan = list(best_plan)
        self.topology = topology
        self.usable = storage_reservation.last_reserved_topology


def build_task(cfg: Config, num_users: int, num_items: int) -> RetrievalTask:
    """The training module of ``recsys.train`` with its tables on the meta device and the table
    optimizer fused into the backward (so the planner sees the fused kernels and their state)."""
    task = train_module(cfg, num_users, num_items)
    fuse_table_optimizer(task, cfg.optim.name, cfg.optim.lr, cfg.optim.eps)
    return task


def dry_run(model: nn.Module, world_size: int, device_type: str, sharding_types: List[str],
            batch_size_per_rank: int, local_world_size: int, hbm_cap: Optional[int] = None,
            ddr_cap: Optional[int] = None, verbose: bool = False) -> DryRun:
    """Plan `model` (built on meta) for `world_size` ranks of `device_type` in this process.

    Raises PlanError (one line) when the planner cannot place the tables."""
    recorder = _Recorder()
    stats: List[Stats] = [EmbeddingStats(), recorder] if verbose else [recorder]
    try:
        plan = plan_sharding(model, world_size, device_type, sharding_types, None, batch_size_per_rank,
                             local_world_size=local_world_size, hbm_cap=hbm_cap, ddr_cap=ddr_cap, stats=stats)
    except PlannerError as e:
        raise PlanError(_planner_failure(e, world_size, device_type, recorder, model)) from None
    tables = []
    for so in sorted(recorder.best_plan, key=lambda so: so.fqn):
        shards = [Shard(s.rank, s.offset[0], s.size[0], s.offset[1], s.size[1], s.storage.hbm, s.storage.ddr)
                  for s in so.shards]
        tables.append(TablePlan(so.fqn, so.tensor.shape[0], so.tensor.shape[1], so.sharding_type,
                                so.compute_kernel, shards))
    ranks = [RankMemory(r, 0, 0, 0) for r in range(world_size)]
    for t in tables:
        for s in t.shards:
            ranks[s.rank].shards += 1
            ranks[s.rank].hbm_bytes += s.hbm_bytes
            ranks[s.rank].ddr_bytes += s.ddr_bytes
    device0, usable0 = recorder.topology.devices[0].storage, recorder.usable.devices[0].storage
    return DryRun(world_size, device_type, local_world_size, batch_size_per_rank, device0.hbm, device0.ddr,
                  usable0.hbm, usable0.ddr, tables, ranks, describe_plan(plan))


def _planner_failure(error: PlannerError, world_size: int, device_type: str, recorder: _Recorder,
                     model: nn.Module) -> str:
    """One line: what did not fit where, from the planner's last proposal and the table sizes."""
    reason = str(error).strip().splitlines()[0].strip().rstrip(".")
    weights = sum(p.numel() * p.element_size() for ebc in embedding_modules(model) for p in ebc.parameters())
    needed = sum(s.storage.hbm + s.storage.ddr for so in recorder.best_plan for s in so.shards)
    usable = recorder.usable
    have = ""
    if usable is not None:
        u = usable.devices[0].storage
        have = (f"; each rank offers {_gib(u.hbm)} HBM + {_gib(u.ddr)} DDR to the tables "
                f"({_gib(u.hbm * world_size)} + {_gib(u.ddr * world_size)} in all)")
    tried = f" ({_gib(needed)} with optimizer state and buffers in its last proposal)" if needed else ""
    return (f"{reason} on {world_size} {device_type} rank(s): the tables hold {_gib(weights)} of weights"
            f"{tried}{have}. Add ranks (plan.world_size), shrink the "
            f"tables (model.embedding_dim, plan.num_users / plan.num_items), relax train.sharding_types, "
            f"or give the planner more memory (plan.hbm_gib, plan.ddr_gib)")


def _unit(n: float) -> Tuple[str, int]:
    for name, size in (("GiB", GIB), ("MiB", 1024**2)):
        if n >= size:
            return name, size
    return "KiB", 1024


def _gib(n: float) -> str:
    if n == 0:
        return "0"
    name, size = _unit(n)
    return f"{n / size:.3f} {name}"


def format_report(result: DryRun) -> str:
    """The plan and the memory per rank, as printed by the dry run."""
    r = result
    lines = [f"dry run: {r.world_size} {r.device} rank(s), {r.local_world_size} per node, "
             f"{r.batch_size_per_rank} interactions per rank per step",
             f"capacity per rank: HBM {_gib(r.hbm_per_rank)} ({_gib(r.usable_hbm_per_rank)} for tables after "
             f"the planner's reservation), DDR {_gib(r.ddr_per_rank)} ({_gib(r.usable_ddr_per_rank)} for tables)",
             "", r.plan_text, "", "tables:"]
    width = max(len(t.name) for t in r.tables)
    for t in r.tables:
        ranks = t.ranks
        span = f"{ranks[0]}-{ranks[-1]}" if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 1 else \
            ",".join(map(str, ranks))
        lines.append(f"  {t.name:<{width}}  {t.rows:>13,} x {t.dim:<4} {t.sharding_type:<17} {t.compute_kernel:<18} "
                     f"{len(t.shards)} shard(s) on rank(s) {span}")
    unit, size = _unit(max(max(m.hbm_bytes, m.ddr_bytes) for m in r.ranks))

    def share(used: int, usable: int) -> str:
        return f"{100 * used / usable:.1f}%" if usable else "-"

    def span(first: int, last: int) -> str:
        return str(first) if first == last else f"{first}-{last}"

    lines += ["", "estimated memory per rank (table shards: weights, optimizer state, lookup buffers; "
              "consecutive ranks with the same figures on one line):",
              f"  {'ranks':>11} {'nodes':>7} {'shards':>7} {'HBM ' + unit:>10} {'DDR ' + unit:>10} {'HBM use':>8} "
              f"{'DDR use':>8}"]
    groups: List[List[RankMemory]] = []
    for m in r.ranks:
        if groups and (groups[-1][0].shards, groups[-1][0].hbm_bytes, groups[-1][0].ddr_bytes) == \
                (m.shards, m.hbm_bytes, m.ddr_bytes):
            groups[-1].append(m)
        else:
            groups.append([m])
    for g in groups:
        m, last = g[0], g[-1].rank
        nodes = span(m.rank // r.local_world_size, last // r.local_world_size)
        lines.append(f"  {span(m.rank, last):>11} {nodes:>7} {m.shards:>7} {m.hbm_bytes / size:>10.3f} "
                     f"{m.ddr_bytes / size:>10.3f} {share(m.hbm_bytes, r.usable_hbm_per_rank):>8} "
                     f"{share(m.ddr_bytes, r.usable_ddr_per_rank):>8}")
    busiest = max(r.ranks, key=lambda m: (m.hbm_bytes, m.ddr_bytes))
    lines += [f"  {'total':>11} {'':>7} {sum(m.shards for m in r.ranks):>7} {r.total_hbm / size:>10.3f} "
              f"{r.total_ddr / size:>10.3f}",
              "",
              f"fits: yes; the fullest rank ({busiest.rank}) holds "
              + (f"{_gib(busiest.hbm_bytes)} HBM of {_gib(r.usable_hbm_per_rank)} and " if r.hbm_per_rank else "")
              + f"{_gib(busiest.ddr_bytes)} DDR of {_gib(r.usable_ddr_per_rank)}"]
    return "\n".join(lines)


def table_sizes(cfg: Config) -> Tuple[int, int, str]:
    """(num_users, num_items, where they came from): ``plan.num_*`` or the prepared dataset."""
    if cfg.plan.num_users:
        return cfg.plan.num_users, cfg.plan.num_items, "plan.num_users / plan.num_items"
    data_dir = prepare(cfg.data)
    counts = json.loads((data_dir / "manifest.json").read_text())["counts"]
    return counts["num_users"], counts["num_items"], str(data_dir)


def run(cfg: Config, run_dir: Optional[Path] = None) -> DryRun:
    """The dry run of `cfg`: the same checks and model as ``recsys.train``, planned for ``cfg.plan``."""
    p = cfg.plan
    world = p.world_size
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by plan.world_size={world}")
    if cfg.loss.num_negatives % world:
        raise ConfigError(f"loss.num_negatives={cfg.loss.num_negatives} is not divisible by plan.world_size={world}")
    num_users, num_items, source = table_sizes(cfg)
    kmax = max([*cfg.eval.ks, cfg.eval.select_k])
    if kmax > num_items:
        raise ConfigError(f"eval.ks / eval.select_metric: K={kmax} is larger than the number of items ({num_items})")
    logger.info("planning %s with %d users and %d items (from %s)", cfg.model.name, num_users, num_items, source)
    task = build_task(cfg, num_users, num_items)
    result = dry_run(task, world, p.device, cfg.train.sharding_types, cfg.train.batch_size // world,
                     min(p.local_world_size, world),
                     hbm_cap=None if p.hbm_gib is None else int(p.hbm_gib * GIB),
                     ddr_cap=None if p.ddr_gib is None else int(p.ddr_gib * GIB), verbose=p.verbose)
    if run_dir is not None:
        write_json_atomic({**asdict(result), "num_users": num_users, "num_items": num_items, "source": source,
                           "total_hbm_bytes": result.total_hbm, "total_ddr_bytes": result.total_ddr},
                          Path(run_dir) / "plan.json")
    return result


register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg: Config = typed_config(dcfg)
    if cfg.plan.verbose:
        logging.getLogger("torchrec.distributed.planner.stats").setLevel(logging.INFO)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run(cfg, run_dir)
    except (ConfigError, DataError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(result), f"\nplan: {run_dir / 'plan.json'}", sep="", flush=True)


if __name__ == "__main__":
    main()
