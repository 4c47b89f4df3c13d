"""The training loop: epochs of pipelined steps, evaluation between epochs, checkpoints when due.

``train_epochs`` runs from wherever ``TrainState`` is (a fresh start or a resumed checkpoint,
mid-epoch included: the epoch's first batches are skipped, their loss sum carried) until the
epochs or ``train.max_steps`` are done or early stopping ends it. TorchRec's
``TrainPipelineSparseDist`` owns the step (input all-to-all of the next batch overlapping the
current one, forward, backward with the fused table optimizer, dense optimizer step). After each
epoch the evaluation it was given runs on the model (validation for model selection, the test
curve), the best epoch's weights are kept; the loss is averaged over all ranks.

The per-epoch evaluation is passed in (``recsys.evaluation.metrics.epoch_evaluator``): the
evaluation stage sits above training.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from recsys.data.batches import BatchOptions, built_ahead
from recsys.data.source import DataSource
from recsys.parallelize import snapshot_weights
from recsys.training.checkpoint import Checkpointer
from recsys.training.progress import TrainLog
from recsys.training.state import TrainState

logger = logging.getLogger("recsys.train")

Evaluate = Callable[[torch.nn.Module], Dict[str, Dict]]
"""model -> {"valid": metrics, "test": metrics} (either or both), collective."""


@dataclass(frozen=True)
class LoopOptions:
    epochs: int
    total_steps: int
    """At most this many steps in all (the epochs' steps, capped by ``train.max_steps``)."""
    select_metric: str
    """The validation metric that picks the best epoch (``eval.select_metric``)."""
    patience: int
    """Stop after this many validations without improvement (0: never)."""
    check_clock_every: int
    """Steps between looks at the wall-clock checkpoint trigger (``train.log_every_steps``)."""
    prefetch_batches: int = 4
    """Batches built ahead in a background thread (``train.prefetch_batches``; 0: none)."""


def train_epochs(dmp, optimizer, device: torch.device, data: DataSource, batches: BatchOptions, state: TrainState,
                 options: LoopOptions, checkpointer: Checkpointer, log: TrainLog,
                 evaluate: Optional[Evaluate]) -> torch.nn.Module:
    """Train from `state` on (see the module docstring); returns the trained model (the sharded
    ``TwoTower`` inside `dmp`, with its own forwards, in eval mode). Collective."""
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
    dmp.train()
    log.reset_rate(state.step)
    checkpointer.start_clock()
    world, first = batches.world_size, state.epoch
    for epoch in range(first, options.epochs):
        if state.finished:
            break
        if epoch != first:
            state.batch, state.loss_sum = 0, 0.0
        skip = state.batch  # batches of this epoch done before a resume
        state.epoch = epoch
        if state.step >= options.total_steps and skip == 0:
            break
        loss_sum = torch.tensor(state.loss_sum, dtype=torch.float64, device=device)
        epoch_batches = data.batches(batches, epoch, skip, options.total_steps - state.step + skip)
        with closing(built_ahead(epoch_batches, options.prefetch_batches, device)) as it:
            while True:
                try:
                    (loss,) = pipeline.progress(it)
                except StopIteration:
                    break
                loss_sum += loss.double()
                state.batch += 1
                state.step += 1
                log.step(state, loss)
                checkpointer.save_if_due(state, dmp, optimizer, loss_sum,
                                         state.step % options.check_clock_every == 0)
        if world > 1:
            dist.all_reduce(loss_sum)
        record = {"epoch": epoch, "steps": state.step, "loss": float(loss_sum) / max(state.batch, 1) / world,
                  "wall_s": round(state.elapsed(), 3)}
        if evaluate is not None:
            t_eval = time.perf_counter()
            model = pipeline.detach().module.model
            dmp.eval()
            record.update(evaluate(model))
            if "valid" in record:
                state.observe(record["valid"][options.select_metric], epoch, lambda: snapshot_weights(dmp))
            dmp.train()
            pipeline.attach(dmp)
            state.valid_s += time.perf_counter() - t_eval
            record["wall_s"] = round(state.elapsed(), 3)
            log.reset_rate(state.step)
        state.history.append(record)
        log.epoch(record, state.step)
        if options.patience and state.since_best >= options.patience:
            logger.info("early stop: no better valid %s for %d epochs (best: epoch %d, %.4f)", options.select_metric,
                        state.since_best, state.best_epoch, state.best_value)
            break
    model = pipeline.detach().module.model  # the (sharded) TwoTower, its original forwards restored
    dmp.eval()
    return model
