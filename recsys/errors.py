"""The errors a user can fix: bad configuration, bad input files, unusable checkpoints or exports.

Each carries one line that names what is wrong (the option, or the file and its column or line)
and why; the entry points print it as ``error: <message>`` and exit with code 2
(``recsys.cli.command_errors``), without a traceback and without writing anything.
"""

from __future__ import annotations


class RecsysError(ValueError):
    """Something the user gave that cannot work (exit code 2, one line)."""


class ConfigError(RecsysError):
    """A configuration value that cannot work, found before any work starts."""


class DataError(RecsysError):
    """Input that cannot be used; the message names the file, the column or line, and the reason."""


class CheckpointError(ConfigError):
    """A checkpoint or run directory that cannot be used with this config."""


class ExportError(RecsysError):
    """An export directory that cannot be read back (missing, changed, inconsistent)."""


class PlanError(RecsysError):
    """The planner cannot place the tables on the given ranks."""


class DeviceError(ConfigError):
    """The device asked for cannot be used here (``train.device=cuda`` where CUDA cannot start)."""
