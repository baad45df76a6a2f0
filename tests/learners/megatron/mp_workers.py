"""Run a function on N CPU processes that form a gloo process group with megatron-core's CUDA
assumptions shimmed (`cpu_shim`), and collect each rank's return value (test-only).

Processes are forked from the test process (imports are inherited: a rank starts in well under a second)
with one torch thread each; a rank that raises fails the test with its traceback.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        import torch

        torch.set_num_threads(1)
        import cpu_shim

        cpu_shim.install()
        result = fn(*args)
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from learners.megatron import parallel
            parallel.shutdown()
        except Exception:
            pass


def run(world: int, fn, *args, timeout: float = 150.0) -> list:
    """fn(*args) on `world` ranks; returns [result of rank 0, rank 1, ...]."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in range(world):
        try:
            rank, ok, value = queue.get(timeout=timeout)  # every rank puts exactly once
        except Exception:  # queue.Empty: a rank hung or died without a word
            errors.append(f"no answer from some rank within {timeout:.0f}s")
            break
        (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
        if errors:
            break
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
