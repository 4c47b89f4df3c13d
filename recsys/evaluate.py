"""Evaluate a trained run from its newest complete checkpoint, without training.

    python -m recsys.evaluate eval.run_dir=outputs/DATE/TIME [train.device=cpu]
    torchrun --nproc_per_node 2 -m recsys.evaluate eval.run_dir=outputs/DATE/TIME

The checkpoint's recorded config rebuilds the model, its data and its evaluation sets (the
dataset is prepared again if it moved); the end of the run (``recsys.finish``) then evaluates
what training tested: the test split, the validation split and the popularity baseline as the
run had them, stacked with the spectral closed form when the run was (its weight chosen again on
validation). Rank 0 writes ``<run_dir>/eval.json`` and prints the table ``recsys.train`` prints.
Of the command line's config only ``eval.run_dir`` and ``train.device`` are used.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict

import hydra
from omegaconf import DictConfig

from recsys import cli
from recsys.atomic import write_json_atomic
from recsys.config import ConfigError
from recsys.distributed import rank_and_world
from recsys.finish import finish_run, stack_options
from recsys.parallelize import destroy_distributed
from recsys.report import metrics_table, result_rows
from recsys.training.setup import load_trained


def evaluate_run(path: Path, device: str = "auto", out_name: str = "eval.json") -> Dict:
    """The metrics of a run's newest complete checkpoint (``path``: the run, or one checkpoint
    directory), as training evaluates at its end. Rank 0 writes ``<run_dir>/<out_name>``
    atomically (its path is ``out["path"]``). Collective under torchrun; one process otherwise."""
    t0 = time.perf_counter()
    run = load_trained(Path(path), device)
    cfg, rank = run.cfg, rank_and_world()[0]
    sets = run.data.eval_sets(cfg.eval.max_users, progress=rank == 0 and cfg.train.progress)
    end = finish_run(run.model, run.data, sets, run.device, cfg.eval, stack=stack_options(cfg), evaluate_valid=True)
    out: Dict = {"checkpoint": str(run.path), "step": run.meta["step"], "run_hash": run.meta.get("run_hash"),
                 **end.metrics, **sets.info, "wall_s": round(time.perf_counter() - t0, 3)}
    if rank == 0:
        write_json_atomic(out, run.run_dir / out_name)
        out["path"] = str(run.run_dir / out_name)
    return out


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="command")
def main(dcfg: DictConfig) -> None:
    cfg = cli.start(dcfg)
    cli.ignored_overrides(("eval.run_dir", "train.device"), "recsys.evaluate takes the config the run's checkpoint "
                          "recorded (it reads eval.run_dir and train.device only)")
    with cli.command_errors():
        if not cfg.eval.run_dir:
            raise ConfigError("eval.run_dir is required: python -m recsys.evaluate eval.run_dir=outputs/DATE/TIME")
        try:
            out = evaluate_run(Path(cfg.eval.run_dir), cfg.train.device)
        finally:
            destroy_distributed()
    if "path" in out:
        ks = sorted({int(k.split("@")[1]) for k in out["test"] if k != "users"})
        print(metrics_table(result_rows(out), ks))
        print(f"checkpoint {out['checkpoint']} (step {out['step']}); {out['test']['users']} test users; "
              f"metrics: {out['path']}", flush=True)


if __name__ == "__main__":
    main()
