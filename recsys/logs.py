"""What the libraries say that a user need not read: the one place that quiets it.

TorchRec and torch warn about their own deprecations on every model built (ShardedTensor,
fx tracing, the old all-gather name) and log every table at INFO. ``quiet_libraries`` filters
exactly those messages and lowers those loggers; it is called by every entry point (through
``recsys.cli``) and by ``recsys.parallelize.init_distributed`` (so ranks spawned by other code,
tests included, are quiet too). Ranks other than 0 log recsys's own warnings only.
"""

from __future__ import annotations

import logging
import warnings

# Library warnings about the libraries' own internals, raised on every model build or step.
LIBRARY_WARNINGS = (
    ".*deprecating ShardedTensor.*",
    ".*is_fx_tracing will return true.*",
    ".*all_gather_into_tensor. is deprecated.*",
)


class DropMessages(logging.Filter):
    """A logging filter that drops records containing any of `fragments`."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


_TOPOLOGY = DropMessages("TopologyFactory")


def quiet_libraries(rank: int = 0) -> None:
    """Filter the libraries' internal warnings and lower their loggers (idempotent); on ranks other
    than 0, recsys logs warnings only (rank 0 reports the run)."""
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    # Topology() is the constructor every TorchRec release has (TopologyFactory is recent): mute its nag.
    planner_types = logging.getLogger("torchrec.distributed.planner.types")
    if _TOPOLOGY not in planner_types.filters:
        planner_types.addFilter(_TOPOLOGY)
    if rank != 0:
        logging.getLogger("recsys").setLevel(logging.WARNING)
