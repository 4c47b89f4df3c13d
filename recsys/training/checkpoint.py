"""Checkpoints: sharded tables, dense weights and optimizer state with torch.distributed.checkpoint
(DCP), the training position and the rest of the loop's state as JSON; atomic, resumable, reshardable.

    <run_dir>/checkpoints/step_000000120/
        __0_0.distcp, __1_0.distcp ...   DCP tensor files (one per writing rank)
        .metadata                        DCP's index of them
        meta.json                        step, epoch and batch within it, history, best epoch, loss
                                         accumulators, RNG states, timings, the config and its hash,
                                         table shapes
        COMPLETE                         written last: the size of every file above

Every rank writes its shards into ``checkpoints/.tmp-step_000000120``; after a barrier rank 0 writes
meta.json and COMPLETE, syncs them and renames the directory. A directory without COMPLETE, or
whose files do not have the sizes COMPLETE records (torn, truncated), is never loaded: the newest
complete one is. The last ``train.keep_checkpoints`` complete checkpoints are kept.

``Checkpointer`` is what the training loop uses: it owns the resume (``load``), "save if due"
(``save_if_due``: every ``train.checkpoint_every_steps`` steps, or ``train.checkpoint_every_minutes``
agreed by all ranks) and the final save (``save_final``), and records what it wrote. ``find_resume`` decides, before any work,
where a run resumes from (rank 0 looks, every rank learns the answer).

The tables are saved as DCP ShardedTensors of the global table, so a checkpoint written by N
ranks loads on M ranks under any sharding plan. Loading reads no pickle beyond DCP's index, whose
unpickler is restricted to DCP's own metadata classes; tensors are read with
``torch.load(weights_only=True)`` and byte entries are refused.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.tensor import DTensor
from torchrec.optim.keyed import KeyedOptimizerWrapper

from recsys.atomic import fsync_path
from recsys.config import Config, ConfigError
from recsys.data.prepare import READ_ONLY_FIELDS, data_config
from recsys.distributed import from_rank0
from recsys.errors import CheckpointError
from recsys.parallelize import snapshot_weights, table_weights
from recsys.training.state import TrainState

logger = logging.getLogger(__name__)

FORMAT = 1
CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
META = "meta.json"
PREFIX = "step_"
_METADATA = ".metadata"  # DCP's index of the tensor files

# Keys of the config that do not change what is trained: left out of the run hash, so that a rerun
# with another progress bar, checkpoint frequency, export or log option resumes the same run.
_VOLATILE = {
    "train": {"resume", "overwrite", "progress", "checkpoint_every_steps", "checkpoint_every_minutes",
              "checkpoint_at_end", "keep_checkpoints", "log_every_steps", "device", "timeout_minutes",
              "prefetch_batches"},
    "data": {"root", "engine", "engine_threads", "engine_memory"},  # every engine prepares the same dataset
    "eval": {"user_chunk", "item_chunk", "score_budget_mb", "ks", "popularity", "test_every_epoch", "run_dir"},
    "log": None,  # the whole group
    "export": None,
    "plan": None,
}


# Options added after run directories existed: hashed only when not at their default, so a run
# directory written before they existed keeps its hash (and resumes).
_ADDED = {
    "data": ("loader", "stream_min_rows", "row_group_size", "num_workers", "shuffle_buffer", "item_features",
             "user_features", "min_count", "oov_buckets"),
    "model": ("init", "spectral_alpha", "spectral_niter", "spectral_refit", "table_dtype", "stack_spectral_dim",
              "stack_spectral_weights", "pretrained_items", "pretrained_users", "feature_pooling", "feature_weights",
              "feature_combine", "pretrained_frozen"),
    "eval": ("max_users",),
    "optim": ("stochastic_rounding",),
    "train": ("warm_start", "warm_start_optimizer"),
}


def _resolved_loader(cfg: Config) -> Optional[str]:
    """``memory`` or ``stream`` as training resolves ``data.loader`` (quietly: the trainer logs its
    own resolution); None when it refuses the config (it says why later)."""
    try:
        return data_config(cfg, quiet=True).loader
    except ConfigError:
        return None


def run_hash(cfg: Config) -> str:
    """Hash of everything in `cfg` that changes the trained model (see ``_VOLATILE``; options of
    ``_ADDED`` only when not at their default). When the dataset is read in memory (``data.loader``
    resolved as training resolves it) the streaming loader's options (``recsys.data.prepare.READ_ONLY_FIELDS``:
    loader, stream_min_rows, row_group_size, num_workers, shuffle_buffer) change nothing and are left
    out; when it is streamed, only the resolution counts, not ``loader`` / ``stream_min_rows``. The
    table sizes of file sources mapped by vocabulary come from the data: hashed at their defaults."""
    tree = dataclasses.asdict(cfg)
    for group, keys in _VOLATILE.items():
        if keys is None:
            tree.pop(group, None)
        else:
            for key in keys:
                tree.get(group, {}).pop(key, None)
    if not cfg.model.stack_spectral_dim:  # no stacking: its weights do nothing
        tree["model"].pop("stack_spectral_weights", None)
    defaults = Config()
    for group, keys in _ADDED.items():
        for key in keys:
            if getattr(getattr(cfg, group), key) == getattr(getattr(defaults, group), key):
                tree[group].pop(key, None)
    if cfg.data.name != "synthetic" and cfg.data.id_mapping == "vocab":  # unused: the data gives the table sizes
        tree["data"].update(num_users=defaults.data.num_users, num_items=defaults.data.num_items)
    loader = _resolved_loader(cfg)
    if loader == "memory":
        for key in READ_ONLY_FIELDS:
            tree["data"].pop(key, None)
    elif loader == "stream":  # what counts is the resolved loader, not how it was asked for
        tree["data"].pop("loader", None)
        tree["data"].pop("stream_min_rows", None)
        tree["data"]["streamed"] = True
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _step_of(path: Path) -> Optional[int]:
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
        return None
    return int(name[len(PREFIX):])


def is_complete(path: Path) -> bool:
    """The marker is there and every file it lists has the recorded size."""
    marker = Path(path) / MARKER
    try:
        files = json.loads(marker.read_text())["files"]
        return all((Path(path) / name).stat().st_size == size for name, size in files.items()) and META in files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints of a run directory, newest (highest step) first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return [p for p in sorted(found, key=_step_of, reverse=True) if is_complete(p)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint; torn or unmarked newer directories are skipped (and logged)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    for path in sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of,
                       reverse=True):
        if is_complete(path):
            return path
        logger.warning("checkpoint %s is incomplete (no %s marker or a file of the wrong size): skipped",
                       path, MARKER)
    return None


def read_meta(path: Path) -> Dict[str, Any]:
    """meta.json of a checkpoint (``path`` a checkpoint directory); CheckpointError if unusable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path}: incomplete (no {MARKER} marker, or a file of the wrong size)")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path / META}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path / META}: not a recsys checkpoint of format {FORMAT}")
    return meta


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory / checkpoints directory (its newest complete one)."""
    path = Path(path)
    if (path / MARKER).exists() or _step_of(path) is not None:
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    found = latest_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (looked in {checkpoint_root(run_dir)})")
    return found


def check_compatible(meta: Dict[str, Any], model_name: str, tables: Dict[str, List], where: Path) -> None:
    """Refuse a checkpoint whose model or tables (shapes and storage type, ``table_shapes``) differ
    from the model built now."""
    saved = meta.get("model", {})
    if saved.get("name") != model_name:
        raise CheckpointError(f"checkpoint {where}: model.name={saved.get('name')} there, {model_name} here")
    # checkpoints written before the storage type was recorded hold fp32 tables ([rows, dim])
    saved_tables = {name: list(v) + ["fp32"] if isinstance(v, list) and len(v) == 2 else v
                    for name, v in (saved.get("tables") or {}).items()}
    if saved_tables == tables:
        return
    shapes = lambda t: {name: v[:2] for name, v in t.items()}  # noqa: E731
    if shapes(saved_tables) == shapes(tables):
        there = sorted({v[2] for v in saved_tables.values()})
        here = sorted({v[2] for v in tables.values()})
        raise CheckpointError(f"checkpoint {where}: its tables are stored as model.table_dtype={'/'.join(there)}, "
                              f"this config's as model.table_dtype={'/'.join(here)}: resume with the same table_dtype")
    raise CheckpointError(f"checkpoint {where}: tables {saved.get('tables')} (name: [rows, dim, dtype]) do not match "
                          f"this config's {tables}")


def table_shapes(model) -> Dict[str, List]:
    """{table name: [rows, dim, storage type (``model.table_dtype``: fp32 or fp16)]} of a (sharded
    or plain) model: what a checkpoint must match to be loaded into it."""
    return {name: [*map(int, w.shape), _DTYPE_NAMES.get(w.dtype, str(w.dtype).replace("torch.", ""))]
            for name, w in sorted(table_weights(model).items())}


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16"}


def check_run_dir(run_dir: Path, config_hash: str, overwrite: bool) -> None:
    """Refuse an output directory that holds another run (different run hash in its newest
    checkpoint or metrics.json); with ``overwrite`` remove that run's checkpoints and metrics.json.
    Hydra's own .hydra/ is not looked at: Hydra rewrites it before the job starts."""
    run_dir = Path(run_dir)
    recorded = []
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        try:
            recorded.append((str(latest), read_meta(latest).get("run_hash")))
        except CheckpointError:
            recorded.append((str(latest), None))
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        try:
            h = json.loads(metrics.read_text()).get("run_hash")
            if h is not None:  # a metrics.json without one predates checkpoints: nothing to compare
                recorded.append((str(metrics), h))
        except (OSError, ValueError, AttributeError):
            recorded.append((str(metrics), None))
    other = [(where, h) for where, h in recorded if h != config_hash]
    if not other:
        return
    where, h = other[0]
    if not overwrite:
        raise CheckpointError(f"{run_dir} already holds a different run ({where} is of run hash {h}, this "
                              f"config's is {config_hash}): pass train.overwrite=true to replace it, or choose "
                              f"another hydra.run.dir")
    logger.warning("train.overwrite=true: removing the previous run's checkpoints and metrics.json from %s", run_dir)
    shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)
    metrics.unlink(missing_ok=True)


