"""The training loop's state: one typed object, saved and restored in one place.

``TrainState`` is where the loop is (step, epoch, batches of the epoch done, finished), what it
has recorded (one record per epoch, the loss curve), model selection (the best epoch, its value,
epochs since, the best weights) and time. ``state_dict`` / ``load_state_dict`` are the ``loop``
entry of a checkpoint's meta.json (with the step and each rank's loss sum beside it); the best
weights travel with the model through DCP (``recsys.training.checkpoint``). torchtitan's
``TrainState`` is the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


@dataclass
class TrainState:
    """Where the loop is and what it has seen (see the module docstring)."""

    step: int = 0
    """Steps done (over all epochs)."""
    epoch: int = 0
    """The epoch in progress (the last one once training has ended)."""
    batch: int = 0
    """Batches of ``epoch`` done."""
    finished: bool = False
    """Training ended (a checkpoint of a finished run is evaluated and exported, not trained further)."""
    history: List[Dict[str, Any]] = field(default_factory=list)
    """One record per epoch: ``epoch``, ``steps``, ``loss``, ``wall_s`` and the epoch's ``valid`` / ``test`` metrics."""
    loss_curve: Dict[str, Any] = field(default_factory=lambda: {"every_steps": 0, "step": [], "loss": []})
    """Rank 0's batch loss every ``train.log_every_steps`` steps."""
    since_best: int = 0
    """Validations since the best one (early stopping)."""
    best_epoch: Optional[int] = None
    best_value: float = -1.0
    best_weights: Optional[List[torch.Tensor]] = None
    """This rank's copy of the best epoch's weights (``recsys.parallelize.snapshot_weights``)."""
    valid_s: float = 0.0
    """Time spent evaluating inside the loop (not training time)."""
    train_wall_s: float = 0.0
    """Wall time of the loop so far, in-loop evaluation included (carried over a resume)."""
    loss_sum: float = 0.0
    """This rank's loss summed over the batches of ``epoch`` done (carried over a resume)."""
    pretrained: Optional[Dict[str, Any]] = None
    """How many rows started from pre-trained vectors (``recsys.training.pretrained``), by table."""
    warm_start: Optional[Dict[str, Any]] = None
    """How many rows an earlier run's tables gave (``recsys.training.warm_start``), by table."""
    _clock_start: float = field(default=0.0, repr=False)

    # ---- time

    def start_clock(self) -> None:
        """The loop (re)starts now: its wall time goes on from ``train_wall_s``."""
        self._clock_start = time.perf_counter() - self.train_wall_s

    def elapsed(self) -> float:
        """Wall time of the loop so far."""
        return time.perf_counter() - self._clock_start

    # ---- model selection

    def observe(self, value: float, epoch: int, snapshot) -> bool:
        """Record an epoch's validation value; keep its weights (``snapshot()``) when it is the best so
        far. Returns whether it is."""
        if value > self.best_value:
            self.best_epoch, self.best_value, self.best_weights = epoch, value, snapshot()
            self.since_best = 0
            return True
        self.since_best += 1
        return False

    # ---- checkpoint

    def state_dict(self) -> Dict[str, Any]:
        """The JSON state a checkpoint records as ``loop`` (the step and the loss sums go beside it)."""
        return {"epoch": self.epoch, "batch": self.batch, "finished": self.finished, "history": self.history,
                "loss_curve": self.loss_curve, "since_best": self.since_best, "best_epoch": self.best_epoch,
                "best_value": self.best_value, "valid_s": self.valid_s, "train_wall_s": self.elapsed(),
                "pretrained": self.pretrained, "warm_start": self.warm_start}

    def load_state_dict(self, loop: Dict[str, Any], step: int, loss_sums: List[float], rank: int, world: int,
                        best_weights: Optional[List[torch.Tensor]]) -> None:
        """Restore a checkpoint's state: `loop` (``state_dict``), its `step`, the loss sums of the
        ranks that wrote it and this rank's copy of the best weights. Written by another world size,
        the epoch's mean loss stays the same: rank 0 carries sum(loss_sums) * world / their world."""
        self.step, self.epoch, self.batch, self.finished = step, loop["epoch"], loop["batch"], loop["finished"]
        self.history, self.loss_curve, self.since_best = loop["history"], loop["loss_curve"], loop["since_best"]
        self.best_epoch, self.best_value, self.best_weights = loop["best_epoch"], loop["best_value"], best_weights
        self.valid_s, self.train_wall_s = loop["valid_s"], loop["train_wall_s"]
        self.pretrained = loop.get("pretrained")  # absent from checkpoints written before it existed
        self.warm_start = loop.get("warm_start")
        if len(loss_sums) == world:
            self.loss_sum = loss_sums[rank]
        else:
            self.loss_sum = sum(loss_sums) * world / len(loss_sums) if rank == 0 else 0.0
