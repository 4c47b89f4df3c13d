"""Preparation: raw interactions -> a prepared dataset (rows, vocabularies, split, counts).

``prepare`` runs the relational steps of ``recsys.data.steps`` on an engine: DuckDB in process by
default (``recsys.data.engine``), or Spark (``data.engine=spark`` here, or ``spark-submit
jobs/spark/prepare.py`` on a cluster), into one layout (``recsys.data.layout``) under
``<data.root>/<name>-<hash>/``. Both engines write the same dataset for the same input, and both
loaders read it: ``data.loader`` changes how the rows are read, never the data, the split or the
handling of repeats. ``prepare_everywhere`` is what a multi-rank job calls: rank 0 prepares (or
reuses) the dataset with all the host's cores while the other ranks wait for its path.

Every dropped row is counted in the manifest and logged; the policies for bad rows (null ids,
duplicates, test rows unseen in training) are ``drop`` (counted) or ``error`` (refused, naming the
file and row). The dataset is written into a temporary directory beside the final one (the
engine's spill files and tables in it too) and renamed into place once complete, manifest last,
so a reader sees a complete dataset or none; bad input leaves nothing, not even ``data.root``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from recsys.atomic import write_json_atomic
from recsys.config import Config, ConfigError, DataConfig, memory_reason
from recsys.data.engine import run_duckdb
from recsys.data.readers import DataError, parquet_rows
from recsys.distributed import from_rank0

logger = logging.getLogger(__name__)

PREPARED_VERSION = 2
"""2: the engine-based preparation (one layout for both loaders; split keys and hashed rows of
``recsys.data.hashing``)."""


# DataConfig fields that only tell how the prepared data are read, or how the loader is chosen
# (row_group_size: how the prepared files are cut, which only the streaming loader sees).
READ_ONLY_FIELDS = ("loader", "stream_min_rows", "row_group_size", "num_workers", "shuffle_buffer")


def source_rows(cfg: DataConfig) -> Optional[int]:
    """Rows of the source as far as they are known without reading it: ``num_interactions`` of a
    synthetic source, the metadata row count of a Parquet file or directory; else None."""
    if cfg.name == "synthetic":
        return cfg.num_interactions
    if cfg.name == "parquet" and cfg.path:
        return parquet_rows(cfg.path)
    return None


def resolve_loader(cfg: DataConfig, memory_reason: Optional[str] = None, quiet: bool = False) -> str:
    """``memory`` or ``stream``: how the prepared rows of `cfg` are read (data.loader; the
    prepared dataset is the same for both).

    ``auto`` streams a synthetic or Parquet source of at least ``data.stream_min_rows`` rows (the
    Parquet metadata's row count), else reads it in memory. `memory_reason` (from the caller, e.g.
    a model that needs per-user histories) forces memory; with ``data.loader=stream`` it is a
    ``ConfigError``."""
    if cfg.loader == "memory":
        return "memory"
    if cfg.loader == "stream":
        if memory_reason:
            raise ConfigError(f"data.loader=stream: {memory_reason}; use data.loader=memory")
        return "stream"
    rows = source_rows(cfg)
    if rows is None or rows < cfg.stream_min_rows:
        return "memory"
    why = memory_reason
    if why:
        if not quiet:
            logger.warning("%d source rows (data.stream_min_rows=%d), but the memory loader is used: %s", rows,
                           cfg.stream_min_rows, why)
        return "memory"
    return "stream"


# DataConfig fields that do not change the prepared dataset: how it is read, and which engine
# prepares it (every engine writes the same dataset).
NOT_IDENTITY = READ_ONLY_FIELDS + ("engine", "engine_threads", "engine_memory")


def _fingerprint(cfg: DataConfig) -> str:
    fields = dataclasses.asdict(cfg)
    fields.pop("root")
    for key in NOT_IDENTITY:
        if key != "row_group_size":  # the prepared files' row groups
            fields.pop(key)
    def files_of(path: str):
        p = Path(path)
        if not p.exists():  # an object-store URL (Spark): its name
            return path
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]

    for key in ("path", "test_path"):
        if fields[key]:
            fields[key] = files_of(fields[key])
    for key in ("item_features", "user_features"):  # added later: absent when unused (earlier datasets keep their name)
        if fields[key]["path"] is None:
            fields.pop(key)
        else:
            fields[key]["path"] = files_of(fields[key]["path"])
    for key, default in (("min_count", 1), ("oov_buckets", 0)):
        if fields[key] == default:
            fields.pop(key)
    fields["version"] = PREPARED_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepared_dir(cfg: DataConfig) -> Path:
    """Where `cfg`'s dataset is prepared (whichever engine and loader)."""
    stem = "synthetic" if cfg.name == "synthetic" else Path(str(cfg.path).rstrip("/")).name.split(".")[0] or "data"
    return Path(cfg.root) / f"{stem}-{_fingerprint(cfg)}"


