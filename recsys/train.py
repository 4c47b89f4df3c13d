"""Train: prepare the data, build and shard the model, run the loop, then stack, evaluate and export.

    python -m recsys.train [hydra overrides]                          # one process
    torchrun --nproc_per_node 2 -m recsys.train [hydra overrides]     # 2 ranks (gloo/NCCL)

``main`` is the Hydra entry point (``recsys.cli``); it calls ``train(cfg, run_dir)``, which reads
top to bottom: setup (run directory and resume point, data, sharded model, evaluation sets), the
loop (``recsys.training.loop``), the end of the run (``recsys.finish``: stack, evaluate, export)
and the results. The loop checkpoints every ``train.checkpoint_every_steps`` steps and at the end,
and a rerun into the same run directory resumes from the newest complete checkpoint
(``recsys.training.checkpoint``). Tests and notebooks call ``train`` directly, on any number of
ranks (each rank calls it inside its process group).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Dict, Optional

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from recsys import cli
from recsys.atomic import write_json_atomic
from recsys.config import Config, ConfigError, check_data, check_world_size, ignored_options
from recsys.data.batches import BatchOptions
from recsys.data.source import DataSource
from recsys.distributed import all_gather_objects, rank_and_world
from recsys.evaluation.metrics import epoch_evaluator
from recsys.finish import ExportTarget, RunEnd, finish_run, stack_options
from recsys.memory import PhasePeaks
from recsys.parallelize import (describe_plan, destroy_distributed, init_distributed, local_optimizer_bytes,
                                local_table_bytes, restore_weights)
from recsys.report import count_quantiles, metrics_table, result_rows, run_plots, write_summary
from recsys.spectral import closed_form_end, init_spectral
from recsys.training.checkpoint import Checkpointer, find_resume, run_hash, table_shapes
from recsys.training.loop import LoopOptions, train_epochs
from recsys.training.pretrained import init_all_pretrained
from recsys.training.progress import TrainLog, learning_rates
from recsys.training.setup import build_model, open_data
from recsys.training.state import TrainState
from recsys.training.warm_start import init_warm_start

logger = logging.getLogger("recsys.train")


def train(cfg: Config, run_dir: Path, config_hash: str = "") -> Dict:
    """Run one training job on the current process group (created when missing); returns the
    run's metrics (rank 0 writes them to ``run_dir/metrics.json``, with plots and a summary)."""
    run_dir = Path(run_dir)
    dist_info = init_distributed(cfg.train.device, cfg.train.timeout_minutes)
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    log: Optional[TrainLog] = None
    peaks = PhasePeaks()  # this rank's peak RSS by phase: <run_dir>/memory/rank-RRRRR.json
    try:
        # ---- setup: the run directory (another run's is refused), where to resume, data, model, sets
        run_dirs = sorted(set(all_gather_objects(str(run_dir.resolve()))))
        if len(run_dirs) != 1:
            raise ConfigError(f"ranks resolved different run directories {run_dirs}: pass hydra.run.dir=DIR (or "
                              "RECSYS_RUN_ID) to all ranks")
        check_world_size(cfg, world)
        seed_everything(cfg.seed)
        rhash = run_hash(cfg)
        t = cfg.train
        resume_from = find_resume(run_dir, cfg.train.resume, rhash, cfg.train.overwrite)
        data = open_data(cfg)
        check_data(cfg, data.num_users, data.num_items, data.num_fit, data.has_valid)
        for line in ignored_options(cfg, data.loader, data.has_valid) if rank == 0 else ():
            logger.warning("%s", line)
        counts = describe_data(data)
        negative_rows = data.negative_rows()
        sharded = build_model(cfg, data.num_users, data.num_items, device, world, data.fit_item_counts(),
                              side_tables=data.side_tables(),
                              negative_pool=None if negative_rows is None else len(negative_rows))
        dmp, optimizer = sharded.dmp, sharded.optimizer
        local_bytes = local_table_bytes(dmp) + local_optimizer_bytes(optimizer)  # weights + optimizer state
        table_bytes = {"local_table_bytes": local_bytes, "total_table_bytes": sum(all_gather_objects(local_bytes))}
        pretrained = warm = None
        if resume_from is None and t.warm_start:  # an earlier run's rows, mapped through both vocabularies
            warm = init_warm_start(dmp, optimizer, data, Path(t.warm_start), cfg.model.name, table_shapes(dmp),
                                   run_dir, t.warm_start_optimizer)
        elif t.warm_start:
            logger.info("train.warm_start=%s not applied: the run resumes from %s (its own tables)", t.warm_start,
                        resume_from)
        if resume_from is None:  # tables from given vectors, or the closed form of the fit interactions
            pretrained = init_all_pretrained(dmp, data, cfg.model)
        if cfg.model.init == "spectral" and resume_from is None:
            init_spectral(dmp, data, False, cfg.model, cfg.seed, device)
        logger.info("world size %d, device %s, backend %s\n%s", world, device, dist_info.backend,
                    describe_plan(sharded.plan))
        peaks.mark("setup")
        sets = data.eval_sets(cfg.eval.max_users, progress=rank == 0 and cfg.train.progress)
        peaks.mark("evaluation sets")
        state = TrainState(loss_curve={"every_steps": cfg.train.log_every_steps, "step": [], "loss": []},
                           pretrained=pretrained, warm_start=warm)
        checkpointer = Checkpointer(run_dir, {
            "run_hash": rhash, "config_hash": config_hash, "config_yaml": OmegaConf.to_yaml(OmegaConf.structured(cfg)),
            "model": {"name": cfg.model.name, "tables": table_shapes(dmp)}, "data": {"path": str(data.path), **counts}},
            t.checkpoint_every_steps, t.checkpoint_every_minutes, t.checkpoint_at_end, t.keep_checkpoints, device)
        options = loop_options(cfg, data)
        if resume_from is not None:
            resumed = checkpointer.load(resume_from, dmp, optimizer, state, cfg.model.name)
            log_resume(resumed, state, data, world, options.total_steps)

        # ---- loop
        log = TrainLog(state, options.total_steps, t.batch_size, t.log_every_steps, rank, t.progress,
                       tensorboard_dir(run_dir, cfg), resume_from is not None, learning_rates(optimizer),
                       cfg.eval.select_metric)
        state.start_clock()
        batches = BatchOptions(t.batch_size, cfg.loss.num_negatives, cfg.seed, rank, world, cfg.data.num_workers,
                               cfg.data.shuffle_buffer, pin_memory=device.type == "cuda", negative_rows=negative_rows)
        model = train_epochs(dmp, optimizer, device, data, batches, state, options, checkpointer, log,
                             epoch_evaluator(sets, cfg.eval, device))
        closed_form_valid = None
        if cfg.model.init == "spectral" and not state.history and not state.finished:  # no epoch: the closed form
            closed_form_valid = timed(state, lambda: closed_form_end(dmp, model, data, sets, cfg.model, cfg.seed,
                                                                     device, cfg.eval))
        checkpointer.save_final(state, dmp, optimizer)
        peaks.mark("training")
        wall = state.elapsed()
        log.close_bar()
        base_valid = None
        if state.best_weights is not None:
            restore_weights(dmp, state.best_weights)
            base_valid = state.history[state.best_epoch]["valid"]
            logger.info("restored the weights of epoch %d (best valid %s %.4f)", state.best_epoch,
                        cfg.eval.select_metric, state.best_value)

        # ---- end of run: stack, evaluate, export; the results
        export = ExportTarget(run_dir / cfg.export.dir, cfg.export, config_hash) if cfg.export.enabled else None
        end = finish_run(model, data, sets, device, cfg.eval, stack=stack_options(cfg),
                         valid=base_valid if base_valid is not None else closed_form_valid, base_valid=base_valid,
                         norms=cfg.log.plots, export=export, peaks=peaks)
        metrics = run_metrics(end, state, wall, data, sets.info, counts, rhash, checkpointer, cfg, run_dir, device)
        log.final(metrics, state.step)
        if rank == 0:
            write_results(run_dir, metrics, end, data, cfg)
        peaks.mark("results")
        peaks.write(run_dir / "memory", rank, world, **table_bytes)
        return metrics
    finally:
        if log is not None:
            log.close()
        destroy_distributed()