def prepare_resume(run_dir: Path, resume: str, config_hash: str, overwrite: bool) -> Optional[str]:
    """Rank 0, before any work: the checkpoint to resume from (None: start afresh).

    ``auto``: the newest complete checkpoint of `run_dir` (after refusing another run's directory);
    ``never`` / ``none``: none (this run's old checkpoints are removed); a path: that checkpoint (or
    the newest of that run directory), unless `run_dir` already holds a checkpoint of this run (a
    requeued job continues from its own newest one)."""
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir)
    if resume not in ("auto", "never", "none"):
        own = latest_checkpoint(run_dir)
        if own is not None and read_meta(own).get("run_hash") == config_hash:
            logger.info("train.resume=%s: %s already holds a newer checkpoint of this run (a requeued job?): "
                        "resuming from it", resume, own)
            return str(own)
        check_run_dir(run_dir, config_hash, overwrite)
        path = resolve_checkpoint(Path(resume))
        meta = read_meta(path)
        if meta.get("run_hash") != config_hash:
            logger.warning("train.resume=%s: the checkpoint's config (hash %s) differs from this one (%s): "
                           "continuing with this config", resume, meta.get("run_hash"), config_hash)
        return str(path)
    check_run_dir(run_dir, config_hash, overwrite)
    if resume != "auto":
        if checkpoint_root(run_dir).exists():
            logger.warning("train.resume=%s: removing this run's earlier checkpoints in %s", resume,
                           checkpoint_root(run_dir))
            shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)
        return None
    latest = latest_checkpoint(run_dir)
    return str(latest) if latest is not None else None


