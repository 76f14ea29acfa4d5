"""Webdataset shards as the training loop's stream: per-epoch shard order, rank and worker split,
equal step counts on every rank, and resume by skipping.

Epoch e: the shard list is permuted with (seed, e); rank r of K takes every K-th shard from r, and
DataLoader worker w of W every W-th of those. Each worker cycles through its shards without end, so
every rank yields as many batches as the loop asks for even when shard sizes differ; the loop ends
the epoch after ``N // B`` steps (N = ``data.num_samples``). Batches come from the workers in turn
(batch p from worker p mod W), so resuming at batch p of an epoch skips, in worker w, the samples
of its first ceil((p - w) / W) batches (tar reads, no image decode), and the loader's first worker
takes the role of worker p mod W. The skip counts stored
samples: with corrupt images in the skipped part, the resumed position is off by their number.

    >>> stream = ShardStream("shards/shard-{000000..000009}.tar", rank=0, world_size=2, seed=0,
    ...                      batch_size=64, transform=ImageTransform(224, train=True))
    >>> stream.set_epoch(3, skip_batches=120)
    >>> loader = DataLoader(stream, batch_size=64, num_workers=4, collate_fn=SkipCorrupt())
"""

from __future__ import annotations

import itertools
import os

import torch
from torch.utils.data import get_worker_info

from .datasets import ShardDataset, sample_captions

__all__ = ["ShardStream", "count_samples", "expand_urls", "iter_captions"]


def expand_urls(urls) -> list[str]:
    """A brace pattern ("a-{000..009}.tar"), a "::"-separated string, or a list -> a list of paths."""
    import braceexpand

    if isinstance(urls, str):
        return [u for part in urls.split("::") for u in braceexpand.braceexpand(part)]
    return list(urls)


def iter_captions(urls):
    """(global index, captions) of every sample in the shards, in order; only txt / json members are
    read into memory. Samples without json get their position as the index."""
    import webdataset as wds

    sources = ({"url": u} for u in expand_urls(urls))
    keep = lambda name: name.endswith((".json", ".txt"))  # noqa: E731
    samples = wds.tarfile_samples(sources, handler=wds.warn_and_continue, select_files=keep)
    return (sample_captions(sample, position) for position, sample in enumerate(samples))


def count_samples(urls) -> int:
    """The data size N for FastCLIP's state: 1 + the largest global index in the samples' json (indices
    of unreadable images skipped by ``write_shards`` stay reserved), or the number of distinct keys
    (member names up to the first dot) when the shards carry no json. Reads member headers and json."""
    import json
    import tarfile

    keys, top = 0, -1
    for url in expand_urls(urls):
        with tarfile.open(url) as tar:
            members = [m for m in tar if m.isfile()]
            keys += len({os.path.basename(m.name).split(".", 1)[0] for m in members})
            for m in members:
                if m.name.endswith(".json"):
                    top = max(top, int(json.load(tar.extractfile(m)).get("index", -1)))
    return top + 1 if top >= 0 else keys


class ShardStream(ShardDataset):
    """This rank's endless, per-epoch shuffled stream of (image, captions or caption, global index).

    Args: urls (pattern or list), rank / world_size (K <= number of shards), seed, batch_size (the
    per-rank batch, for skipping), transform / caption_choice as ``ShardDataset``.
    """

    def __init__(
        self, urls, *, rank=0, world_size=1, seed=0, batch_size=1, transform=None, caption_choice=None
    ):
        super().__init__(expand_urls(urls), transform=transform, caption_choice=caption_choice)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(self.urls) < world_size:
            raise ValueError(f"urls: {len(self.urls)} shard(s) cannot feed world_size={world_size} ranks")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rank, self.world_size, self.seed, self.batch_size = rank, world_size, seed, batch_size
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Start epoch ``epoch`` at batch ``skip_batches`` of it (resume); before building the loader."""
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)
        if self.caption_choice is not None and hasattr(self.caption_choice, "set_epoch"):
            self.caption_choice.set_epoch(epoch)

    def rank_shards(self) -> list[str]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.urls), generator=g).tolist()
        return [self.urls[i] for i in order[self.rank :: self.world_size]]

    def _skipped_samples(self, worker: int, num_workers: int) -> int:
        p = self.skip_batches
        return ((p - worker + num_workers - 1) // num_workers) * self.batch_size if p > worker else 0

    def __iter__(self):
        import webdataset as wds

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader asks its workers in turn starting from worker 0, and batch p of the epoch is due
        # from logical worker p mod W: after skipping p batches, worker i plays logical (i + p) mod W.
        worker = (worker + self.skip_batches) % num_workers
        mine = self.rank_shards()[worker::num_workers]
        if not mine:
            return
        shards = ({"url": url} for url in itertools.cycle(mine))
        raw = wds.tarfile_samples(shards, handler=wds.warn_and_continue)
        raw = itertools.islice(raw, self._skipped_samples(worker, num_workers), None)
        yield from (item for item in map(self._decode, raw) if item is not None)
