"""The command line: one style for the five entry points.

Every command (``recsys.train``, ``recsys.evaluate``, ``recsys.export``, ``recsys.prepare``,
``recsys.plan``) is a Hydra application over ``conf/`` (``@hydra.main(config_path=CONFIG_DIR)``)
taking overrides the same way (``group.key=value``, ``+experiment=NAME``, ``--cfg job``,
``--help``), whose task starts with ``start`` (the typed ``Config``) and runs inside
``command_errors``. A value the schema refuses, a check that fails, bad input files, an unusable
checkpoint or export all end the same way: one line ``error: <message>`` on stderr, exit code 2,
no traceback. ``recsys.train`` and ``recsys.plan`` write into a run
directory of their own (``conf/config.yaml``); the other three work on an existing run or
dataset and write none (``conf/command.yaml``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from recsys.config import Config, register_configs, register_resolvers
from recsys.errors import RecsysError
from recsys.logs import quiet_libraries

logger = logging.getLogger("recsys.cli")

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
"""Hydra's config directory (absolute: the same whether a command runs as ``python -m`` or is
called from Python)."""


def typed_config(node: DictConfig) -> Any:
    """A composed config (or one group of it) as its dataclass; a value refused by a check exits
    with code 2 and the message on one line, before any work."""
    try:
        return OmegaConf.to_object(node)
    except Exception as e:  # __post_init__ checks raise through OmegaConf
        message = str(e.__cause__ or e).splitlines()[0]
        print(f"error: invalid configuration: {message}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def command_errors() -> Iterator[None]:
    """A ``RecsysError`` (bad configuration, input, checkpoint, export or plan) becomes one line on
    stderr and exit code 2."""
    try:
        yield
    except RecsysError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def config_hash(dcfg: DictConfig) -> str:
    """A short hash of the composed config (recorded in checkpoints and exports)."""
    return hashlib.sha256(OmegaConf.to_yaml(dcfg, resolve=True).encode()).hexdigest()[:16]


def run_dir() -> Path:
    """The Hydra run (or sweep job) directory of this command."""
    return Path(HydraConfig.get().runtime.output_dir)


def start(dcfg: DictConfig) -> Config:
    """The first line of every entry point's Hydra task: the libraries' noise filtered, the
    composed config checked against the typed schema (exit 2 on a refused value)."""
    quiet_libraries()
    return typed_config(dcfg)


def ignored_overrides(used: Sequence[str], why: str) -> None:
    """Name once each override of the command line that this command does not read (its key
    outside `used`, a key or a group), e.g. ``model.embedding_dim=8`` given to ``recsys.evaluate``,
    which takes the config its checkpoint recorded."""
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or any(key == u or key.startswith(u + ".") for u in used):
            continue
        logger.warning("%s does nothing: %s", override, why)


# Every entry point imports this module before Hydra composes its config: the schemas (one per
# group, conf/<group>/*.yaml extend them) and the run-id resolver must be registered by then.
register_configs()
register_resolvers()
