"""The end of a run: stack, evaluate, export. One function for the three commands that end a run.

``recsys.train`` calls ``finish_run`` after the loop (the selected epoch's weights restored),
``recsys.evaluate`` and ``recsys.export`` after loading a checkpoint; each asks for the parts it
needs:

1. stack the spectral closed form onto the trained towers, the weight chosen on validation
   (``model.stack_spectral_dim``, ``recsys.stack``);
2. evaluate the final model on the test split, its validation metrics (known already, from the
   stacking or the selected epoch, or evaluated now) and the popularity baseline;
3. export every vector with its raw id and the serving artefacts (``recsys.exporter``);
4. the norms of the trained towers' raw outputs (for the run's plots).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from recsys.config import Config, EvalConfig, ExportConfig
from recsys.data.eval_sets import EvalSets
from recsys.data.source import DataSource
from recsys.evaluation.metrics import evaluate_model, evaluate_popularity, feature_popularity
from recsys.evaluation.vectors import tower_norms
from recsys.exporter import export_data
from recsys.memory import PhasePeaks
from recsys.stack import StackOptions, stack_spectral


def stack_options(cfg: Config) -> Optional[StackOptions]:
    """What stacking needs from a run's config; None without ``model.stack_spectral_dim``."""
    m = cfg.model
    if not m.stack_spectral_dim:
        return None
    return StackOptions(dim=m.stack_spectral_dim, weights=list(m.stack_spectral_weights), alpha=m.spectral_alpha,
                        niter=m.spectral_niter, seed=cfg.seed, eval=cfg.eval)


@dataclass
class ExportTarget:
    """Where and how the end of a run exports."""

    dir: Path
    options: ExportConfig
    config_hash: str
    """Recorded in the export's manifest: the run's config."""


@dataclass
class RunEnd:
    """What the end of a run produced."""

    base: Any
    """The trained (sharded) towers."""
    model: Any
    """The final model: the trained towers, stacked or not (what was tested and exported)."""
    metrics: Dict[str, Any] = field(default_factory=dict)
    """``test``, ``valid``, ``popularity``, ``stack``, ``test_all`` (over all test interactions, those
    without a vector missed), ``cold_items`` (as the run's metrics.json names them)."""
    eval_s: float = 0.0
    """Time of the test and popularity evaluations."""
    export_dir: Optional[Path] = None
    """The export directory (rank 0: once written)."""
    export_manifest: Optional[Dict[str, Any]] = None
    """Its manifest (rank 0)."""
    norms: Optional[Dict[str, tuple]] = None
    """Rank 0: the trained towers' raw output norms of a sample of users and items."""


def finish_run(base, data: DataSource, sets: Optional[EvalSets], device: torch.device, eval_cfg: EvalConfig, *,
               stack: Optional[StackOptions] = None, evaluate: bool = True, valid: Optional[Dict] = None,
               evaluate_valid: bool = False, base_valid: Optional[Dict] = None, norms: bool = False,
               export: Optional[ExportTarget] = None, peaks: Optional[PhasePeaks] = None) -> RunEnd:
    """Stack (`stack`), evaluate (`evaluate`: the test split and, with ``eval.popularity``, the
    baseline; the validation metrics are `valid` when known, else those of the stacking's choice,
    else evaluated with `evaluate_valid`), compute the towers' norms (`norms`) and export
    (`export`). `base`: the trained (sharded) model, weights as tested; `base_valid`: its validation
    metrics when known (the stacking's w = 0); `sets`: the data's evaluation sets (needed to stack
    or evaluate). The norms and the export use the whole training split's model inputs. `peaks`:
    this rank's peak memory, marked after each part. Collective."""
    end = RunEnd(base, base)
    mark = peaks.mark if peaks is not None else (lambda phase: None)
    if stack is not None:
        end.model, end.metrics["stack"] = stack_spectral(base, data, sets, stack, device, base_valid)
        valid = end.metrics["stack"].get("chosen_valid", valid)  # the tested model's (tables from the fit part)
        mark("closed form")
    t0 = time.perf_counter()
    if evaluate:
        end.metrics["test"] = evaluate_model(end.model, sets.test, eval_cfg.ks, device, eval_cfg, all_test=True)
        if valid is None and evaluate_valid and sets.valid is not None:
            valid = evaluate_model(end.model, sets.valid, eval_cfg.valid_ks, device, eval_cfg)
        if valid is not None:
            end.metrics["valid"] = valid
        if eval_cfg.popularity:
            end.metrics["popularity"] = evaluate_popularity(data.item_counts(), sets.test, eval_cfg.ks, device,
                                                            eval_cfg, all_test=True)
        all_test = {name: end.metrics[name].pop("all") for name in ("test", "popularity")
                    if "all" in end.metrics.get(name, {})}
        if all_test:  # over every test interaction, those without a vector missed
            end.metrics["test_all"] = {"model" if name == "test" else name: m for name, m in all_test.items()}
        if sets.cold is not None:  # items without a training interaction: vectors from features alone
            cold = {"model": evaluate_model(end.model, sets.cold, eval_cfg.ks, device, eval_cfg)}
            if eval_cfg.popularity:
                cold["feature_popularity"] = evaluate_popularity(feature_popularity(data.side["item"],
                                                                                    data.item_counts()),
                                                                 sets.cold, eval_cfg.ks, device, eval_cfg)
            end.metrics["cold_items"] = cold
    end.eval_s = time.perf_counter() - t0
    mark("evaluation")
    if norms:  # the trained towers' (what was learnt), stacked or not
        end.norms = tower_norms(base, data.features(), data.num_users, data.num_items, device, eval_cfg.user_chunk)
    if export is not None:
        end.export_dir = export_data(end.model, data.features(), data, export.dir, device, export.config_hash,
                                     options=export.options)
        if end.export_dir is not None:
            end.export_manifest = json.loads((end.export_dir / "manifest.json").read_text())
        mark("export")
    return end