# ---------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------


def _state_like(template: Dict[str, Any], tensors: List[torch.Tensor]) -> Dict[str, Any]:
    """A state dict shaped like `template` (a model's, sorted keys) whose local storage is `tensors`
    (in ``recsys.parallelize.local_tensors`` order): the best-epoch snapshot as a DCP-saveable state dict."""
    out, i = {}, 0
    # the snapshot lives in host memory while the tables may be on the GPU: its shards are then
    # placed on each rank's CPU, in the global metadata too (torch checks each local shard against
    # its placement; every rank re-places the same way, local shards or not)
    on = next((t.device for t in tensors if not t.is_cuda), tensors[0].device if tensors else torch.device("cpu"))
    for key, value in sorted(template.items()):
        if isinstance(value, ShardedTensor):
            shards = []
            for shard in value.local_shards():
                shards.append(Shard(tensors[i], _placed(shard.metadata, tensors[i].device)))
                i += 1
            metadata = value.metadata()
            if any(m.placement.device() != on for m in metadata.shards_metadata):
                metadata = dataclasses.replace(
                    metadata, shards_metadata=[_placed(m, on) for m in metadata.shards_metadata],
                    tensor_properties=dataclasses.replace(metadata.tensor_properties, pin_memory=False))
            out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(
                shards, metadata, process_group=value._process_group)
        elif isinstance(value, DTensor):
            out[key] = DTensor.from_local(tensors[i], value.device_mesh, value.placements, shape=value.shape,
                                          stride=value.stride())
            i += 1
        elif torch.is_tensor(value):
            out[key] = tensors[i]
            i += 1
    if i != len(tensors):
        raise ValueError("the best-weights snapshot does not match the model")
    return out