def prepare(cfg: DataConfig, progress: Optional[bool] = None, engine=None) -> Path:
    """Prepare the dataset described by `cfg` (or reuse an identical earlier preparation) with
    ``data.engine`` (`engine`: a callable ``(cfg, tmp, version, progress) -> manifest`` that
    replaces it, e.g. a Spark session's; see ``recsys.data.spark_engine``).

    The source is checked before anything but the staging directory is written, and the
    staging directory goes on bad input (``DataError``), with ``data.root`` and its parents when
    this call created them. A prepare killed at any point leaves at most a
    ``.<name>.tmp-<host>-<pid>`` directory that no later run reuses (a later prepare on the host
    removes it once its process is gone)."""
    out = prepared_dir(cfg)
    if (out / "manifest.json").exists():
        logger.info("reusing prepared dataset %s", out)
        return out
    if engine is None:
        if cfg.engine == "spark":
            raise ConfigError("data.engine=spark: run `python -m recsys.prepare data.engine=spark ...` (a local Spark "
                              "session) or `spark-submit jobs/spark/prepare.py ...` (a cluster) first; training then "
                              "reads the prepared dataset")
        engine = run_duckdb
    t0 = time.perf_counter()
    root = out.parent
    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again on bad input
    root.mkdir(parents=True, exist_ok=True)
    try:
        with _staged_dataset(out) as tmp:
            manifest = engine(cfg, tmp, PREPARED_VERSION, progress)
            for leftover in ("_raw", "_raw_test", "_spill", "_spark", "_features_item", "_features_user"):
                shutil.rmtree(tmp / leftover, ignore_errors=True)
            write_json_atomic(manifest, tmp / "manifest.json")
    except DataError:
        for p in created:
            try:
                p.rmdir()  # only when empty
            except OSError:
                break
        raise
    logger.info("prepared dataset %s in %.1fs (%s: %d rows, %.0f rows/s)", out, time.perf_counter() - t0,
                manifest.get("engine", {}).get("name"), manifest["counts"]["raw_interactions"],
                manifest["counts"]["raw_interactions"] / max(time.perf_counter() - t0, 1e-9))
    return out


@contextlib.contextmanager
def _staged_dataset(out: Path) -> Iterator[Path]:
    """A fresh temporary directory ``.<name>.tmp-<host>-<pid>`` beside `out` (this host's stale ones
    removed first) to write the dataset into; renamed to `out` when the block ends (unless a
    concurrent identical preparation renamed its own first: then it is removed), removed when the
    block raises."""
    _remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "manifest.json").exists():  # not a concurrent identical preparation
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(out: Path) -> None:
    """Remove ``.<name>.tmp-<host>-<pid>`` directories left by a killed prepare on this host (their
    pid is gone). Other hosts' temporaries are left alone: data.root may be a shared file system."""
    for tmp in out.parent.glob(f".{out.name}.tmp-{socket.gethostname()}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            logger.info("removing %s, left by an interrupted preparation", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def loader_config(cfg: DataConfig, memory_reason: Optional[str] = None, quiet: bool = False) -> DataConfig:
    """`cfg` with ``data.loader`` resolved (``auto`` -> ``memory`` or ``stream``, see
    ``resolve_loader``): what ``prepare`` and ``prepared_dir`` then agree on. `memory_reason`:
    why the caller needs the dataset in memory (``recsys.config.memory_reason``), if it does."""
    return dataclasses.replace(cfg, loader=resolve_loader(cfg, memory_reason, quiet))


def data_config(cfg: Config, quiet: bool = False) -> DataConfig:
    """The run's data config with ``data.loader`` resolved for its model (history bags and stacking
    need the memory loader): the dataset that training, the dry run, ``recsys.prepare`` and the
    run hash of `cfg` all mean. `quiet`: do not log why a large source is read in memory."""
    return loader_config(cfg.data, memory_reason(cfg), quiet)


def prepare_everywhere(cfg: Config, progress: Optional[bool] = None) -> Path:
    """The run's dataset (``data_config``) resolved and prepared by rank 0 while the other ranks wait
    (``train.timeout_minutes``); its directory on every rank (a ``DataError`` or ``ConfigError`` on
    every rank)."""
    return Path(from_rank0(lambda: str(prepare(data_config(cfg), progress)), DataError, ConfigError))
