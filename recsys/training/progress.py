"""What the training loop reports while it runs (rank 0): a tqdm bar counting interactions with
their throughput, a log line every ``train.log_every_steps`` steps when the bar is off, the loss
curve, one line per epoch, and TensorBoard scalars (``log.tensorboard``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
from tqdm import tqdm

from recsys.training.state import TrainState

logger = logging.getLogger("recsys.train")


def learning_rates(optimizer) -> Dict[str, float]:
    """The learning rate of each optimizer the pipeline steps: ``lr`` (tables), ``dense_lr`` (Adam)."""
    out = {}
    optimizers = [opt for _, opt in optimizer.optimizers]  # a torchrec CombinedOptimizer: (name, optimizer)
    for name, opt in zip(("lr", "dense_lr"), optimizers):
        groups = opt.param_groups
        if groups and "lr" in groups[0]:
            out[name] = float(groups[0]["lr"])
    return out


class TrainLog:
    """Reports of one training run; every rank makes one, rank 0's reports. The loss is read back
    from the device (the loop's only host sync) on rank 0 every `every_steps` steps."""

    def __init__(self, state: TrainState, total_steps: int, batch_size: int, every_steps: int, rank: int,
                 show_bar: bool, tensorboard_dir: Optional[Path], resumed: bool, learning_rates: Dict[str, float],
                 select_metric: str) -> None:
        self.total_steps, self.batch_size, self.every_steps = total_steps, batch_size, every_steps
        self.rank, self.show_bar, self.lrs, self.select_metric = rank, show_bar, learning_rates, select_metric
        self.tb = None
        if rank == 0 and tensorboard_dir is not None:
            # Imported here: tensorboard takes seconds to import and most runs do not write it.
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=state.step if resumed else None)
        self.bar = tqdm(total=total_steps * batch_size, initial=state.step * batch_size, unit=" interactions",
                        unit_scale=True, dynamic_ncols=True, disable=rank != 0 or not show_bar, desc="train",
                        mininterval=1.0)
        self.reset_rate(state.step)

    def reset_rate(self, step: int) -> None:
        """Throughput is measured from here (after an evaluation, which is not training time)."""
        self.mark = (step, time.perf_counter())

    def step(self, state: TrainState, loss: torch.Tensor) -> None:
        self.bar.update(self.batch_size)
        step = state.step
        if self.rank != 0 or step % self.every_steps:
            return
        value, now = loss.item(), time.perf_counter()
        rate = (step - self.mark[0]) * self.batch_size / max(now - self.mark[1], 1e-9)
        self.mark = (step, now)
        state.loss_curve["step"].append(step)
        state.loss_curve["loss"].append(round(value, 6))
        self.bar.set_postfix(epoch=state.epoch, loss=f"{value:.4f}", refresh=False)
        if not self.show_bar:
            logger.info("step %d/%d (epoch %d): loss %.4f, %.0f interactions/s", step, self.total_steps, state.epoch,
                        value, rate)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", value, step)
            self.tb.add_scalar("train/interactions_per_s", rate, step)
            for name, lr in self.lrs.items():
                self.tb.add_scalar(f"train/{name}", lr, step)

    def epoch(self, record: Mapping, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar("train/epoch_loss", record["loss"], step)
            for split in ("valid", "test"):
                for key, value in record.get(split, {}).items():
                    if key != "users":
                        self.tb.add_scalar(f"{split}/{key}", value, step)
        metric = self.select_metric
        logger.info("epoch %d: %d steps, loss %.4f%s%s", record["epoch"], step, record["loss"],
                    f", valid {metric} {record['valid'][metric]:.4f}" if "valid" in record else "",
                    f", test {metric} {record['test'][metric]:.4f}" if "test" in record else "")

    def final(self, metrics: Mapping, step: int) -> None:
        """The run's final test and popularity figures (TensorBoard)."""
        if self.tb is not None:
            for part in ("test", "popularity"):
                for key, value in metrics.get(part, {}).items():
                    if key != "users":
                        self.tb.add_scalar(f"final/{part}_{key}", value, step)
            self.tb.flush()

    def close_bar(self) -> None:
        self.bar.close()

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