def _placed(metadata, device: torch.device):
    """A shard's metadata placed on `device` of the same rank (itself when it already is)."""
    if metadata.placement.device() == device:
        return metadata
    return dataclasses.replace(metadata, placement=f"rank:{metadata.placement.rank()}/{device}")


def _optimizer_state(optimizer) -> Dict[str, Any]:
    """The optimizer state (fused table optimizer and dense Adam) without param_groups, whose
    values come from the config."""
    return {"state": optimizer.state_dict()["state"]}


def _dense_state_ready(optimizer) -> None:
    """Create the lazily built dense optimizer state (torchrec's init_state: a zero-gradient step,
    which leaves the weights as they are) so that DCP has tensors to load into."""
    for _, opt in optimizer.optimizers:
        if isinstance(opt, KeyedOptimizerWrapper) and not opt.state:
            opt.init_state()


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, dmp, optimizer, best_weights: Optional[List[torch.Tensor]],
                    meta: Dict[str, Any], local: Dict[str, Any], keep: int) -> Dict[str, Any]:
    """Write ``checkpoints/step_<step>`` atomically. Collective: every rank calls it.

    `meta`: the JSON state shared by the ranks (rank 0's is written); `local`: this rank's own
    state (loss accumulator...), gathered into ``meta["ranks"]`` with its RNG states. Returns
    {"path", "seconds", "bytes"} (the size on rank 0)."""
    t0 = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{step:09d}"
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks = [None] * world
    dist.all_gather_object(ranks, {**local, "rng": _rng_state()})  # also a barrier: tmp exists
    state = {"model": dmp.state_dict(), "optim": _optimizer_state(optimizer)}
    if best_weights is not None:
        state["best"] = _state_like(dmp.state_dict(), best_weights)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True))
    dist.barrier()  # every rank's files are written
    size, error = 0, None
    if rank == 0:
        try:
            size = _commit(tmp, final, root, run_dir, keep, step, world, meta, ranks, best_weights is not None)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"checkpoint {final}: could not be committed ({type(e).__name__}: {e})"
    holder = [error]
    dist.broadcast_object_list(holder, src=0)  # the checkpoint is committed (or failed) before anyone goes on
    if holder[0] is not None:
        raise CheckpointError(holder[0])
    return {"path": str(final), "seconds": time.perf_counter() - t0, "bytes": size}


