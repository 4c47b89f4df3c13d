"""Prepare a dataset (or reuse an identical earlier preparation) and print what it holds.

    python -m recsys.prepare [the data overrides of recsys.train]
    python -m recsys.prepare data=lightgcn data.path=data/gowalla

The overrides compose conf/config.yaml exactly as ``recsys.train`` does (through
conf/command.yaml: no run directory), so the dataset prepared here is the one a training run
with the same overrides reuses. Prints users, items, interactions per split, density,
interactions per user and per item (quantiles) and the rows dropped with their reasons, and
writes ``report.json``, ``report.md`` and ``popularity.png`` (log-log rank-frequency of items and
users) into the prepared dataset's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import hydra
import numpy as np
from omegaconf import DictConfig

from recsys import cli
from recsys.atomic import write_json_atomic, write_text_atomic
from recsys.config import Config, ConfigError
from recsys.data.prepare import data_config, prepare

try:  # pyspark is an optional extra (recsys[spark]): data.engine=spark only
    from recsys.data import spark_engine
except ImportError:
    spark_engine = None
from recsys.report import format_dataset_report, plot_popularity, stream_report


def prepare_report(cfg: Config) -> Tuple[Path, Dict, str]:
    """Prepare (or reuse) the dataset as training with this config would (``data.loader`` resolved
    for its model), write its report files beside it; (directory, report, text)."""
    engine = None
    if cfg.data.engine == "spark":
        if spark_engine is None:
            raise ConfigError("data.engine=spark needs pyspark (pip install 'recsys[spark]') and Java 17")
        engine = spark_engine.spark_runner(spark_engine.local_session(cfg.data.engine_threads))
    path = prepare(data_config(cfg), engine=engine)
    report = stream_report(path)  # from the prepared counts: no pass over the rows
    item_counts, user_counts = np.load(path / "item_counts_all.npy"), np.load(path / "user_counts.npy")
    png = plot_popularity(item_counts, path / "popularity.png", user_counts,
                          title=f"Popularity in the training data of {path.name}")
    report["popularity_plot"] = str(png)
    text = format_dataset_report(report)
    write_json_atomic(report, path / "report.json")
    write_text_atomic(text + "\n![popularity](popularity.png)\n", path / "report.md")
    return path, report, text


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="command")
def main(dcfg: DictConfig) -> None:
    cfg = cli.start(dcfg)
    with cli.command_errors():
        path, report, text = prepare_report(cfg)
    print(text)
    print(f"popularity plot: {report['popularity_plot']}")
    print(f"report: {path / 'report.md'}, {path / 'report.json'}", flush=True)


if __name__ == "__main__":
    main()
