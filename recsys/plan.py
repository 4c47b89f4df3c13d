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
read: a billion-row table can be planned on a laptop. (With ``model.pretrained_frozen`` the vector
files' dimensions are read: their schema or first vector.)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import hydra
import torch.nn as nn
from omegaconf import DictConfig
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.types import PlannerError

from recsys import cli
from recsys.atomic import write_json_atomic
from recsys.config import Config, check_data, check_world_size
from recsys.data.features import side_tables_of
from recsys.data.prepare import data_config, prepare
from recsys.errors import PlanError
from recsys.model import RetrievalTask
from recsys.model import build_task as train_module
from recsys.parallelize import (GIB, PlanRecorder, RankMemory, TablePlacement, describe_plan, embedding_modules,
                                format_bytes, fuse_table_optimizer, plan_sharding)
from recsys.training.pretrained import pretrained_dims

__all__ = ["PlanError", "dry_run", "run"]

logger = logging.getLogger("recsys.plan")


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
    tables: List[TablePlacement]
    ranks: List[RankMemory] = field(default_factory=list)
    plan_text: str = ""
    """The sharding plan as ``recsys.train`` logs it (``describe_plan``): tables and memory per rank."""

    @property
    def total_hbm(self) -> int:
        return sum(r.hbm_bytes for r in self.ranks)

    @property
    def total_ddr(self) -> int:
        return sum(r.ddr_bytes for r in self.ranks)


def build_task(cfg: Config, num_users: int, num_items: int,
               side_tables: Optional[Dict[str, List[Tuple[str, int]]]] = None) -> RetrievalTask:
    """The training module of ``recsys.train`` with its tables on the meta device and the table
    optimizer fused into the backward (so the planner sees the fused kernels and their state); the
    frozen pre-trained tables' dimensions (``model.pretrained_frozen``) are read from their files."""
    task = train_module(cfg.model, cfg.loss, num_users, num_items, side_tables=side_tables,
                        pretrained_dims=pretrained_dims(cfg.model))
    fuse_table_optimizer(task, cfg.optim.name, cfg.optim.lr, cfg.optim.eps)
    return task


def dry_run(model: nn.Module, world_size: int, device_type: str, sharding_types: List[str],
            batch_size_per_rank: int, local_world_size: int, hbm_cap: Optional[int] = None,
            ddr_cap: Optional[int] = None, verbose: bool = False) -> DryRun:
    """Plan `model` (built on meta) for `world_size` ranks of `device_type` in this process.

    Raises PlanError (one line) when the planner cannot place the tables."""
    recorder = PlanRecorder()
    try:
        plan = plan_sharding(model, world_size, device_type, sharding_types, None, batch_size_per_rank,
                             local_world_size=local_world_size, hbm_cap=hbm_cap, ddr_cap=ddr_cap,
                             stats=[EmbeddingStats()] if verbose else None, recorder=recorder)
    except PlannerError as e:
        raise PlanError(_planner_failure(e, world_size, device_type, recorder, model)) from None
    p = plan.placement
    return DryRun(world_size, device_type, p.local_world_size, batch_size_per_rank, p.hbm_per_rank, p.ddr_per_rank,
                  p.usable_hbm_per_rank, p.usable_ddr_per_rank, p.tables, p.ranks, describe_plan(plan))


def _planner_failure(error: PlannerError, world_size: int, device_type: str, recorder: PlanRecorder,
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


def _gib(n: float) -> str:
    return format_bytes(n)


def format_report(result: DryRun) -> str:
    """The plan and the memory per rank, as printed by the dry run."""
    r = result
    busiest = max(r.ranks, key=lambda m: (m.hbm_bytes, m.ddr_bytes))
    return "\n".join([
        f"dry run: {r.world_size} {r.device} rank(s), {r.local_world_size} per node, "
        f"{r.batch_size_per_rank} interactions per rank per step",
        f"capacity per rank: HBM {_gib(r.hbm_per_rank)} ({_gib(r.usable_hbm_per_rank)} for tables after "
        f"the planner's reservation), DDR {_gib(r.ddr_per_rank)} ({_gib(r.usable_ddr_per_rank)} for tables)",
        "", r.plan_text, "",
        f"fits: yes; the fullest rank ({busiest.rank}) holds "
        + (f"{_gib(busiest.hbm_bytes)} HBM of {_gib(r.usable_hbm_per_rank)} and " if r.hbm_per_rank else "")
        + f"{_gib(busiest.ddr_bytes)} DDR of {_gib(r.usable_ddr_per_rank)}"])


def table_sizes(cfg: Config) -> Tuple[int, int, str, Dict[str, List[Tuple[str, int]]]]:
    """(num_users, num_items, where they came from, the side-feature tables): ``plan.num_*`` (no
    side-feature table: their sizes come from the data) or the prepared dataset."""
    if cfg.plan.num_users:
        if cfg.data.item_features.path or cfg.data.user_features.path:
            logger.warning("plan.num_users / plan.num_items: the side-feature tables are not planned (their sizes "
                           "come from the prepared data; leave plan.num_* unset to read them)")
        return cfg.plan.num_users, cfg.plan.num_items, "plan.num_users / plan.num_items", {}
    data_dir = prepare(data_config(cfg))  # as training prepares it (the loader resolved for this model)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    counts = manifest["counts"]
    return counts["num_users"], counts["num_items"], str(data_dir), side_tables_of(manifest)


def run(cfg: Config, run_dir: Optional[Path] = None) -> DryRun:
    """The dry run of `cfg`: the same checks and model as ``recsys.train``, planned for ``cfg.plan``."""
    p = cfg.plan
    world = p.world_size
    check_world_size(cfg, world, f"plan.world_size={world}")
    num_users, num_items, source, side = table_sizes(cfg)
    check_data(cfg, num_users, num_items)
    logger.info("planning %s with %d users and %d items (from %s)", cfg.model.name, num_users, num_items, source)
    task = build_task(cfg, num_users, num_items, side)
    result = dry_run(task, world, p.device, cfg.train.sharding_types, cfg.train.batch_size // world,
                     min(p.local_world_size, world),
                     hbm_cap=None if p.hbm_gib is None else int(p.hbm_gib * GIB),
                     ddr_cap=None if p.ddr_gib is None else int(p.ddr_gib * GIB), verbose=p.verbose)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic({**asdict(result), "num_users": num_users, "num_items": num_items, "source": source,
                           "total_hbm_bytes": result.total_hbm, "total_ddr_bytes": result.total_ddr},
                          Path(run_dir) / "plan.json")
    return result


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg = cli.start(dcfg)
    if cfg.plan.verbose:
        logging.getLogger("torchrec.distributed.planner.stats").setLevel(logging.INFO)
    run_dir = cli.run_dir()
    with cli.command_errors():
        result = run(cfg, run_dir)
    print(format_report(result), f"\nplan: {run_dir / 'plan.json'}", sep="", flush=True)


if __name__ == "__main__":
    main()
