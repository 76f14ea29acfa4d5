"""Processes of a run: one process (CPU or one GPU), or ``torchrun`` ranks with DDP.

``torchrun --nproc_per_node K -m training.train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup``
then opens the default process group (NCCL on GPU, gloo on CPU) and gives each rank its device
(``cuda:LOCAL_RANK``). When a group is already open (tests, or a caller's own launcher) it is used
as is and left open. Rank 0 logs, evaluates and writes checkpoints; the other ranks send it their
share of the state that is not replicated (FastCLIP's u / tau shard, RNG states) with one
``gather_object`` per checkpoint.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

__all__ = [
    "Ranks",
    "barrier",
    "constant_buffer_names",
    "cuda_device_index",
    "ddp",
    "gather_to_main",
    "mean_over_ranks",
    "setup",
    "sum_over_ranks",
    "teardown",
]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size K, device, and whether it opened the group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str, timeout_minutes: float | None = None) -> Ranks:
    """Ranks of this process; ``device_kind`` is "cpu" or "cuda" (from the config). ``timeout_minutes``
    bounds how long a collective may wait before the process group aborts (torch's default, 10 minutes
    for NCCL, when None)."""
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, owns = int(os.environ.get("RANK", "0")), world > 1
        if owns:
            timeout = None if timeout_minutes is None else datetime.timedelta(minutes=timeout_minutes)
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", timeout=timeout)
    if device_kind == "cuda":
        index = cuda_device_index(os.environ.get("LOCAL_RANK"), rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return Ranks(rank, world, torch.device("cuda", index), owns)
    return Ranks(rank, world, torch.device("cpu"), owns)


def cuda_device_index(local_rank: str | None, rank: int, visible: int) -> int:
    """The CUDA ordinal this process trains on, among the ``visible`` devices.

    torchrun gives each process all of a node's GPUs and its LOCAL_RANK: use ``cuda:LOCAL_RANK``.
    Launchers that show each process only its own GPU (a scheduler's ``--gpus-per-task=1``, or
    CUDA_VISIBLE_DEVICES set per process) still set LOCAL_RANK 0..k-1, which would be an invalid ordinal:
    with one visible device, use it. Without LOCAL_RANK, ranks fill the visible devices round robin."""
    if visible < 1:
        raise RuntimeError("train.device is cuda but torch sees no CUDA device (check CUDA_VISIBLE_DEVICES)")
    if local_rank is None or local_rank == "":
        return rank % visible
    local = int(local_rank)
    if local < visible:
        return local
    if visible == 1:
        return 0
    raise RuntimeError(
        f"LOCAL_RANK={local} but this process sees {visible} CUDA devices (0..{visible - 1}); give each "
        "process all of the node's GPUs (torchrun's default) or exactly one"
    )


def constant_buffer_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the buffers ``model``'s modules declare constant (``constant_buffers``)."""
    return [
        f"{name}.{b}" if name else b
        for name, m in model.named_modules()
        for b in getattr(m, "constant_buffers", ())
    ]


def ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` wrapped in DDP, its constant buffers (LLM2CLIP's caption-embedding table, GBs) left out of
    DDP's start-up broadcast and of the buffer sync before every forward."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, constant_buffer_names(model))
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def teardown(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of a tensor over ranks (a detached copy; ``x`` itself when K = 1)."""
    if ranks.world_size == 1:
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / ranks.world_size


def sum_over_ranks(n: int, ranks: Ranks) -> int:
    """The sum of a host int over ranks (one small all-reduce; ``n`` itself when K = 1)."""
    if ranks.world_size == 1:
        return int(n)
    y = torch.tensor([int(n)], dtype=torch.int64, device=ranks.device)
    dist.all_reduce(y)
    return int(y.item())


def gather_to_main(obj, ranks: Ranks) -> list | None:
    """[obj of rank 0, ..., obj of rank K-1] on rank 0 (tensors moved to CPU), None elsewhere."""
    obj = tree_map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, obj)
    if ranks.world_size == 1:
        return [obj]
    out = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()
