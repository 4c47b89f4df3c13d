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

No rank holds the world: the closed form is computed over all ranks (``recsys.spectral``), each
rank reading the training pairs of its own users (its rows of the user table, ``own_rows``:
the users it evaluates and exports) and keeping the spectral vectors of those users only; the
item side ([items x D]) is the same on every rank. Either loader works (a streamed dataset is
read in one pass per rank).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from recsys.config import EvalConfig
from recsys.data.eval_sets import EvalSets
from recsys.data.features import Batch
from recsys.data.source import DataSource
from recsys.distributed import all_reduce_sum, own_rows, owned_share
from recsys.evaluation.metrics import evaluate_model
from recsys.evaluation.vectors import all_vectors, item_tower, tower_outputs, user_tower
from recsys.spectral import CPU, spectral_tables

logger = logging.getLogger(__name__)

SCALE_USERS = 500  # users sampled to match the spreads of the two scores
SCORE_BLOCK = 1 << 22  # scores (float64) held at once when measuring their spreads
EXTEND_STEPS = 4  # factors of 2 tried beyond an edge of the weight grid when the best is there


class StackedTowers:
    """A two-tower model (plain or sharded) with fixed spectral vectors appended to its outputs.

    Has the interface the evaluator and the export use (``embedding_dim``, ``normalize``,
    ``user_vectors(batch)``, ``item_vectors(batch)``): `spec` holds the spectral vectors (this
    rank's users' of norm 1, or 0; every item's), `scale` multiplies the user part. A user row
    outside this rank's users gets a zero spectral part: only the padding of a collective lookup
    asks for one (each rank evaluates and exports its own users)."""

    def __init__(self, base: nn.Module, spec: "SpectralVectors", scale: float) -> None:
        self.base = base
        self.spec = spec
        self.scale = float(scale)
        self.embedding_dim = base.embedding_dim + spec.items.shape[1]
        self.normalize = False  # the stacked vectors are scored by their dot product

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        u = self.base.user_vectors(batch)
        return torch.cat([u.float(), self.scale * self.spec.of_users(batch.user_ids.cpu()).to(u.device)], 1)

    def item_vectors(self, batch: Batch) -> torch.Tensor:
        i = self.base.item_vectors(batch)
        return torch.cat([i.float(), self.spec.items[batch.item_ids.cpu()].to(i.device)], 1)


@dataclass
class SpectralVectors:
    """The spectral closed form's vectors a rank holds: its users' (rows [lo, hi) of the user
    table, norm 1 or 0) and every item's."""

    users: torch.Tensor
    lo: int
    items: torch.Tensor

    def of_users(self, rows: torch.Tensor) -> torch.Tensor:
        """The vectors of user `rows` (zero for a row outside this rank's users)."""
        local = rows.long() - self.lo
        inside = (local >= 0) & (local < len(self.users))
        out = torch.zeros(len(rows), self.users.shape[1], dtype=self.users.dtype)
        out[inside] = self.users[local[inside]]
        return out


