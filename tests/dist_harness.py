"""Run a function on K gloo ranks (CPU processes) and collect the results in rank order.

    results = run_ranks(fn, world_size, *args)   # fn(rank, world_size, *args) on every rank

``fn`` must be importable at module level (a top-level function of a test module or library):
the ranks are fresh ``spawn`` processes that unpickle it by qualified name, so lambdas and nested
functions fail. It runs after ``dist.init_process_group("gloo")`` (file rendezvous in a temporary
directory: no port to collide on) with one intra-op thread, and its return value must pickle;
tensors are moved to CPU and saved with ``torch.save``. An exception in any rank is re-raised in the
parent with that rank's traceback (the other ranks are terminated); a rank that hangs makes the call
fail after ``timeout`` seconds. Each spawn costs a few seconds (import torch), so do several checks
per call.
"""

import datetime
import gc
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch.utils._pytree import tree_map

DEFAULT_TIMEOUT_S = 120.0


def _to_cpu(obj):
    return tree_map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, obj)


def _rank_main(rank, world_size, tmpdir, timeout, fn, args):
    torch.set_num_threads(1)  # K ranks share the few cores of a CI machine
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(tmpdir, 'rendezvous')}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(_to_cpu(result), os.path.join(tmpdir, f"result_{rank}.pt"))
        gc.collect()  # free DDP reducers (reference cycles) while the group is alive
        dist.barrier()  # no rank tears the group down while a peer's last message is in flight
    except BaseException:
        # Written before this rank exits, i.e. before its peers fail on the broken connection.
        with open(os.path.join(tmpdir, f"error_{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


class RankError(RuntimeError):
    """A rank raised; the message holds the traceback of every rank that raised."""


def _join(ctx, timeout: float, what: str) -> None:
    """Wait for every rank; kill them all and raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join()
            raise TimeoutError(f"{what} did not finish in {timeout:.0f} s")


def run_ranks(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """fn(rank, world_size, *args) on ``world_size`` gloo ranks; returns the K results, rank order.

    Raises ``RankError`` with the traceback of every rank that raised, the first one first (the
    peers of a failing rank usually fail next, on the closed connection),
    ``torch.multiprocessing.ProcessExitedException`` if a rank died without a Python exception, and
    ``TimeoutError`` after ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="fastclip_dist_") as tmpdir:
        ctx = mp.start_processes(
            _rank_main,
            args=(world_size, tmpdir, timeout, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            _join(ctx, timeout, f"{fn.__name__} on {world_size} ranks")
        except ProcessException as exc:
            paths = [(r, os.path.join(tmpdir, f"error_{r}.txt")) for r in range(world_size)]
            paths = sorted((os.path.getmtime(p), r, p) for r, p in paths if os.path.exists(p))
            errors = [f"-- rank {r} raised:\n{open(p).read()}" for _, r, p in paths]  # first error first
            if errors:
                raise RankError("\n".join(errors)) from exc
            raise
        return [
            torch.load(os.path.join(tmpdir, f"result_{r}.pt"), weights_only=False) for r in range(world_size)
        ]
