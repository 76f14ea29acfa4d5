"""A distributed sampler over global indices with exact mid-epoch resume.

Each epoch is one permutation of `range(dataset_size)` seeded by (seed, epoch), the same on every rank; rank r
takes positions r, r + world_size, ... (as `torch.utils.data.DistributedSampler`). The datasets return the
global index with each sample, so FastCLIP's per-sample state (u) can be indexed by it.

Resume: `state_dict(consumed=...)` records the epoch and how many of this rank's indices were used; after
`load_state_dict`, the next iteration yields exactly the remaining ones, then later epochs are whole again.
DataLoader workers prefetch, so the count the sampler has yielded runs ahead of what the training step used:
pass `consumed` (steps in this epoch x per-rank batch size) when saving.

    >>> sampler = GlobalIndexSampler(1000, world_size=2, rank=0, seed=0)
    >>> sampler.set_epoch(1)
    >>> first = next(iter(sampler))
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalIndexSampler(Sampler[int]):
    """This rank's share of a deterministic per-epoch permutation of [0, dataset_size).

    Args:
        dataset_size: number of samples N.
        world_size, rank: number of ranks and this rank (0 <= rank < world_size).
        seed: permutation seed, the same on all ranks.
        shuffle: permute (True) or take 0..N-1 in order.
        drop_last: drop the tail so every rank gets N // world_size; else pad by repeating from the start.
    """

    def __init__(
        self,
        dataset_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if dataset_size < 0:
            raise ValueError(f"dataset_size must be >= 0, got {dataset_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset_size, self.world_size, self.rank = dataset_size, world_size, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        if drop_last:
            self.num_samples = dataset_size // world_size
        else:
            self.num_samples = -(-dataset_size // world_size)
        self.epoch = 0
        self._start = 0  # position inside the epoch to resume from (applies to the next iteration only)
        self._yielded = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> list[int]:
        """All of this rank's indices for `epoch` (default: the current one), from the start of the epoch."""
        e = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            order = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            order = list(range(self.dataset_size))
        total = self.num_samples * self.world_size
        if total > len(order) and order:
            order = (order * (-(-total // len(order))))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        self._yielded = start
        for i in self.indices()[start:]:
            self._yielded += 1
            yield i

    def __len__(self) -> int:
        return self.num_samples - self._start

    def state_dict(self, consumed: int | None = None) -> dict:
        """{"epoch", "position", "seed", "world_size"}; position = `consumed` or the count yielded so far."""
        position = self._yielded if consumed is None else int(consumed)
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"consumed must be in [0, {self.num_samples}], got {position}")
        return {"epoch": self.epoch, "position": position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size or state["seed"] != self.seed:
            raise ValueError(
                f"state is for world_size={state['world_size']}, seed={state['seed']}; "
                f"this sampler has world_size={self.world_size}, seed={self.seed}"
            )
        self.epoch, self._start = int(state["epoch"]), int(state["position"])
        self._yielded = self._start
