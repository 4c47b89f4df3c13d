"""What the tests share: the real configs composed with overrides, ranks to run jobs on, the numpy
reference of the ranking metrics, and runs of the real ``train()`` made once per session.

Ranks: ``ranks`` is a pool of two worker processes spawned once per session; each job runs a
function on both, in a fresh gloo process group (a new port per job), and returns what each rank
returned. Jobs cost no process start or import (seconds each otherwise). ``start_ranks`` spawns
processes of their own, for tests that must kill them.
"""

from __future__ import annotations

import logging
import os
import queue as queue_module
import socket
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import torch.multiprocessing as mp

# The suite runs on the CPU (gloo) wherever it runs, a GPU machine included: its configs leave
# train.device=auto, and its two-rank jobs would ask a one-GPU machine for a second GPU. The CUDA
# path is checked by the GPU kit (benchmarks/gpu/). Set before anything initialises CUDA; the
# spawned ranks and the launched commands inherit it.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def compose_config(overrides: Sequence[str] = (), hydra_config: bool = False):
    """conf/config.yaml with `overrides` (Hydra's compose API), as a DictConfig."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from recsys.config import register_configs, register_resolvers

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def typed(overrides: Sequence[str] = ()):
    """The typed Config of conf/config.yaml with `overrides`."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose_config(overrides))


@pytest.fixture(scope="session")
def make():
    """compose_config: conf/config.yaml with overrides, as a DictConfig."""
    return compose_config


@pytest.fixture(scope="session")
def config():
    """typed: conf/config.yaml with overrides, as the typed Config."""
    return typed


# ---------------------------------------------------------------------------------------------
# Running train() on this process or on ranks
# ---------------------------------------------------------------------------------------------


def train_run(overrides: Sequence[str], run_dir, config_hash: str = "test") -> dict:
    """``recsys.train.train`` of conf/config.yaml with `overrides`, into `run_dir` (on the calling
    process's ranks: this process alone, or every rank of a job)."""
    from recsys.train import train

    return train(typed(overrides), Path(run_dir), config_hash)


def in_process_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in this process, the 1-rank process group it made (e.g. a command's
    ``evaluate_run`` / ``export_checkpoint``, whose command line closes it) closed after."""
    import torch.distributed as dist

    try:
        return fn(*args, **kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="session")
def in_process():
    """in_process(fn, *args): a function that makes a process group, in this process, the group closed after."""
    return in_process_call


@pytest.fixture(scope="session")
def train_here():
    """train_run on this process (one rank)."""
    return train_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_plain(value):
    """Tensors become numpy arrays so results travel by value, not as shared memory handles."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    return value


def _rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")


def _run_job(fn, args):
    """One job on a rank: its result, and the job's process group (if it left one) destroyed."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        return _to_plain(fn(*args))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _pool_worker(rank: int, world: int, jobs, results) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        port, fn, args = job
        _rank_env(rank, world, port)
        try:
            results.put((rank, _run_job(fn, args), None))
        except BaseException:
            results.put((rank, None, traceback.format_exc()))


def _collect(procs, results, world: int, timeout: float) -> list:
    """Every rank's result, in rank order; a rank that raised or died fails the test (at once)."""
    got, errors = {}, []
    deadline = time.monotonic() + timeout
    while len(got) < world:
        try:
            rank, value, err = results.get(timeout=1.0)
        except queue_module.Empty:
            dead = [f"rank {r} died (exit code {p.exitcode})" for r, p in enumerate(procs)
                    if r not in got and p.exitcode is not None]
            if dead or time.monotonic() > deadline:
                raise AssertionError("; ".join(dead) or f"no result within {timeout:.0f} s") from None
            continue
        if err:
            errors.append(f"rank {rank}:\n{err}")
        got[rank] = value
    if errors:
        raise AssertionError("\n".join(errors))
    return [got[r] for r in range(world)]


class Ranks:
    """Started ranks of one job (``start_ranks``): ``wait()`` for their results or ``kill()`` them."""

    def __init__(self, fn, world: int, args) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        port = free_port()
        self.world = world
        self.jobs = [ctx.Queue() for _ in range(world)]  # kept: a child unpickles its queue after start()
        for jobs in self.jobs:  # pool workers given this one job
            jobs.put((port, fn, args))
            jobs.put(None)
        self.procs = [ctx.Process(target=_pool_worker, args=(r, world, self.jobs[r], self.results))
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def wait(self, timeout: float = 300.0) -> list:
        try:
            return _collect(self.procs, self.results, self.world, timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=30)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)


@pytest.fixture
def port() -> int:
    """A free TCP port on localhost."""
    return free_port()


@pytest.fixture(scope="session")
def start_ranks():
    """start_ranks(fn, world, *args): fn(*args) on `world` processes of their own (RANK/WORLD_SIZE
    set), started now; ``.wait()`` for their results or ``.kill()`` them."""
    return lambda fn, world, *args: Ranks(fn, world, args)


