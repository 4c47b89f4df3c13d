"""Each rank's peak resident memory, phase by phase.

``PhasePeaks.mark(name)`` ends a phase: it reads the process's peak RSS since the previous mark
(``VmHWM`` of ``/proc/self/status``) and resets it (writing ``5`` to ``/proc/self/clear_refs``,
Linux >= 4.0), so each phase gets its own exact peak: no sampling thread that could miss a short
spike. Where the reset is not available (not Linux, a restricted /proc) the peaks are the
process's peak so far (monotonic), and ``exact`` says so. The training run writes one report per
rank (``<run_dir>/memory/rank-RRRRR.json``): how ``benchmarks/scale_out.py`` shows that no rank
holds the whole table.

We read /proc ourselves: psutil reports the current RSS only, and ``resource.getrusage`` the
peak since the process started, which cannot be reset.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, List, Optional

from recsys.atomic import write_json_atomic

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set size (``VmHWM``) in bytes; None where /proc is not readable."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS; whether it could."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """Peak RSS of this process, phase by phase (``mark`` ends one)."""

    def __init__(self) -> None:
        self.exact = reset_peak_rss()
        self.t0 = time.perf_counter()
        self.phases: List[Dict] = []

    def mark(self, phase: str) -> None:
        """End `phase`: record its peak RSS and start the next one."""
        self.phases.append({"phase": phase, "peak_rss_bytes": peak_rss_bytes(),
                            "end_s": round(time.perf_counter() - self.t0, 3)})
        if self.exact:
            reset_peak_rss()

    def report(self, rank: int, world: int, **extra) -> Dict:
        return {"rank": rank, "world": world, "exact": self.exact, "phases": self.phases, **extra}

    def write(self, directory: Path, rank: int, world: int, **extra) -> Path:
        """This rank's report as ``directory/rank-RRRRR.json`` (atomically)."""
        path = Path(directory) / f"rank-{rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.report(rank, world, **extra), path)
        return path