def tensorboard_dir(run_dir: Path, cfg: Config) -> Optional[Path]:
    """Where the run's TensorBoard events go (``log.tensorboard``), or None."""
    return run_dir / "tensorboard" if cfg.log.tensorboard else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe_data(data: DataSource) -> Dict:
    """Log what the run trains on; the manifest's counts."""
    counts = data.manifest["counts"]
    logger.info("dataset %s: %d users, %d items, %d train / %d test interactions, dropped %s%s", data.path,
                counts["num_users"], counts["num_items"], counts["train_interactions"], counts["test_interactions"],
                data.manifest["dropped"], "; streamed" if data.loader == "stream" else "")
    return counts


def loop_options(cfg: Config, data: DataSource) -> LoopOptions:
    """The loop's length (the epochs' steps, capped by ``train.max_steps``), logged."""
    batch = cfg.train.batch_size
    epoch_steps = data.steps_per_epoch(batch)
    total = epoch_steps * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    logger.info("%d steps of %d interactions (%d per epoch; the %d left over by the batch size are a different "
                "random subset each epoch)", total, batch, epoch_steps, data.num_fit - epoch_steps * batch)
    return LoopOptions(cfg.train.epochs, total, cfg.eval.select_metric, cfg.train.patience, cfg.train.log_every_steps,
                       cfg.train.prefetch_batches)


