"""Run a function on N gloo ranks in subprocesses and collect what each rank returns."""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback

import torch.multiprocessing as mp


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


def _worker(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    try:
        queue.put((rank, _to_plain(fn(*args)), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """fn(*args) on `world_size` processes (RANK/WORLD_SIZE set); returns results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, value, err = queue.get(timeout=1.0)
            except queue_module.Empty:
                # A rank killed by a signal never reports: say so now rather than at the timeout.
                dead = [f"rank {r} died (exit code {p.exitcode})" for r, p in enumerate(procs)
                        if r not in results and p.exitcode is not None and p.exitcode != 0]
                if dead or time.monotonic() > deadline:
                    raise AssertionError("; ".join(dead) or f"no result within {timeout:.0f} s") from None
                continue
            if err:
                errors.append(f"rank {rank}:\n{err}")
            results[rank] = value
    finally:
        finished = len(results) == world_size  # else the survivors of a dead rank wait in a collective
        for p in procs:
            p.join(timeout=30 if finished else 0)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
