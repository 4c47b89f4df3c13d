"""Prepare a dataset (or reuse an identical earlier preparation) and print what it holds.

    python -m recsys.prepare [the data overrides of recsys.train]
    python -m recsys.prepare data=lightgcn data.path=data/gowalla

The overrides compose conf/config.yaml exactly as ``recsys.train`` does, so the dataset
prepared here is the one a training run with the same overrides reuses. Prints users, items,
interactions per split, density, interactions per user and per item (quantiles) and the rows
dropped with their reasons, and writes ``report.json``, ``report.md`` and ``popularity.png``
(log-log rank-frequency of items and users) into the prepared dataset's directory.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from recsys.atomic import write_json_atomic, write_text_atomic
from recsys.config import Config, ConfigError, register_configs, register_resolvers
from recsys.data import DataError, Dataset, prepare
from recsys.sources import data_config
from recsys.report import dataset_report, stream_report, format_dataset_report, plot_popularity

CONF = Path(__file__).resolve().parents[1] / "conf"


def prepare_report(cfg: Config) -> Tuple[Path, Dict, str]:
    """Prepare (or reuse) the dataset as training with this config would (``data.loader`` resolved
    for its model), write its report files beside it; (directory, report, text)."""
    path = prepare(data_config(cfg))
    if json.loads((path / "manifest.json").read_text()).get("loader") == "stream":  # counts only: no pass over the log
        report = stream_report(path)
        item_counts, user_counts = np.load(path / "item_counts_all.npy"), np.load(path / "user_counts.npy")
    else:
        dataset = Dataset.load(path)
        report = dataset_report(dataset)
        item_counts, user_counts = dataset.item_counts(), np.bincount(dataset.train_users, minlength=dataset.num_users)
    png = plot_popularity(item_counts, path / "popularity.png", user_counts,
                          title=f"Popularity in the training data of {path.name}")
    report["popularity_plot"] = str(png)
    text = format_dataset_report(report)
    write_json_atomic(report, path / "report.json")
    write_text_atomic(text + "\n![popularity](popularity.png)\n", path / "report.md")
    return path, report, text


def compose_config(overrides: List[str]) -> Config:
    """conf/config.yaml with `overrides`, as the typed Config (Hydra's compose API: no run directory)."""
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def main(argv: Optional[List[str]] = None) -> int:
    overrides = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        force=True)
    logging.getLogger("recsys").setLevel(logging.INFO)
    try:
        cfg = compose_config(overrides)
    except Exception as e:  # unknown keys, bad types, __post_init__ checks (raised through OmegaConf)
        cause = e.__cause__ or e
        print(f"error: invalid configuration: {cause}".splitlines()[0], file=sys.stderr)
        return 2
    try:
        path, report, text = prepare_report(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"popularity plot: {report['popularity_plot']}")
    print(f"report: {path / 'report.md'}, {path / 'report.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
