"""Train: prepare data, build and shard the model, run the loop, evaluate, export.

    python -m recsys.train [hydra overrides]                          # one process
    torchrun --nproc_per_node 2 -m recsys.train [hydra overrides]     # 2 ranks (gloo/NCCL)

The Hydra entry point ``main`` turns the composed config into typed dataclasses and calls
``train(cfg, run_dir)``, which reads top to bottom: setup, loop, evaluate, export, close.
The loop checkpoints every ``train.checkpoint_every_steps`` steps and at the end, and a rerun
into the same run directory resumes from the newest complete checkpoint (recsys/checkpoint.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from recsys.checkpoint import (check_compatible, load_checkpoint, prepare_resume, read_meta, run_hash,
                               save_checkpoint, table_shapes)
from recsys.config import Config, ConfigError, register_configs, register_resolvers, typed_config
from recsys.data import DataError, prepare, write_json_atomic
from recsys.evaluate import eval_options, evaluate_model, evaluate_popularity, tower_norms
from recsys.export import ExportError, export_data
from recsys.model import build_task
from recsys.parallelize import (describe_plan, destroy_distributed, init_distributed, init_tables, restore_weights,
                                shard_model, snapshot_weights)
from recsys.report import count_quantiles, run_plots, write_summary
from recsys.sources import StreamedData, data_config, open_data
from recsys.spectral import init_spectral
from recsys.stack import stack_options, stack_spectral

logger = logging.getLogger("recsys.train")
warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*")
warnings.filterwarnings("ignore", message=".*is_fx_tracing will return true.*")
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor. is deprecated.*")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def broadcast_object(obj, src: int = 0):
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def train(cfg: Config, run_dir: Path, config_hash: str = "") -> Dict:
    """Run one training job on the current process group (created when missing)."""
    run_dir = Path(run_dir)
    info = init_distributed(cfg.train.device, cfg.train.timeout_minutes)
    rank, world, device = info.rank, info.world_size, info.device
    tb = None  # TensorBoard writer: rank 0 with log.tensorboard
    try:
        logging.getLogger("torchrec").setLevel(logging.WARNING)
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
        if rank != 0:
            logging.getLogger("recsys").setLevel(logging.WARNING)
        ranks_dirs = [None] * world
        dist.all_gather_object(ranks_dirs, str(run_dir.resolve()))
        if len(set(ranks_dirs)) != 1:
            raise ConfigError(f"ranks resolved different run directories {sorted(set(ranks_dirs))}: "
                              "pass hydra.run.dir=DIR (or RECSYS_RUN_ID) to all ranks")
        if cfg.train.batch_size % world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the world size {world}")
        if cfg.loss.num_negatives % world:
            raise ConfigError(f"loss.num_negatives={cfg.loss.num_negatives} is not divisible by the world size {world}")
        if cfg.data.weight_column:
            logger.warning("data.weight_column=%s is kept in the prepared data, but the sampled softmax "
                           "loss does not weight interactions yet: every interaction counts once",
                           cfg.data.weight_column)
        seed_everything(cfg.seed)

        # ---- the run directory: another run's there is refused; a checkpoint of this run is resumed
        rhash = run_hash(cfg)
        resume_from, error = None, None
        if rank == 0:
            try:
                resume_from = prepare_resume(run_dir, cfg.train.resume, rhash, cfg.train.overwrite)
            except ConfigError as e:
                error = e
        resume_from, error = broadcast_object((resume_from, error))
        if error is not None:
            raise error

        # ---- data: rank 0 prepares (or reuses) the dataset, every rank opens it (in memory or streamed)
        error = None
        data_dir = None
        if rank == 0:
            try:
                data_dir = str(prepare(data_config(cfg)))
            except (DataError, ConfigError) as e:
                error = e
        data_dir, error = broadcast_object((data_dir, error))
        if error is not None:
            raise error
        data = open_data(cfg, Path(data_dir))
        kmax = max([*cfg.eval.ks, cfg.eval.select_k])
        if kmax > data.num_items:
            raise ConfigError(f"eval.ks / eval.select_metric: K={kmax} is larger than the number of items ({data.num_items})")
        if cfg.export.enabled and cfg.export.faiss == "ivf" and cfg.export.ivf_nlist > data.num_items:
            raise ConfigError(f"export.ivf_nlist={cfg.export.ivf_nlist} is larger than the number of items "
                              f"({data.num_items})")
        if cfg.model.stack_spectral_dim > min(data.num_users, data.num_items):
            raise ConfigError(f"model.stack_spectral_dim={cfg.model.stack_spectral_dim} is larger than the number of "
                              f"users ({data.num_users}) or items ({data.num_items})")
        if cfg.model.stack_spectral_dim and len(set(cfg.model.stack_spectral_weights)) > 1 and not data.has_valid:
            raise ConfigError(f"model.stack_spectral_weights: data.valid_fraction={cfg.data.valid_fraction} left no "
                              "validation interaction (users with few items keep them all) to choose the weight on; "
                              "raise it or give one weight")
        counts = data.manifest["counts"]
        logger.info("dataset %s: %d users, %d items, %d train / %d test interactions, dropped %s%s",
                    data_dir, counts["num_users"], counts["num_items"], counts["train_interactions"],
                    counts["test_interactions"], data.manifest["dropped"],
                    "; streamed" if isinstance(data, StreamedData) else "")
        fit_counts = data.fit_item_counts()
        epoch_steps = data.steps_per_epoch(cfg.train.batch_size)
        if epoch_steps == 0:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the "
                              f"{data.num_fit} training interactions")
        if cfg.train.patience and not data.has_valid:
            logger.warning("train.patience=%d has no effect without a validation split (data.valid_fraction)",
                           cfg.train.patience)

        # ---- model: built on meta, sharded by the planner, tables initialised identically for any sharding
        mc = cfg.model
        item_log_prob = None
        if cfg.loss.logq_correction:
            item_log_prob = torch.from_numpy(np.log(np.maximum(fit_counts, 1) / fit_counts.sum())).float().to(device)
        task = build_task(cfg, data.num_users, data.num_items, item_log_prob)
        model = task.model
        dmp, optimizer, plan = shard_model(task, device, cfg.optim.name, cfg.optim.lr, cfg.optim.eps,
                                           cfg.optim.dense_lr, cfg.train.sharding_types, cfg.train.batch_size // world)
        init_tables(dmp, mc.init_std, cfg.seed)
        dmp.module.model.reset_dense_parameters()
        if mc.init == "spectral" and resume_from is None:  # closed-form tables from the fit interactions
            init_spectral(dmp, *data.dataset.fit_pairs(), data.num_users, data.num_items, mc, cfg.seed, device)
        logger.info("world size %d, device %s, backend %s\n%s", world, device, info.backend, describe_plan(plan))

        data.setup(cfg, model, rank, world, device)
        fit_features, full_features = data.fit_features, data.full_features
        train_mask, test_csr, valid_csr, fit_mask = data.train_mask, data.test_csr, data.valid_csr, data.fit_mask
        valid_ks = sorted(set(cfg.eval.ks) | {cfg.eval.select_k})
        eval_kw = eval_options(cfg.eval)

        # ---- loop
        unused = data.num_fit - epoch_steps * cfg.train.batch_size
        total_steps = epoch_steps * cfg.train.epochs
        if cfg.train.max_steps is not None:
            total_steps = min(total_steps, cfg.train.max_steps)
        logger.info("%d steps of %d interactions (%d per epoch; the %d left over by the batch size are "
                    "a different random subset each epoch)", total_steps, cfg.train.batch_size, epoch_steps, unused)
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
        dmp.train()
        tb_dir = run_dir / "tensorboard"
        lrs = learning_rates(optimizer)
        loss_curve = {"every_steps": cfg.train.log_every_steps, "step": [], "loss": []}  # rank 0's batch loss
        history = []
        step = 0
        best = {"epoch": None, "value": -1.0, "weights": None}
        since_best = 0
        valid_s = 0.0  # in-loop evaluation time, not counted as training time
        # ---- resume: weights, optimizer state, data position (epoch, batches done in it) and loop state
        start_epoch, start_batch, finished, carried_loss, elapsed, resumed = 0, 0, False, 0.0, 0.0, None
        if resume_from is not None:
            t_load = time.perf_counter()
            check_compatible(read_meta(resume_from), mc.name, table_shapes(dmp), resume_from)
            meta, best_weights = load_checkpoint(resume_from, dmp, optimizer)
            state = meta["loop"]
            step, start_epoch, start_batch, finished = meta["step"], state["epoch"], state["batch"], state["finished"]
            history, loss_curve, since_best = state["history"], state["loss_curve"], state["since_best"]
            best = {"epoch": state["best_epoch"], "value": state["best_value"], "weights": best_weights}
            valid_s, elapsed = state["valid_s"], state["train_wall_s"]
            sums = [r["loss_sum"] for r in meta["ranks"]]  # each rank's loss sum over the epoch's batches done
            if meta["world_size"] == world:
                carried_loss = sums[rank]
            elif rank == 0:  # another world size: the epoch's mean loss stays the same sum / (steps * world)
                carried_loss = sum(sums) * world / meta["world_size"]
            if isinstance(data, StreamedData) and meta["world_size"] != world and start_batch and not finished:
                logger.warning("resuming a streamed epoch on %d rank(s), written by %d: the streamed order depends on "
                               "the world size, so the rest of epoch %d is the new order's batches after the first %d "
                               "(some rows of this epoch may be seen twice and others not at all)",
                               world, meta["world_size"], start_epoch, start_batch)
            resumed = {"from": str(resume_from), "step": step, "world_size": meta["world_size"],
                       "load_s": round(time.perf_counter() - t_load, 3)}
            logger.info("resumed from %s (written by %d rank(s)): step %d, epoch %d, %d batches into it%s",
                        resume_from, meta["world_size"], step, start_epoch, start_batch,
                        "; training had finished" if finished else "")
            if finished and step < total_steps:
                logger.warning("the checkpoint is of a run whose training ended (step %d): it is evaluated and "
                               "exported, not trained further", step)
        if rank == 0 and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(log_dir=str(tb_dir), purge_step=step if resume_from is not None else None)
        saved = {"count": 0, "seconds": 0.0, "bytes": 0, "path": None, "last": time.perf_counter()}
        every_s = cfg.train.checkpoint_every_minutes * 60

        def checkpoint(epoch: int, batch: int, loss_sum: float, done: bool) -> None:
            """Collective: every rank writes its shards; the loop state goes into meta.json."""
            loop_state = {"epoch": epoch, "batch": batch, "finished": done, "history": history,
                          "loss_curve": loss_curve, "since_best": since_best, "best_epoch": best["epoch"],
                          "best_value": best["value"], "valid_s": valid_s,
                          "train_wall_s": time.perf_counter() - t0}
            info_ = save_checkpoint(run_dir, step, dmp, optimizer, best["weights"], {
                "run_hash": rhash, "config_hash": config_hash,
                "config_yaml": OmegaConf.to_yaml(OmegaConf.structured(cfg)),
                "model": {"name": mc.name, "tables": table_shapes(dmp)},
                "data": {"path": data_dir, **counts}, "loop": loop_state}, {"loss_sum": loss_sum},
                cfg.train.keep_checkpoints)
            saved.update(count=saved["count"] + 1, seconds=saved["seconds"] + info_["seconds"], bytes=info_["bytes"],
                         path=info_["path"], last=time.perf_counter())
            logger.info("checkpoint %s (%.2f s, %.1f MB)", info_["path"], info_["seconds"], info_["bytes"] / 1e6)

        bar = tqdm(total=total_steps * cfg.train.batch_size, initial=step * cfg.train.batch_size, unit=" interactions",
                   unit_scale=True, dynamic_ncols=True, disable=rank != 0 or not cfg.train.progress, desc="train",
                   mininterval=1.0)
        t0 = time.perf_counter() - elapsed
        mark = (step, time.perf_counter())  # (step, time) of the last logged step: interactions/s between logs
        epoch = start_epoch
        for epoch in range(start_epoch, cfg.train.epochs):
            if finished:
                break
            skip = start_batch if epoch == start_epoch else 0  # batches of this epoch done before the resume
            if step >= total_steps and skip == 0:
                break
            it = data.batches(epoch, skip, total_steps - step + skip)  # the epoch's batches after the first `skip`
            loss_sum = torch.tensor(carried_loss if epoch == start_epoch else 0.0, dtype=torch.float64, device=device)
            n = skip
            while True:
                try:
                    (loss,) = pipeline.progress(it)
                except StopIteration:
                    break
                loss_sum += loss.double()
                n += 1
                step += 1
                bar.update(cfg.train.batch_size)
                if rank == 0 and step % cfg.train.log_every_steps == 0:
                    value, now = loss.item(), time.perf_counter()  # the loop's only host sync
                    rate = (step - mark[0]) * cfg.train.batch_size / max(now - mark[1], 1e-9)
                    mark = (step, now)
                    loss_curve["step"].append(step)
                    loss_curve["loss"].append(round(value, 6))
                    bar.set_postfix(epoch=epoch, loss=f"{value:.4f}", refresh=False)
                    if not cfg.train.progress:
                        logger.info("step %d/%d (epoch %d): loss %.4f, %.0f interactions/s",
                                    step, total_steps, epoch, value, rate)
                    if tb is not None:
                        tb.add_scalar("train/loss", value, step)
                        tb.add_scalar("train/interactions_per_s", rate, step)
                        for name, lr in lrs.items():
                            tb.add_scalar(f"train/{name}", lr, step)
                due = cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0
                if every_s and step % cfg.train.log_every_steps == 0:  # the ranks agree on the wall-clock trigger
                    late = torch.tensor([float(time.perf_counter() - saved["last"] >= every_s)], device=device)
                    if world > 1:
                        dist.all_reduce(late, op=dist.ReduceOp.MAX)
                    due = due or bool(late.item())
                if due:
                    checkpoint(epoch, n, float(loss_sum), False)
            if world > 1:
                dist.all_reduce(loss_sum)
            epoch_loss = float(loss_sum) / max(n, 1) / world
            record = {"epoch": epoch, "steps": step, "loss": epoch_loss, "wall_s": round(time.perf_counter() - t0, 3)}

            # ---- per-epoch validation (model selection) and, if asked, the test curve
            if valid_csr is not None or cfg.eval.test_every_epoch:
                t_eval = time.perf_counter()
                model_ = pipeline.detach().module.model
                dmp.eval()
                if valid_csr is not None:
                    record["valid"] = evaluate_model(model_, fit_features, data.num_items, fit_mask, valid_csr,
                                                     valid_ks, device, cfg.eval.user_chunk, users=data.valid_users,
                                                     **eval_kw)
                if cfg.eval.test_every_epoch:
                    record["test"] = evaluate_model(model_, full_features, data.num_items, train_mask, test_csr,
                                                    cfg.eval.ks, device, cfg.eval.user_chunk, users=data.test_users,
                                                    **eval_kw)
                if valid_csr is not None:
                    value = record["valid"][cfg.eval.select_metric]
                    if value > best["value"]:
                        best = {"epoch": epoch, "value": value, "weights": snapshot_weights(dmp)}
                        since_best = 0
                    else:
                        since_best += 1
                dmp.train()
                pipeline.attach(dmp)
                valid_s += time.perf_counter() - t_eval
                record["wall_s"] = round(time.perf_counter() - t0, 3)
                mark = (step, time.perf_counter())
            history.append(record)
            if tb is not None:
                tb.add_scalar("train/epoch_loss", epoch_loss, step)
                for split in ("valid", "test"):
                    for key, value in record.get(split, {}).items():
                        if key != "users":
                            tb.add_scalar(f"{split}/{key}", value, step)
            logger.info("epoch %d: %d steps, loss %.4f%s%s", epoch, step, epoch_loss,
                        f", valid {cfg.eval.select_metric} {record['valid'][cfg.eval.select_metric]:.4f}"
                        if "valid" in record else "",
                        f", test {cfg.eval.select_metric} {record['test'][cfg.eval.select_metric]:.4f}"
                        if "test" in record else "")
            if cfg.train.patience and since_best >= cfg.train.patience:
                logger.info("early stop: no better valid %s for %d epochs (best: epoch %d, %.4f)",
                            cfg.eval.select_metric, since_best, best["epoch"], best["value"])
                break
        closed_form_valid = None
        if mc.init == "spectral" and not history and not finished:  # no epoch: the closed form is the model
            if valid_csr is not None:  # evaluation time, not training time: the validation pass and the refit
                t_eval = time.perf_counter()
                model_ = pipeline.detach().module.model
                dmp.eval()
                closed_form_valid = evaluate_model(model_, fit_features, data.num_items, fit_mask, valid_csr, valid_ks,
                                                   device, cfg.eval.user_chunk, users=data.valid_users, **eval_kw)
                logger.info("closed-form tables: valid %s %.4f", cfg.eval.select_metric,
                            closed_form_valid[cfg.eval.select_metric])
                if mc.spectral_refit:
                    logger.info("recomputing the spectral tables from the whole training split for the test")
                    init_spectral(dmp, data.dataset.train_users, data.dataset.train_items, data.num_users,
                                  data.num_items, mc, cfg.seed, device)
                dmp.train()
                pipeline.attach(dmp)
                valid_s += time.perf_counter() - t_eval
        if cfg.train.checkpoint_at_end and not finished:
            checkpoint(epoch, 0, 0.0, True)
        wall = time.perf_counter() - t0
        bar.close()
        model_ = pipeline.detach().module.model  # the (sharded) TwoTower, its original forwards restored
        dmp.eval()
        if best["weights"] is not None:
            restore_weights(dmp, best["weights"])
            logger.info("restored the weights of epoch %d (best valid %s %.4f)", best["epoch"],
                        cfg.eval.select_metric, best["value"])

        # ---- stack: the spectral closed form appended to the trained towers, weighed on validation
        stack, base_model = None, model_
        if mc.stack_spectral_dim:
            model_, stack = stack_spectral(model_, data, stack_options(cfg), device,
                                           history[best["epoch"]]["valid"] if best["weights"] is not None else None)

        # ---- evaluate (model and popularity baseline, same evaluator)
        t_eval = time.perf_counter()
        test_metrics = evaluate_model(model_, full_features, data.num_items, train_mask, test_csr,
                                      cfg.eval.ks, device, cfg.eval.user_chunk, users=data.test_users, **eval_kw)
        metrics = {"test": test_metrics}
        if best["weights"] is not None:
            metrics["valid"] = history[best["epoch"]]["valid"]
            metrics["selected_epoch"] = best["epoch"]
        elif closed_form_valid is not None:
            metrics["valid"] = closed_form_valid
        if stack is not None:
            if "chosen_valid" in stack:  # the tested model's (validation tables from the fit part)
                metrics["valid"] = stack["chosen_valid"]
            metrics["stack"] = stack
        if cfg.eval.popularity:
            metrics["popularity"] = evaluate_popularity(data.item_counts(), train_mask, test_csr, cfg.eval.ks,
                                                        device, cfg.eval.user_chunk, users=data.test_users,
                                                        **eval_kw)
        eval_s = time.perf_counter() - t_eval
        train_s = wall - valid_s
        metrics["train"] = {
            "steps": step,
            "epochs": len(history),
            "wall_s": round(train_s, 3),
            "interactions_per_s": round(step * cfg.train.batch_size / max(train_s, 1e-9), 1),
            "world_size": world,
            "device": str(device),
            "history": history,
            "loss_curve": loss_curve,
        }
        metrics["eval"] = {"wall_s": round(eval_s, 3), "per_epoch_wall_s": round(valid_s, 3)}
        metrics["data"] = {"path": data_dir, **counts, "dropped": data.manifest["dropped"],
                           "loader": data.manifest.get("loader", "memory"), **data.eval_info}
        if "hash" in data.manifest:  # data.id_mapping=hash: distinct ids, rows used, collision rate
            metrics["data"]["hash"] = data.manifest["hash"]
        metrics["run_hash"] = rhash
        metrics["checkpoint"] = {"last": saved["path"], "written": saved["count"], "bytes": saved["bytes"],
                                 "seconds": round(saved["seconds"], 3), "resumed": resumed}
        if tb is not None:
            for part in ("test", "popularity"):
                for key, value in metrics.get(part, {}).items():
                    if key != "users":
                        tb.add_scalar(f"final/{part}_{key}", value, step)
            tb.flush()
        norms = None
        if cfg.log.plots:  # collective: every rank computes its share
            # the trained towers' norms (what was learnt), stacked or not
            norms = tower_norms(base_model, full_features, data.num_users, data.num_items, device,
                                cfg.eval.user_chunk, rank, world)
            if norms is not None:
                metrics["vectors"] = {"normalized": base_model.normalize,
                                      **{f"{name}_norm": count_quantiles(n) for name, (_, n) in norms.items()}}

        # ---- export
        if cfg.export.enabled:
            path = export_data(model_, full_features, data, run_dir / cfg.export.dir, device, config_hash,
                               options=cfg.export)
            metrics["export"] = {"dir": str(path) if path else str(run_dir / cfg.export.dir)}
            if path is not None and cfg.export.faiss != "none":  # rank 0: the ANN index's recall and speed
                metrics["export"]["faiss"] = json.loads((path / "manifest.json").read_text())["faiss"]
        if rank == 0:
            write_json_atomic(metrics, run_dir / "metrics.json")
            _report(metrics, cfg.eval.ks, run_dir)
            figures = {}
            if cfg.log.plots:
                figures = run_plots(run_dir, metrics, cfg.eval.ks, data.item_counts(), data.user_counts(), norms,
                                    base_model.normalize)
            path = write_summary(run_dir, metrics, cfg.eval.ks, figures, tb_dir if tb is not None else None)
            logger.info("summary: %s", path)
        return metrics
    finally:
        if tb is not None:
            tb.close()
        destroy_distributed()


def learning_rates(optimizer) -> Dict[str, float]:
    """The learning rate of each optimizer the pipeline steps: ``lr`` (tables), ``dense_lr`` (Adam)."""
    out = {}
    optimizers = [opt for _, opt in optimizer.optimizers]  # a torchrec CombinedOptimizer: (name, optimizer)
    for name, opt in zip(("lr", "dense_lr"), optimizers):
        groups = opt.param_groups
        if groups and "lr" in groups[0]:
            out[name] = float(groups[0]["lr"])
    return out


def _report(metrics: Dict, ks, run_dir: Path) -> None:
    rows = [("model", metrics["test"])]
    if "popularity" in metrics:
        rows.append(("popularity", metrics["popularity"]))
    header = "".join(f"{f'{m}@{k}':>12}" for k in ks for m in ("recall", "ndcg"))
    lines = [f"{'':<12}{header}"]
    for name, m in rows:
        lines.append(f"{name:<12}" + "".join(f"{m[f'{k_m}@{k}']:>12.4f}" for k in ks for k_m in ("recall", "ndcg")))
    t = metrics["train"]
    lines.append(f"{t['steps']} steps in {t['wall_s']:.1f}s ({t['interactions_per_s']:,.0f} interactions/s) "
                 f"on {t['world_size']} rank(s); {metrics['test']['users']} test users")
    lines.append(f"metrics: {run_dir / 'metrics.json'}")
    if "export" in metrics:
        lines.append(f"vectors: {metrics['export']['dir']}/items.parquet, users.parquet")
    print("\n".join(lines), flush=True)


register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> Optional[float]:
    cfg: Config = typed_config(dcfg)
    config_hash = hashlib.sha256(OmegaConf.to_yaml(dcfg, resolve=True).encode()).hexdigest()[:16]
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = train(cfg, run_dir, config_hash)
    except (ConfigError, DataError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics["test"].get(cfg.eval.select_metric)  # the objective a Hydra sweeper reads


if __name__ == "__main__":
    main()