class RankPool:
    """`world` worker processes, spawned once, running jobs: fn(*args) on every rank, each job in a
    process group of its own (``RANK``/``WORLD_SIZE``/``MASTER_PORT`` set; a new port per job).
    A job that fails or hangs restarts the pool, so that the next job finds healthy ranks."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.jobs = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        # not daemonic: a job's rank may start processes of its own (the streaming loader's workers)
        self.procs = [ctx.Process(target=_pool_worker, args=(r, self.world, self.jobs[r], self.results))
                      for r in range(self.world)]
        for p in self.procs:
            p.start()

    def __call__(self, fn: Callable, *args, timeout: float = 300.0) -> list:
        port = free_port()
        for q in self.jobs:
            q.put((port, fn, args))
        try:
            return _collect(self.procs, self.results, self.world, timeout)
        except BaseException:
            self.close()
            self._start()
            raise

    def close(self) -> None:
        for q, p in zip(self.jobs, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture(scope="session")
def two_ranks():
    """A pool of 2 ranks: ``two_ranks(fn, *args)`` runs fn on both and returns their results."""
    pool = RankPool(2)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def ranks(two_ranks):
    """``ranks(world, fn, *args)``: fn on `world` ranks (1: this process; 2: the pool)."""

    def run(world: int, fn, *args):
        if world == 1:
            import torch.distributed as dist

            try:
                return [_to_plain(fn(*args))]
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
        assert world == 2, "the pool has 2 ranks"
        return two_ranks(fn, *args)

    return run


# ---------------------------------------------------------------------------------------------
# The evaluator's reference
# ---------------------------------------------------------------------------------------------


def brute_force_metrics(scores: np.ndarray, train: list, test: list, ks) -> dict:
    """Per-user loops in numpy: mask train items, full argsort, LightGCN-protocol metrics."""
    out = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg")}
    for u in range(scores.shape[0]):
        if not test[u]:
            continue
        s = scores[u].astype(np.float64).copy()
        s[list(train[u])] = -np.inf
        ranking = np.argsort(-s, kind="stable")
        for k in ks:
            top = ranking[:k]
            hits = [1.0 if i in test[u] else 0.0 for i in top]
            out[f"recall@{k}"].append(sum(hits) / len(test[u]))
            dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / np.log2(r + 2) for r in range(min(k, len(test[u]))))
            out[f"ndcg@{k}"].append(dcg / idcg)
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.fixture(scope="session")
def brute_force():
    """brute_force(scores, train item sets, test item sets, ks): the metrics by numpy loops."""
    return brute_force_metrics


# ---------------------------------------------------------------------------------------------
# Runs of the real train() shared by several test modules
# ---------------------------------------------------------------------------------------------

TINY = ["+experiment=tiny", "train.progress=false"]
"""conf/experiment/tiny.yaml: 500 users, 200 items, 2 epochs of 32 steps; add data.root and a run dir."""

TINY_RUN = [*TINY, "log.tensorboard=true", "train.log_every_steps=5", "export.npy=true", "export.faiss=ivf",
            "export.ann_k=10"]
"""The shared tiny run: every artefact on (TensorBoard, plots, .npy, an IVF index)."""


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One data.root for the session's runs: a dataset is prepared once and reused by the others."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """The run directory of the tiny experiment trained in this process (one rank)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    train_run([*TINY_RUN, f"data.root={data_root}"], run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_run_two_ranks(tmp_path_factory, data_root, two_ranks) -> Path:
    """The same on 2 ranks, every table row-wise sharded."""
    run_dir = tmp_path_factory.mktemp("tiny2") / "run"
    two_ranks(train_run, [*TINY_RUN, f"data.root={data_root}", "train.sharding_types=[row_wise]"], str(run_dir))
    return run_dir


@pytest.fixture(scope="session")
def tiny():
    """The tiny experiment's overrides with a data root: tiny(root, *more)."""
    return lambda root, *more: [*TINY, f"data.root={root}", *more]


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def command(monkeypatch, capsys):
    """command(module, *args) -> (exit code, stdout, stderr): ``python -m recsys.<module> *args``
    run in this process (the module's Hydra ``main`` with that argv; no process start). For what
    the command does with its arguments; ``cli`` below starts a real process."""
    import importlib

    def run(module: str, *args: str):
        main = importlib.import_module(f"recsys.{module}").main
        monkeypatch.setattr("sys.argv", [f"recsys/{module}.py", *args])
        capsys.readouterr()
        # Hydra configures logging for the job (handlers on the root logger, levels): put it back after
        loggers = [logging.getLogger(), logging.getLogger("recsys")]
        saved = [(lg, lg.level, lg.handlers[:], lg.propagate) for lg in loggers]
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            for lg, level, handlers, propagate in saved:
                for handler in lg.handlers:
                    if handler not in handlers:
                        handler.close()
                lg.handlers[:], lg.propagate = handlers, propagate
                lg.setLevel(level)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def cli():
    """cli(args, cwd=ROOT, env=None, timeout=300) -> CompletedProcess: a real process (one thread
    per rank, unbuffered output)."""
    import subprocess
    import sys

    def run(args, cwd=ROOT, env=None, timeout=300):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}
        args = [sys.executable if a == "python" else a for a in args]
        return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)

    return run
