"""The data of a run, from its TrainConfig: training set and its batches, evaluation sets, captions.

Imports only ``training.data`` (no model, loss or tokenizer), so tools such as the LLM2CLIP embedding
cache can list a run's texts without importing the training loop.
"""

from __future__ import annotations

import itertools
import os

from PIL import Image, ImageOps

from ..seeds import data_seed
from .batches import EpochBatches, ImageCache, TrainBatches, batch_loader
from .captions import LaCLIPSampler, VeCLIPMixer, alt_and_enriched
from .datasets import CaptionFolderDataset, ImageFolderClasses, ImageTransform, normalize, pil_to_uint8
from .sampler import GlobalIndexSampler
from .stream import ShardStream, iter_captions
from .synthetic import SyntheticScenes, SyntheticZeroShot

__all__ = ["ZERO_SHOT_TEMPLATES", "caption_choice", "eval_sets", "shard_captions", "shard_stream",
           "train_batches", "train_dataset", "train_transform"]  # fmt: skip

ZERO_SHOT_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
]
SYNTHETIC_EVAL_SIZE = 512  # held-out synthetic scenes for evaluation
TOKENIZER_CAPTIONS = 2048  # synthetic images whose captions train the tokenizer


def flickr_paths(cfg, split):
    """(caption table, image folder, split file or None) of a flickr8k / csv dataset."""
    root = cfg.resolve(cfg.data_path)
    table = os.path.join(root, "captions.tsv") if os.path.isdir(root) else root
    image_root = os.path.join(os.path.dirname(table), "images")
    split_file = os.path.join(os.path.dirname(table), "splits", f"{split}.txt")
    return table, image_root, split_file if os.path.exists(split_file) else None


def train_transform(cfg, image_size):
    """The training augmentation (keyed by sample index; uint8 out, normalized by the step on the device);
    None for the synthetic data."""
    if cfg.data_kind == "synthetic":
        return None
    return ImageTransform(image_size, train=True, seed=cfg.run_seed, uint8=True)


def train_dataset(cfg, transform=None):
    """(dataset of (image, captions, global index) or None for shards, training captions for the tokenizer)."""
    if cfg.data_kind == "synthetic":
        ds = SyntheticScenes(cfg.data_num_samples, cfg.data_image_size, seed=cfg.run_seed)  # uint8
        captions = [c for i in range(min(len(ds), TOKENIZER_CAPTIONS)) for c in ds[i][1]]
    elif cfg.data_kind in ("flickr8k", "csv"):
        table, images, split = flickr_paths(cfg, "train")
        ds = CaptionFolderDataset(table, images, split, transform=transform)
        if cfg.data_train_captions == "alt-enriched":
            ds.captions = [alt_and_enriched(caps) for caps in ds.captions]
        captions = [c for caps in ds.captions for c in caps]
    else:  # shards: the stream is built per rank by ``shard_stream``
        ds, captions = None, shard_captions(cfg)
    return ds, captions


def caption_choice(cfg):
    """LaCLIP / VeCLIP caption choice ``choose(captions, index, epoch=)``, or None (the first caption)."""
    if cfg.data_caption_sampling == "laclip":
        return LaCLIPSampler(cfg.run_seed)
    if cfg.data_caption_sampling == "veclip":
        return VeCLIPMixer(cfg.data_veclip_p, cfg.run_seed)
    return None


def train_batches(cfg, dataset, sampler: GlobalIndexSampler, local_batch: int, transform, pin_memory=False):
    """(EpochBatches, loader of full batches built once) for a map-style training set; flickr8k / csv
    images are decoded once into memory when ``data.cache_images``; ``pin_memory``: on CUDA."""
    cache = None
    if cfg.data_cache_images and isinstance(dataset, CaptionFolderDataset):
        cache = ImageCache(dataset, cfg.data_image_size, workers=cfg.data_num_workers)
    batches = EpochBatches(sampler, local_batch)
    data = TrainBatches(dataset, transform, caption_choice(cfg), cache)
    return batches, batch_loader(data, batches, cfg.data_num_workers, pin_memory)


def shard_captions(cfg, limit: int | None = 100_000) -> list[str]:
    """Captions of the first ``limit`` shard samples (all with None), e.g. to train the tokenizer on."""
    samples = itertools.islice(iter_captions(cfg.resolve(cfg.data_path)), limit)
    return [c for _, captions in samples for c in captions]


def shard_stream(cfg, rank, world_size, local_batch, transform):
    return ShardStream(
        cfg.resolve(cfg.data_path), rank=rank, world_size=world_size, seed=cfg.run_seed, batch_size=local_batch,
        transform=transform, caption_choice=caption_choice(cfg),
    )  # fmt: skip


class _EvalTransform:
    """Short side to ``size``, center square, uint8 (normalized at evaluation; 4x smaller to cache)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img):
        return pil_to_uint8(ImageOps.fit(img, (self.size, self.size), Image.BICUBIC))


def eval_sets(cfg, image_size):
    """{"zero_shot": (dataset, classes, templates) or None, "retrieval": dataset or None}."""
    if cfg.data_kind == "synthetic":
        n = min(SYNTHETIC_EVAL_SIZE, cfg.data_num_samples)  # held-out scenes (other seeds)
        zs = SyntheticZeroShot(
            n, image_size, seed=data_seed(cfg.run_seed, "eval_zero_shot"), transform=normalize
        )
        retrieval = SyntheticScenes(
            n, image_size, seed=data_seed(cfg.run_seed, "eval_retrieval"), transform=normalize
        )
        return {"zero_shot": (zs, zs.classes, zs.templates), "retrieval": retrieval}
    out = {"zero_shot": None, "retrieval": None}
    if cfg.eval_zeroshot_path and os.path.isdir(cfg.resolve(cfg.eval_zeroshot_path)):
        zs = ImageFolderClasses(cfg.resolve(cfg.eval_zeroshot_path), _EvalTransform(image_size))
        out["zero_shot"] = (zs, zs.classes, ZERO_SHOT_TEMPLATES)
    if cfg.eval_retrieval_split != "none":
        table, images, split = flickr_paths(cfg, cfg.eval_retrieval_split)
        if split is not None:
            out["retrieval"] = CaptionFolderDataset(
                table, images, split, transform=_EvalTransform(image_size)
            )
    return out