def _commit(tmp: Path, final: Path, root: Path, run_dir: Path, keep: int, step: int, world: int, meta: Dict,
            ranks: List, has_best: bool) -> int:
    """Rank 0: meta.json and the COMPLETE marker (every file's size) into `tmp`, synced, then renamed
    to `final`; older checkpoints pruned. Returns the checkpoint's size in bytes."""
    full = {"format": FORMAT, "step": step, "world_size": world, **meta, "ranks": ranks,
            "has_best": has_best, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (tmp / META).write_text(json.dumps(full, indent=1) + "\n")
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    for name in files:
        fsync_path(tmp / name)
    (tmp / MARKER).write_text(json.dumps({"files": files}, indent=1) + "\n")
    fsync_path(tmp / MARKER)
    if final.exists():  # the end-of-training checkpoint of a step that already has one
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(root)
    _prune(run_dir, keep)
    return _dir_size(final)


def _prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones, torn ones older than the
    newest complete one, and temporary directories left by killed runs."""
    complete = list_checkpoints(run_dir)
    root = checkpoint_root(run_dir)
    newest = _step_of(complete[0]) if complete else -1
    for path in complete[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        step = _step_of(path)
        if step is not None and step < newest and path not in complete:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary directories of checkpoints a killed run did not finish (rank 0, before training)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for path in root.iterdir():
            final = root / path.name[len(".old-"):]
            if path.name.startswith(".old-") and not final.exists():
                os.rename(path, final)  # killed between replacing a checkpoint's two renames: keep it
            elif path.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner")
_SAFE_NAMES = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's index (.metadata) is a pickle: allow only DCP's metadata classes, torch.Size and dtypes."""

    def find_class(self, module: str, name: str):
        if module in _SAFE_MODULES:
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in _SAFE_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint index")


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        with open(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(dcp.DefaultLoadPlanner):
    """Loads tensors only: a byte entry (which DCP would unpickle) is refused."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is not a tensor: refused")


def load_checkpoint(path: Path, dmp, optimizer=None,
                    load_best: bool = True) -> tuple[Dict[str, Any], Optional[List[torch.Tensor]]]:
    """Load a checkpoint into a sharded model (any world size and sharding plan) and, if given,
    its optimizer. Collective. Returns (meta, this rank's best-weights snapshot or None); restores
    this rank's RNG states when the world size is the one that wrote it."""
    path = Path(path)
    meta = read_meta(path)
    state: Dict[str, Any] = {"model": dmp.state_dict()}
    if optimizer is not None:
        _dense_state_ready(optimizer)
        state["optim"] = _optimizer_state(optimizer)
    best = None
    if load_best and meta.get("has_best"):
        best = snapshot_weights(dmp)  # in host memory, like the loop's snapshot
        state["best"] = _state_like(dmp.state_dict(), best)
    try:  # DCP's index first: a refused or corrupt one gives one line (DCP itself logs tracebacks)
        SafeFileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: unreadable index {_METADATA} ({type(e).__name__}: {e})") from None
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=TensorOnlyLoadPlanner())
    except CheckpointError:
        raise
    except (Exception, dcp.CheckpointException) as e:  # a shape or key mismatch, a corrupt file: one line
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {path}: cannot be loaded into this model "
                              f"({type(e).__name__}: {first[-1] if first else ''})") from None
    dmp.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    if meta.get("world_size") == dist.get_world_size():
        _set_rng_state(meta["ranks"][dist.get_rank()]["rng"])
    return meta, best


# ---------------------------------------------------------------------------------------------
# The training loop's checkpointer
# ---------------------------------------------------------------------------------------------


def find_resume(run_dir: Path, resume: str, config_hash: str, overwrite: bool) -> Optional[str]:
    """``prepare_resume`` on rank 0 (which also refuses another run's directory), its answer (or
    its ``ConfigError``) on every rank. Collective."""
    return from_rank0(lambda: prepare_resume(run_dir, resume, config_hash, overwrite), ConfigError)


class Checkpointer:
    """A run's checkpoints as the loop sees them: resume from one (``load``), write one when it is
    due (``save_if_due``) and at the end (``save_final``), and what was written (``summary``).

    `meta`: what every checkpoint of the run records besides the loop's state (run hash, config
    and its hash, model tables, data); `every_steps` / `every_minutes` / `at_end` / `keep`: the
    ``train.checkpoint_*`` options. Saving is collective: every rank calls the same methods."""

    def __init__(self, run_dir: Path, meta: Dict[str, Any], every_steps: int, every_minutes: float, at_end: bool,
                 keep: int, device: torch.device) -> None:
        self.run_dir, self.meta, self.device = Path(run_dir), meta, device
        self.every_steps, self.every_s, self.at_end, self.keep = every_steps, every_minutes * 60, at_end, keep
        self.count, self.seconds, self.bytes, self.path = 0, 0.0, 0, None
        self.last = time.perf_counter()
        self.resumed: Optional[Dict[str, Any]] = None

    def start_clock(self) -> None:
        """The wall-clock trigger counts from here (the loop's start)."""
        self.last = time.perf_counter()

    def load(self, path: str, dmp, optimizer, state: TrainState, model_name: str) -> Dict[str, Any]:
        """Load checkpoint `path` into the (sharded) model, its optimizer and `state` (any world size
        and sharding plan; RNG states too when the world size is the writer's). Returns what the
        run records as ``checkpoint.resumed``. Collective."""
        t0 = time.perf_counter()
        check_compatible(read_meta(Path(path)), model_name, table_shapes(dmp), Path(path))
        meta, best_weights = load_checkpoint(Path(path), dmp, optimizer)
        state.load_state_dict(meta["loop"], meta["step"], [r["loss_sum"] for r in meta["ranks"]], dist.get_rank(),
                              dist.get_world_size(), best_weights)
        self.resumed = {"from": str(path), "step": state.step, "world_size": meta["world_size"],
                        "load_s": round(time.perf_counter() - t0, 3)}
        return self.resumed

    def save_if_due(self, state: TrainState, dmp, optimizer, loss_sum: torch.Tensor, check_clock: bool) -> None:
        """Save after ``state.step`` when a checkpoint is due: every ``every_steps`` steps, or once
        ``every_minutes`` have passed since the last one (looked at when `check_clock`, the ranks
        agreeing by an all-reduce, so that they all save together). `loss_sum`: this rank's loss
        summed over the epoch's batches so far (read back only when saving). Collective."""
        due = bool(self.every_steps) and state.step % self.every_steps == 0
        if self.every_s and check_clock:
            late = torch.tensor([float(time.perf_counter() - self.last >= self.every_s)], device=self.device)
            if dist.get_world_size() > 1:
                dist.all_reduce(late, op=dist.ReduceOp.MAX)
            due = due or bool(late.item())
        if due:
            state.loss_sum = float(loss_sum)
            self.save(state, dmp, optimizer)

    def save(self, state: TrainState, dmp, optimizer) -> None:
        """Write ``checkpoints/step_<step>`` now (every rank its shards; rank 0 the loop state)."""
        written = save_checkpoint(self.run_dir, state.step, dmp, optimizer, state.best_weights,
                                  {**self.meta, "loop": state.state_dict()}, {"loss_sum": state.loss_sum}, self.keep)
        self.count, self.seconds = self.count + 1, self.seconds + written["seconds"]
        self.bytes, self.path, self.last = written["bytes"], written["path"], time.perf_counter()
        logger.info("checkpoint %s (%.2f s, %.1f MB)", written["path"], written["seconds"], written["bytes"] / 1e6)

    def save_final(self, state: TrainState, dmp, optimizer) -> None:
        """The end of training: mark the state finished and save it (``train.checkpoint_at_end``),
        unless the run resumed from a finished checkpoint."""
        if self.at_end and not state.finished:
            state.batch, state.loss_sum, state.finished = 0, 0.0, True
            self.save(state, dmp, optimizer)

    def summary(self) -> Dict[str, Any]:
        """``metrics["checkpoint"]``: the last checkpoint written, how many, their size and time,
        and where the run resumed from."""
        return {"last": self.path, "written": self.count, "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "resumed": self.resumed}


# ---------------------------------------------------------------------------------------------
# The run config a checkpoint recorded (python -m recsys.evaluate / recsys.export rebuild the run from it)
# ---------------------------------------------------------------------------------------------


def config_from_meta(meta: Dict[str, Any], where: Path) -> Config:
    """The run's typed config, as the checkpoint recorded it (so table sizes match the weights)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(meta["config_yaml"]))
        return OmegaConf.to_object(merged)
    except Exception as e:
        cause = e.__cause__ or e
        raise CheckpointError(f"checkpoint {where / META}: its config does not fit this version's schema "
                              f"({str(cause).splitlines()[0]})") from None
