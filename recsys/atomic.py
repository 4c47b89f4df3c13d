"""Atomic writes: every file the project writes goes to a temporary name beside its final path, is
flushed to disk and renamed, so a reader (or a run interrupted at any point) sees the old file or
the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path, suffix: str = "") -> Path:
    """``.<name>.tmp-<pid><suffix>`` beside `path` (hidden, never taken for the real file)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def commit(tmp: Path, path: Path) -> None:
    """Flush the finished file `tmp` to disk and rename it to `path`; on failure, remove it."""
    try:
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write) -> Path:
    """Call ``write(tmp)`` to write the file under a temporary name, then commit it to `path`."""
    path = Path(path)
    tmp = temporary_name(path, path.suffix)  # keep the suffix: some writers (savefig) go by it
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, path)
    return path


def write_text_atomic(text: str, path: Path) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(obj: object, path: Path) -> Path:
    return write_text_atomic(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def write_parquet_atomic(table, path: Path) -> Path:
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