def log_resume(resumed: Dict, state: TrainState, data: DataSource, world: int, total_steps: int) -> None:
    if data.order_depends_on_world_size and resumed["world_size"] != world and state.batch and not state.finished:
        logger.warning("resuming a streamed epoch on %d rank(s), written by %d: the streamed order depends on the "
                       "world size, so the rest of epoch %d is the new order's batches after the first %d (some rows "
                       "of this epoch may be seen twice and others not at all)", world, resumed["world_size"],
                       state.epoch, state.batch)
    logger.info("resumed from %s (written by %d rank(s)): step %d, epoch %d, %d batches into it%s", resumed["from"],
                resumed["world_size"], state.step, state.epoch, state.batch,
                "; training had finished" if state.finished else "")
    if state.finished and state.step < total_steps:
        logger.warning("the checkpoint is of a run whose training ended (step %d): it is evaluated and exported, "
                       "not trained further", state.step)


def timed(state: TrainState, fn):
    """``fn()``, its time counted as evaluation inside the loop (not training time)."""
    t0 = state.elapsed()
    try:
        return fn()
    finally:
        state.valid_s += state.elapsed() - t0


def run_metrics(end: RunEnd, state: TrainState, wall: float, data: DataSource, eval_info: Dict, counts: Dict,
                rhash: str, checkpointer: Checkpointer, cfg: Config, run_dir: Path, device: torch.device) -> Dict:
    """metrics.json: the end of the run's figures, then how training went, the data and the files."""
    m = end.metrics
    metrics = {"test": m["test"]}
    if "valid" in m:
        metrics["valid"] = m["valid"]
    if state.best_weights is not None:
        metrics["selected_epoch"] = state.best_epoch
    for key in ("stack", "popularity", "test_all", "cold_items"):
        if key in m:
            metrics[key] = m[key]
    train_s = wall - state.valid_s
    metrics["train"] = {"steps": state.step, "epochs": len(state.history), "wall_s": round(train_s, 3),
                        "interactions_per_s": round(state.step * cfg.train.batch_size / max(train_s, 1e-9), 1),
                        "world_size": rank_and_world()[1], "device": str(device), "history": state.history,
                        "loss_curve": state.loss_curve}
    metrics["eval"] = {"wall_s": round(end.eval_s, 3), "per_epoch_wall_s": round(state.valid_s, 3)}
    metrics["data"] = {"path": str(data.path), **counts, "dropped": data.manifest["dropped"],
                       "loader": data.loader, **eval_info}
    if "hash" in data.manifest:  # data.id_mapping=hash: distinct ids, rows used, collision rate
        metrics["data"]["hash"] = data.manifest["hash"]
    if "oov" in data.manifest:  # rare items and unseen test items in the OOV rows
        metrics["data"]["oov"] = data.manifest["oov"]
    if "features" in data.manifest:  # side features: ids without interactions (new), without features, ...
        metrics["data"]["features"] = {stem: entry["counts"] for stem, entry in data.manifest["features"].items()}
    if state.pretrained:
        metrics["pretrained"] = state.pretrained
    if state.warm_start:
        metrics["warm_start"] = state.warm_start
    metrics["run_hash"] = rhash
    metrics["checkpoint"] = checkpointer.summary()
    if end.norms is not None:
        metrics["vectors"] = {"normalized": end.base.normalize,
                              **{f"{name}_norm": count_quantiles(n) for name, (_, n) in end.norms.items()}}
    if cfg.export.enabled:
        metrics["export"] = {"dir": str(end.export_dir or run_dir / cfg.export.dir)}
        if end.export_manifest is not None and cfg.export.faiss != "none":  # rank 0: the ANN index's recall, speed
            metrics["export"]["faiss"] = end.export_manifest["faiss"]
    return metrics


def write_results(run_dir: Path, metrics: Dict, end: RunEnd, data: DataSource, cfg: Config) -> None:
    """Rank 0: metrics.json, the console table, the plots and summary.md."""
    write_json_atomic(metrics, run_dir / "metrics.json")
    t = metrics["train"]
    lines = [metrics_table(result_rows(metrics), cfg.eval.ks),
             f"{t['steps']} steps in {t['wall_s']:.1f}s ({t['interactions_per_s']:,.0f} interactions/s) on "
             f"{t['world_size']} rank(s); {metrics['test']['users']} test users", f"metrics: {run_dir / 'metrics.json'}"]
    if "export" in metrics:
        lines.append(f"vectors: {metrics['export']['dir']}/items/, users/ (Parquet parts)")
    print("\n".join(lines), flush=True)
    figures = {}
    if cfg.log.plots:
        figures = run_plots(run_dir, metrics, cfg.eval.ks, data.item_counts(), data.user_counts(), end.norms,
                            end.base.normalize)
    logger.info("summary: %s", write_summary(run_dir, metrics, cfg.eval.ks, figures, tensorboard_dir(run_dir, cfg)))


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="config")
def main(dcfg: DictConfig) -> Optional[float]:
    cfg = cli.start(dcfg)
    with cli.command_errors():
        metrics = train(cfg, cli.run_dir(), cli.config_hash(dcfg))
    return metrics["test"].get(cfg.eval.select_metric)  # the objective a Hydra sweeper reads


if __name__ == "__main__":
    main()
