"""Export a trained run's vectors again, with the serving artefacts asked for now.

    python -m recsys.export export.run_dir=outputs/DATE/TIME export.faiss=hnsw [export.npy=true]

adds the serving artefacts to a finished run. With ``export.source=vectors`` (or ``auto`` when the
run has exported vectors) it starts from the vectors the run exported (the Parquet parts of
``export/items/`` and ``users/``, or the ``items.parquet`` / ``users.parquet`` of older runs, and
``manifest.json``; their checksums are verified) and rebuilds the export directory atomically,
reading them a row group at a time: the Parquet files are kept as they are, the ``.npy`` files and the index
are those the options ask for now (``recsys.exporter.export_run``). With
``export.source=checkpoint`` (or ``auto`` when the run has checkpoints but no export) it
recomputes every vector from the run's newest complete checkpoint, with the config the checkpoint
recorded, as training does at its end (``recsys.finish``: stacked with the spectral closed form
when the run was), and writes the whole directory, a part per rank. Collective under torchrun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import hydra
from omegaconf import DictConfig

from recsys import cli
from recsys.config import ConfigError, ExportConfig
from recsys.exporter import export_run
from recsys.finish import ExportTarget, finish_run, stack_options
from recsys.parallelize import destroy_distributed
from recsys.training.setup import load_trained


def export_checkpoint(run_dir: Path, options: ExportConfig, device: str = "auto") -> Optional[Dict]:
    """Recompute every vector from the run's newest complete checkpoint (the weights the run tested;
    stacked when the run was) and write the export directory as training does at its end.
    Collective (joins or creates the process group, as ``evaluate_run`` does; the command closes it);
    returns the manifest on rank 0."""
    run = load_trained(run_dir, device)
    cfg = run.cfg
    sets = run.data.eval_sets(cfg.eval.max_users) if cfg.model.stack_spectral_dim else None  # stacking validates
    target = ExportTarget(run_dir / options.dir, options, run.meta.get("config_hash") or run.meta["run_hash"])
    end = finish_run(run.model, run.data, sets, run.device, cfg.eval, stack=stack_options(cfg), evaluate=False,
                     export=target)
    return end.export_manifest


def resolve_source(run_dir: Path, options: ExportConfig) -> str:
    """``vectors`` or ``checkpoint`` (``export.source``; ``auto``: the exported vectors when the run
    has them, else its checkpoints)."""
    if options.source != "auto":
        return options.source
    has_vectors = (run_dir / options.dir / "manifest.json").is_file()
    return "vectors" if has_vectors or not (run_dir / "checkpoints").is_dir() else "checkpoint"


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="command")
def main(dcfg: DictConfig) -> None:
    cfg = cli.start(dcfg)
    cli.ignored_overrides(("export", "train.device"), "recsys.export reads the export options and train.device; "
                          "the rest of a run's config is the one its checkpoint recorded")
    options = cfg.export
    with cli.command_errors():
        if not options.run_dir:
            raise ConfigError("export.run_dir is required: python -m recsys.export export.run_dir=outputs/DATE/TIME "
                              "[export.faiss=hnsw] [export.npy=true]")
        run_dir = Path(options.run_dir)
        if not run_dir.is_dir():
            raise ConfigError(f"export.run_dir={options.run_dir}: no such directory")
        source = resolve_source(run_dir, options)
        if source == "vectors":
            manifest = export_run(run_dir / options.dir, options)
        else:
            try:
                manifest = export_checkpoint(run_dir, options, cfg.train.device)
            finally:
                destroy_distributed()
    if manifest is not None:
        print(f"export: {run_dir / options.dir} ({', '.join(manifest['files'])}) from the {source}", flush=True)


if __name__ == "__main__":
    main()
