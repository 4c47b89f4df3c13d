"""Stack: the trained towers concatenated with the spectral closed form, weighed on validation.

With ``model.stack_spectral_dim=D`` (> 0) the model that is tested and exported after training is

    user(u) = [ trained_user(u),  w * c * spec_user(u) / |spec_user(u)| ]
    item(i) = [ trained_item(i),  spec_item(i) ]

so score(u, i) = trained score + w * c * (normalised) spectral score: still a dot product of
exported vectors (dimension ``embedding_dim + D``). The spectral vectors are those of the
closed-form two-tower of ``recsys.spectral`` (``spectral_tables``: the top D singular vectors of
the degree-normalised interactions, ``model.spectral_alpha``), the user's being the sum of the
context rows of the user's training items. c is one global scale that matches the spread of the
spectral scores to the trained model's (standard deviations of the scores of 500 sampled users
against every item), so that the weight w is comparable across datasets and models.

Selection is honest: the trained towers (the best validated epoch's weights, with the fit
histories) and spectral tables computed from the fit interactions only are scored on the
validation holdout for every w of ``model.stack_spectral_weights`` and for w = 0 (the trained
model alone); the best ``eval.select_metric`` wins (ties: the smaller w). When the best is the
largest (smallest) weight of the grid, w is doubled (halved) while that improves, at most
EXTEND_STEPS times, so that the grid need not be tuned to a dataset. The tables tested and
exported are then recomputed from the whole training split, as ``model.spectral_refit`` does for
the closed form alone. One weight needs no validation split (it is used as given).

The spectral tables are computed on rank 0 and broadcast; every rank keeps them whole (the
datasets this is for fit in memory: ``data.loader=memory``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recsys.config import EvalConfig
from recsys.data.eval_sets import EvalSets
from recsys.data.features import Batch
from recsys.data.source import DataSource
from recsys.distributed import rank_and_world
from recsys.evaluation.metrics import evaluate_model
from recsys.evaluation.vectors import all_vectors, item_tower, tower_outputs, user_tower
from recsys.spectral import broadcast_tables, spectral_tables

logger = logging.getLogger(__name__)

SCALE_USERS = 500  # users sampled to match the spreads of the two scores
EXTEND_STEPS = 4  # factors of 2 tried beyond an edge of the weight grid when the best is there


class StackedTowers:
    """A two-tower model (plain or sharded) with fixed spectral vectors appended to its outputs.

    Has the interface the evaluator and the export use (``embedding_dim``, ``normalize``,
    ``user_vectors(batch)``, ``item_vectors(batch)``): `unit_users` (spectral user vectors of norm
    1, or 0) and `spec_items` are full [rows, D] tables indexed by the batch's rows, `scale`
    multiplies the user part."""

    def __init__(self, base: nn.Module, unit_users: torch.Tensor, spec_items: torch.Tensor, scale: float) -> None:
        self.base = base
        self.spec_users = unit_users
        self.spec_items = spec_items
        self.scale = float(scale)
        self.embedding_dim = base.embedding_dim + spec_items.shape[1]
        self.normalize = False  # the stacked vectors are scored by their dot product

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        u = self.base.user_vectors(batch)
        spec = self.spec_users[batch.user_ids.cpu()].to(u.device)
        return torch.cat([u.float(), self.scale * spec], 1)

    def item_vectors(self, batch: Batch) -> torch.Tensor:
        i = self.base.item_vectors(batch)
        return torch.cat([i.float(), self.spec_items[batch.item_ids.cpu()].to(i.device)], 1)


def spectral_vectors(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, dim: int,
                     alpha: float, niter: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(user, item) vectors of the spectral closed form of the (user, item) pairs (repeated pairs
    counted once): item = the ``item`` table, user = sum of the ``history`` rows of its items,
    scaled to norm 1 (users without pairs: 0). Computed in float64 and rounded to float32 once, at
    the end, so that a recomputation gives the same vectors (``recsys.spectral``'s docstring)."""
    tables = spectral_tables(users, items, num_users, num_items, dim, alpha, niter, seed, dtype=torch.float64)
    keys = np.unique(users.astype(np.int64) * num_items + items)
    rows = torch.from_numpy(np.stack([keys // num_items, keys % num_items]))
    history = torch.sparse_coo_tensor(rows, torch.ones(len(keys), dtype=torch.float64), (num_users, num_items),
                                      check_invariants=True).coalesce()
    users = torch.sparse.mm(history, tables["history"])
    users = users / users.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return users.float(), tables["item"].float()


def _broadcast_vectors(pairs: Optional[Tuple[np.ndarray, np.ndarray]], num_users: int, num_items: int, dim: int,
                       alpha: float, niter: int, seed: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """`spectral_vectors` computed on rank 0 (which alone needs `pairs`), on every rank (CPU)."""
    tables = None
    if rank_and_world()[0] == 0:
        users, items = spectral_vectors(*pairs, num_users, num_items, dim, alpha, niter, seed)
        tables = {"users": users, "items": items}
    tables = broadcast_tables(tables, {"users": (num_users, dim), "items": (num_items, dim)}, device=device)
    return tables["users"], tables["items"]


@torch.no_grad()
def score_scale(base: nn.Module, features, unit_users: torch.Tensor, spec_items: torch.Tensor,
                device: torch.device, chunk: int, seed: int) -> float:
    """std(trained scores) / std(unit spectral scores) over SCALE_USERS sampled users x every item,
    in float64 (a float32 sum over all the scores would depend on the summation order). Collective
    (the trained towers may be sharded); the same value on every rank."""
    num_users, num_items = unit_users.shape[0], spec_items.shape[0]
    users = np.sort(np.random.default_rng(seed).choice(num_users, min(SCALE_USERS, num_users), replace=False))
    items = all_vectors(item_tower(base, features, device), num_items, base.embedding_dim, device, chunk).double()
    user_vecs = tower_outputs(user_tower(base, features, device), users, -(-len(users) // chunk), chunk,
                              base.embedding_dim, device).double()
    unit = unit_users[torch.from_numpy(users)].double()
    trained = (user_vecs @ items.T).std().item()
    spectral = (unit.to(device) @ spec_items.to(device).double().T).std().item()
    value = torch.tensor([trained / max(spectral, 1e-12)], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(value, src=0)  # bit-identical on every rank
    return float(value.item())


@dataclass
class StackOptions:
    """What `stack_spectral` needs besides the model and the data (``model.stack_spectral_*``,
    ``model.spectral_alpha`` / ``spectral_niter``, the run's seed and its evaluation options)."""

    dim: int
    weights: Sequence[float]
    alpha: float
    niter: int
    seed: int
    eval: EvalConfig
    """The selection metric (``select_metric``), its Ks (``valid_ks``) and the block sizes."""


def stack_spectral(base: nn.Module, data: DataSource, sets: EvalSets, options: StackOptions, device: torch.device,
                   base_valid: Optional[Dict[str, float]] = None) -> Tuple[nn.Module, Dict]:
    """The model to test and export: `base` stacked with the spectral closed form at the weight
    chosen on the validation holdout (or the one weight given), and what was measured.

    `data`: an in-memory source (its training pairs); `sets`: its evaluation splits (the
    validation one chooses, the test one's model inputs are those of the refit); `base_valid`:
    the trained model's validation metrics when already known (else evaluated here). Collective.
    Returns `base` itself when w = 0 wins. ``info["chosen_valid"]``: the validation metrics of
    the returned model (validation tables from the fit part), when there is a holdout."""
    t0 = time.perf_counter()
    n_u, n_i = data.num_users, data.num_items
    weights = sorted({float(w) for w in options.weights})
    metric, chunk = options.eval.select_metric, options.eval.user_chunk
    info: Dict = {"dim": options.dim, "alpha": options.alpha, "weights": weights}
    rank = rank_and_world()[0]

    def validate(model) -> Dict[str, float]:
        return evaluate_model(model, sets.valid, options.eval.valid_ks, device, options.eval)

    chosen = weights[0]
    if sets.valid is not None:
        logger.info("stacking the spectral closed form (dim %d): weights %s on the validation holdout (spectral "
                    "tables from the %d fit interactions)", options.dim, weights, data.num_fit)
        spec_u, spec_i = _broadcast_vectors(data.pairs(include_valid=False) if rank == 0 else None, n_u, n_i,
                                            options.dim, options.alpha, options.niter, options.seed, device)
        scale = score_scale(base, sets.valid.features, spec_u, spec_i, device, chunk, options.seed)
        grid = {}
        if len(weights) > 1:  # the trained model alone is a candidate
            grid["0.0"] = base_valid if base_valid is not None else validate(base)
            logger.info("  w 0 (trained model alone): valid %s %.4f", metric, grid["0.0"][metric])
            chosen = 0.0

        def better(w: float) -> bool:
            """Validate weight w; whether it beats the chosen one (ties keep the smaller weight)."""
            grid[str(w)] = validate(StackedTowers(base, spec_u, spec_i, w * scale))
            logger.info("  w %s: valid %s %.4f", w, metric, grid[str(w)][metric])
            return grid[str(w)][metric] > grid[str(chosen)][metric]

        for w in weights:
            if better(w) and len(weights) > 1:
                chosen = w
        if len(weights) > 1 and chosen in (weights[0], weights[-1]):  # the best at an edge of the grid:
            factor = 2.0 if chosen == weights[-1] else 0.5              # go on while it improves
            for _ in range(EXTEND_STEPS):
                w = chosen * factor
                if not better(w):
                    break
                chosen = w
        del spec_u, spec_i
        info.update(valid_scale=scale, valid=grid, chosen_valid=grid[str(chosen)],
                    valid_seconds=round(time.perf_counter() - t0, 3))
    info["chosen_weight"] = chosen
    if chosen == 0.0:
        logger.info("stacking: the trained model alone is best on validation; it is tested and exported as it is")
        info["seconds"] = round(time.perf_counter() - t0, 3)
        return base, info
    pairs = data.pairs() if rank == 0 else None
    logger.info("stacking: w %s chosen; spectral tables from all %d training interactions", chosen,
                data.manifest["counts"]["train_interactions"])
    spec_u, spec_i = _broadcast_vectors(pairs, n_u, n_i, options.dim, options.alpha, options.niter, options.seed,
                                        device)
    scale = score_scale(base, sets.test.features, spec_u, spec_i, device, chunk, options.seed)
    info.update(test_scale=scale, seconds=round(time.perf_counter() - t0, 3))
    return StackedTowers(base, spec_u, spec_i, chosen * scale), info
