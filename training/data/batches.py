"""Whole training batches keyed by (epoch, indices): full on every rank, loader built once.

``EpochBatches`` (a sampler, in the main process) yields one ``BatchKey`` per step: the epoch, this rank's
indices of that step (its rows of the single-process global batch, from ``GlobalIndexSampler``) and its
spares (its rows of the following steps). ``TrainBatches`` (the dataset, in the workers) turns a key into
a ``Batch``: the image of each index (decoded, or from the in-memory ``ImageCache``), augmented and its
caption chosen as pure functions of (seed, epoch, index). A row whose image is corrupt takes the next
good spare, in order, and counts 1 in ``Batch.skipped``: every rank's batch stays full, so the feature
all-gather sees equal sizes, and the replacement depends on nothing but the key (exact under resume).
Spares are this rank's own rows, so two ranks never pick the same replacement. The epoch travels in
the key, so persistent workers need no ``set_epoch``.

    >>> batches = EpochBatches(GlobalIndexSampler(6000, 2, 0, seed=0), batch_size=64)
    >>> batches.start(epoch=3, position=10)        # resume: step 10 of epoch 3
    >>> loader = batch_loader(TrainBatches(ds, transform, choose), batches, workers=2)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import Batch, ImageTransform, normalize, pil_to_uint8
from .sampler import GlobalIndexSampler

__all__ = ["BatchKey", "EpochBatches", "ImageCache", "TrainBatches", "augment_uint8", "batch_loader"]

SPARE_STEPS = 2  # how many following steps' rows a batch may take replacements from


class BatchKey(NamedTuple):
    epoch: int
    indices: list[int]
    spares: list[int]


class EpochBatches(Sampler[BatchKey]):
    """This rank's ``BatchKey`` per step of an epoch, from ``position`` (steps) on; drop_last."""

    def __init__(self, index_sampler: GlobalIndexSampler, batch_size: int):
        self.index_sampler, self.batch_size = index_sampler, int(batch_size)
        self.epoch = self.position = 0
        self.steps = index_sampler.num_samples // self.batch_size

    def start(self, epoch: int, position: int) -> None:
        """The next iteration yields epoch ``epoch`` from step ``position``."""
        self.epoch, self.position = int(epoch), int(position)

    def __len__(self) -> int:
        return max(0, self.steps - self.position)

    def __iter__(self):
        b, order = self.batch_size, self.index_sampler.indices(self.epoch)
        tail = order[self.steps * b :]  # this rank's rows dropped by drop_last: the first spares
        for s in range(self.position, self.steps):
            nxt = [order[((s + t) % self.steps) * b + j] for t in range(1, SPARE_STEPS + 1) for j in range(b)]
            rows = order[s * b : (s + 1) * b]
            taken = set(rows)
            yield BatchKey(self.epoch, rows, [i for i in tail + nxt if i not in taken])


class ImageCache:
    """Every image of a caption dataset decoded once: uint8 [N, 3, S, S] (short side to S, center
    square), and ``ok`` [N] bool (False: the file is missing or corrupt). Built with ``workers``
    DataLoader processes; 6,000 images at S = 112 take 226 MB."""

    def __init__(self, dataset, size: int, workers: int = 0):
        self.size = int(size)
        self.images = torch.zeros(len(dataset), 3, self.size, self.size, dtype=torch.uint8)
        self.ok = torch.zeros(len(dataset), dtype=torch.bool)
        loader = DataLoader(_Decode(dataset, self.size), batch_size=64, num_workers=workers, collate_fn=list)
        for items in loader:
            for index, image in items:
                if image is not None:
                    self.images[index], self.ok[index] = image, True


class _Decode(Dataset):
    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img = self.dataset._decode(self.dataset.image_root / self.dataset.names[index])
        fit = None if img is None else ImageOps.fit(img, (self.size, self.size), ImageOps.Image.BICUBIC)
        return index, None if fit is None else pil_to_uint8(fit)


def augment_uint8(transform: ImageTransform, image: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
    """``transform``'s random resized crop and flip on a cached uint8 [3, S, S] image, keyed by
    (transform.seed, epoch, index) as on PIL images; -> uint8 [3, size, size] when ``transform.uint8``,
    else normalized float."""
    gen = transform.generator(index, epoch)
    x0, y0, x1, y1 = transform._crop_box(image.shape[-1], image.shape[-2], gen)
    crop = image[None, :, y0:y1, x0:x1].float()
    out = F.interpolate(crop, size=(transform.size, transform.size), mode="bilinear", antialias=True)[0]
    if torch.rand((), generator=gen) < 0.5:
        out = out.flip(-1)
    out = out.round().clamp(0, 255)
    return out.to(torch.uint8) if getattr(transform, "uint8", False) else normalize(out)


class TrainBatches(Dataset):
    """``BatchKey`` -> ``Batch`` of (image, caption, index) items, corrupt ones replaced from the spares.

    Args:
        dataset: a caption dataset ((image, captions, index) or None per item).
        transform: an ``ImageTransform`` (train=True) or None (the dataset's images as they are).
        choose: ``choose(captions, index, epoch=)`` (LaCLIP / VeCLIP) or None (the first caption).
        cache: an ``ImageCache`` of ``dataset`` or None (decode per item).
    """

    def __init__(self, dataset, transform=None, choose=None, cache: ImageCache | None = None):
        self.dataset, self.transform, self.choose, self.cache = dataset, transform, choose, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, index: int, epoch: int):
        """(image float [3, S, S], caption or captions, index), or None for a corrupt image."""
        if self.cache is not None:
            if not self.cache.ok[index]:
                return None
            captions = self.dataset.captions[index]
            image = self.cache.images[index]
            image = (
                normalize(image)
                if self.transform is None
                else augment_uint8(self.transform, image, index, epoch)
            )
        else:
            if self.transform is not None:
                self.transform.set_epoch(epoch)
            item = self.dataset[index]
            if item is None:
                return None
            image, captions, _ = item
        if self.choose is not None:
            captions = self.choose(captions, index, epoch=epoch)
        return image, captions, index

    def __getitem__(self, key: BatchKey) -> Batch:
        items, spares, skipped = [], iter(key.spares), 0
        for index in key.indices:
            item = self.item(index, key.epoch)
            skipped += item is None
            while item is None:
                spare = next(spares, None)
                if spare is None:
                    raise RuntimeError(f"epoch {key.epoch}: more corrupt images than spares in a batch")
                item = self.item(spare, key.epoch)
            items.append(item)
        images, targets, indices = zip(*items, strict=True)
        return Batch(torch.stack(images), list(targets), torch.tensor(indices, dtype=torch.long), skipped)


def _one(batch):
    return batch


def batch_loader(
    dataset: TrainBatches, batches: EpochBatches, workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A loader of whole batches, built once per run: workers persist across epochs; ``pin_memory`` (CUDA)
    so that the step's host-to-device copy is asynchronous."""
    return DataLoader(
        dataset, batch_size=None, sampler=batches, num_workers=workers, collate_fn=_one, pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
    )  # fmt: skip
