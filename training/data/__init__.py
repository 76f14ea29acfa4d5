"""Data for the reference training loop: datasets, caption choice, the global-index sampler, synthetic scenes."""

from .captions import LaCLIPSampler, VeCLIPMixer, WithCaptionChoice
from .datasets import (
    CLIP_MEAN,
    CLIP_STD,
    Batch,
    CaptionFolderDataset,
    ImageFolderClasses,
    ImageTransform,
    ShardDataset,
    SkipCorrupt,
    normalize,
    write_shards,
)
from .sampler import GlobalIndexSampler
from .synthetic import SyntheticScenes, SyntheticZeroShot

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Batch",
    "CaptionFolderDataset",
    "GlobalIndexSampler",
    "ImageFolderClasses",
    "ImageTransform",
    "LaCLIPSampler",
    "ShardDataset",
    "SkipCorrupt",
    "SyntheticScenes",
    "SyntheticZeroShot",
    "VeCLIPMixer",
    "WithCaptionChoice",
    "normalize",
    "write_shards",
]
