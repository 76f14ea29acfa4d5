"""Every random stream of a run, derived from (run seed, stream name, step, rank) in one place.

A stream's seed is a 63-bit hash of its inputs, so streams never share a seed and none depends on
another's draws: the model init, CLIPA's image and text masks, the held-out synthetic sets. (The data
order and the per-sample augmentation / caption choice are keyed the same way inside ``training.data``:
by (seed, epoch) and (seed, epoch, index).)

    >>> gen = generator(run_seed, "image_mask", step=120)   # the same on every rank
    >>> gen = generator(run_seed, "text_mask", step=120, rank=1)
"""

from __future__ import annotations

import torch

__all__ = ["STREAMS", "data_seed", "generator", "stream_seed"]

STREAMS = ("model_init", "image_mask", "text_mask", "eval_zero_shot", "eval_retrieval")
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit ints that spreads every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, stream: str, step: int = 0, rank: int = 0) -> int:
    """The seed (in [0, 2**63)) of ``stream`` at ``step`` on ``rank`` of a run seeded ``seed``."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    h = _mix64(int(seed))
    for part in (STREAMS.index(stream), int(step), int(rank)):
        h = _mix64(h ^ part)
    return h >> 1


def generator(seed: int, stream: str, step: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU torch.Generator seeded with ``stream_seed``."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, step, rank))


def data_seed(seed: int, stream: str) -> int:
    """A 31-bit seed for the data builders that take an int seed (NumPy-style)."""
    return stream_seed(seed, stream) % (2**31)