def spectral_vectors(data: DataSource, include_valid: bool, dim: int, alpha: float, niter: int, seed: int,
                     device: torch.device = CPU) -> SpectralVectors:
    """The vectors of the spectral closed form of the data's training pairs (`include_valid`: with
    the validation holdout, or its fit part only; repeated pairs counted once): item = the ``item``
    table, user = sum of the ``history`` rows of its items, scaled to norm 1 (users without pairs:
    0), this rank's users only. Computed in float64 and rounded to float32 once, at the end, so
    that a recomputation gives the same vectors (``recsys.spectral``'s docstring). Collective."""
    lo, hi = own_rows(data.num_users)
    users, items = data.pairs(include_valid, lo, hi)
    tables, keys = spectral_tables(users, items, lo, hi, data.num_users, data.num_items, dim, alpha, niter, seed,
                                   dtype=torch.float64, device=device)
    rows = torch.from_numpy(np.stack([keys // data.num_items, keys % data.num_items]))
    history = torch.sparse_coo_tensor(rows, torch.ones(len(keys), dtype=torch.float64), (hi - lo, data.num_items),
                                      check_invariants=True).coalesce()
    user_vecs = torch.sparse.mm(history, tables["history"])
    user_vecs = user_vecs / user_vecs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return SpectralVectors(user_vecs.float(), lo, tables["item"].float())


def _std(total: float, squares: float, count: float) -> float:
    """The (unbiased) standard deviation of `count` values from their sum and sum of squares."""
    return float(np.sqrt(max(squares - total * total / count, 0.0) / max(count - 1, 1.0)))


@torch.no_grad()
def score_scale(base: nn.Module, features, spec: SpectralVectors, num_users: int, device: torch.device, chunk: int,
                seed: int) -> float:
    """std(trained scores) / std(unit spectral scores) over SCALE_USERS sampled users x every item,
    in float64 (sums and sums of squares, each rank over its sampled users a block of items at a
    time, added over ranks).
    Collective (the trained towers may be sharded); the same value on every rank."""
    num_items = spec.items.shape[0]
    sample = np.sort(np.random.default_rng(seed).choice(num_users, min(SCALE_USERS, num_users), replace=False))
    mine, max_mine = owned_share(sample, num_users)
    items = all_vectors(item_tower(base, features, device), num_items, base.embedding_dim, device, chunk).double()
    user_vecs = tower_outputs(user_tower(base, features, device), mine, -(-max_mine // chunk), chunk,
                              base.embedding_dim, device).double()
    unit = spec.of_users(torch.from_numpy(mine)).double().to(device)
    spec_items = spec.items.to(device).double()
    sums = np.zeros(4)
    block = max(1, SCORE_BLOCK // max(len(mine), 1))  # [users x block] scores at a time
    for start in range(0, num_items, block):
        for k, scores in enumerate((user_vecs @ items[start:start + block].T, unit @ spec_items[start:start + block].T)):
            sums[2 * k] += scores.sum().item()
            sums[2 * k + 1] += (scores * scores).sum().item()
    sums = all_reduce_sum(torch.from_numpy(sums), device).numpy()
    count = float(len(sample) * num_items)
    return _std(sums[0], sums[1], count) / max(_std(sums[2], sums[3], count), 1e-12)


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

    `data`: the data source (each rank reads its users' training pairs); `sets`: its evaluation
    splits (the validation one chooses, the test one's model inputs are those of the refit); `base_valid`:
    the trained model's validation metrics when already known (else evaluated here). Collective.
    Returns `base` itself when w = 0 wins. ``info["chosen_valid"]``: the validation metrics of
    the returned model (validation tables from the fit part), when there is a holdout."""
    t0 = time.perf_counter()
    n_u = data.num_users
    weights = sorted({float(w) for w in options.weights})
    metric, chunk = options.eval.select_metric, options.eval.user_chunk
    info: Dict = {"dim": options.dim, "alpha": options.alpha, "weights": weights}

    def validate(model) -> Dict[str, float]:
        return evaluate_model(model, sets.valid, options.eval.valid_ks, device, options.eval)

    chosen = weights[0]
    if sets.valid is not None:
        logger.info("stacking the spectral closed form (dim %d): weights %s on the validation holdout (spectral "
                    "tables from the %d fit interactions)", options.dim, weights, data.num_fit)
        spec = spectral_vectors(data, False, options.dim, options.alpha, options.niter, options.seed, device)
        scale = score_scale(base, sets.valid.features, spec, n_u, device, chunk, options.seed)
        grid = {}
        if len(weights) > 1:  # the trained model alone is a candidate
            grid["0.0"] = base_valid if base_valid is not None else validate(base)
            logger.info("  w 0 (trained model alone): valid %s %.4f", metric, grid["0.0"][metric])
            chosen = 0.0

        def better(w: float) -> bool:
            """Validate weight w; whether it beats the chosen one (ties keep the smaller weight)."""
            grid[str(w)] = validate(StackedTowers(base, spec, w * scale))
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
        del spec
        info.update(valid_scale=scale, valid=grid, chosen_valid=grid[str(chosen)],
                    valid_seconds=round(time.perf_counter() - t0, 3))
    info["chosen_weight"] = chosen
    if chosen == 0.0:
        logger.info("stacking: the trained model alone is best on validation; it is tested and exported as it is")
        info["seconds"] = round(time.perf_counter() - t0, 3)
        return base, info
    logger.info("stacking: w %s chosen; spectral tables from all %d training interactions", chosen,
                data.manifest["counts"]["train_interactions"])
    spec = spectral_vectors(data, True, options.dim, options.alpha, options.niter, options.seed, device)
    scale = score_scale(base, sets.test.features, spec, n_u, device, chunk, options.seed)
    info.update(test_scale=scale, seconds=round(time.perf_counter() - t0, 3))
    return StackedTowers(base, spec, chosen * scale), info
