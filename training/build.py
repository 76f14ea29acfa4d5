"""Builders for a run: datasets and evaluation sets, tokenizer, loss, optimizer, LR schedule.

Everything is a function of the TrainConfig (and the run directory), so a resumed run rebuilds the
same objects and then loads their state.
"""

import itertools
import math
import os

import torch
from torch.utils.data import DataLoader

from fastclip_kernels import FastCLIPLoss, FastContrastiveLoss, FastSigLipLoss
from fastclip_kernels.optim import FusedAdamW, FusedLAMB

from .data.captions import LaCLIPSampler, VeCLIPMixer, WithCaptionChoice
from .data.datasets import CaptionFolderDataset, ImageFolderClasses, ImageTransform, SkipCorrupt, normalize
from .data.stream import ShardStream, iter_captions
from .data.synthetic import SyntheticScenes, SyntheticZeroShot
from .model import param_groups
from .tokenizer import CaptionTokenizer

ZERO_SHOT_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
]


def _flickr_paths(cfg, split):
    root = cfg.resolve(cfg.data_path)
    table = os.path.join(root, "captions.tsv") if os.path.isdir(root) else root
    image_root = os.path.join(os.path.dirname(table), "images")
    split_file = os.path.join(os.path.dirname(table), "splits", f"{split}.txt")
    return table, image_root, split_file if os.path.exists(split_file) else None


def train_transform(cfg, image_size):
    """The training augmentation (keyed by sample index); None for the synthetic data."""
    return None if cfg.data_kind == "synthetic" else ImageTransform(image_size, train=True, seed=cfg.run_seed)


def train_dataset(cfg, transform):
    """(dataset of (image, captions, global index) or None for shards, training captions for the tokenizer)."""
    image_size = cfg.data_image_size
    if cfg.data_kind == "synthetic":
        ds = SyntheticScenes(cfg.data_num_samples, image_size, seed=cfg.run_seed, transform=normalize)
        captions = [c for i in range(min(len(ds), 2048)) for c in ds[i][1]]
    elif cfg.data_kind in ("flickr8k", "csv"):
        table, images, split = _flickr_paths(cfg, "train")
        ds = CaptionFolderDataset(table, images, split, transform=transform)
        captions = [c for caps in ds.captions for c in caps] if hasattr(ds, "captions") else []
    else:  # shards: the stream is built per rank by ``shard_stream``; captions from the first shard
        ds, captions = None, _shard_captions(cfg)
    choose = _caption_choice(cfg)
    if ds is not None and choose is not None:
        ds = WithCaptionChoice(ds, choose)
    return ds, captions


def _caption_choice(cfg):
    if cfg.data_caption_sampling == "laclip":
        return LaCLIPSampler(cfg.run_seed)
    if cfg.data_caption_sampling == "veclip":
        return VeCLIPMixer(cfg.data_veclip_p, cfg.run_seed)
    return None


def _shard_captions(cfg, limit: int | None = 100_000) -> list[str]:
    """Captions of the first ``limit`` shard samples (all with None), e.g. to train the tokenizer on."""
    samples = itertools.islice(iter_captions(cfg.resolve(cfg.data_path)), limit)
    return [c for _, captions in samples for c in captions]


def shard_stream(cfg, rank, world_size, local_batch, transform):
    return ShardStream(
        cfg.resolve(cfg.data_path), rank=rank, world_size=world_size, seed=cfg.run_seed, batch_size=local_batch,
        transform=transform, caption_choice=_caption_choice(cfg),
    )  # fmt: skip


def eval_sets(cfg, image_size):
    """{"zero_shot": (dataset, classes, templates) or None, "retrieval": dataset or None}."""
    if cfg.data_kind == "synthetic":
        n = min(512, cfg.data_num_samples)  # held-out scenes (other seeds)
        zs = SyntheticZeroShot(n, image_size, seed=cfg.run_seed + 1, transform=normalize)
        retrieval = SyntheticScenes(n, image_size, seed=cfg.run_seed + 2, transform=normalize)
        return {"zero_shot": (zs, zs.classes, zs.templates), "retrieval": retrieval}
    out = {"zero_shot": None, "retrieval": None}
    if cfg.eval_zeroshot_path and os.path.isdir(cfg.resolve(cfg.eval_zeroshot_path)):
        zs = ImageFolderClasses(cfg.resolve(cfg.eval_zeroshot_path), ImageTransform(image_size))
        out["zero_shot"] = (zs, zs.classes, ZERO_SHOT_TEMPLATES)
    if cfg.eval_retrieval_split != "none":
        table, images, split = _flickr_paths(cfg, cfg.eval_retrieval_split)
        if split is not None:
            out["retrieval"] = CaptionFolderDataset(
                table, images, split, transform=ImageTransform(image_size)
            )
    return out


def loader(dataset, batch_size, sampler=None, workers=0, shuffle=False):
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, num_workers=workers,
        collate_fn=SkipCorrupt(), drop_last=sampler is not None, persistent_workers=False,
    )  # fmt: skip


def tokenizer(cfg, captions, run_dir):
    """Load ``data.tokenizer`` or the run's own, else train one on the captions and save it. (HF's
    BPE trainer breaks count ties nondeterministically: the saved file is what makes resume exact.)"""
    if cfg.model_text_tower == "adapter":  # LLM2CLIP: captions map to rows of the embedding cache
        from .llm2clip.cache import CacheTokenizer, EmbeddingCache

        return CacheTokenizer(EmbeddingCache(cfg.data_text_embeddings))
    path = cfg.data_tokenizer or os.path.join(run_dir, "tokenizer.json")
    if os.path.exists(path):
        return CaptionTokenizer.load(path)
    tok = CaptionTokenizer.train(captions, vocab_size=cfg.data_vocab_size, min_frequency=1)
    tok.save(path)
    return tok


def loss_fn(cfg, data_size, device, rank=0, world_size=1):
    """The loss of ``loss.mode`` for this rank. With K > 1 ranks CLIP uses FastCLIP's low-communication
    gather (global loss, no collective in backward); SigLIP one no-grad gather, no backward collective."""
    if cfg.loss_mode == "clip":
        if world_size == 1:
            return FastContrastiveLoss()
        return FastContrastiveLoss(rank=rank, world_size=world_size, low_comm=True)
    if cfg.loss_mode == "siglip":
        return FastSigLipLoss(rank=rank, world_size=world_size)
    return FastCLIPLoss(
        data_size, cfg.loss_mode, rank=rank, world_size=world_size, gamma_min=cfg.loss_gamma_min,
        gamma_decay_epochs=cfg.loss_gamma_decay_epochs, eps=cfg.loss_eps, rho=cfg.loss_rho,
        tau_init=cfg.loss_temperature, lr_tau=cfg.loss_lr_tau, betas=tuple(cfg.optim_betas), device=device,
    )  # fmt: skip


def optimizer(cfg, model):
    if cfg.loss_mode in ("gcl", "rgcl"):  # constant (gcl) or per-sample in the loss state (rgcl)
        model.temperature.theta.requires_grad_(False)
    lr_tau = cfg.loss_lr_tau if cfg.loss_mode == "rgcl_g" else None
    groups = param_groups(model, cfg.optim_weight_decay, lr_tau=lr_tau)
    cls = FusedAdamW if cfg.optim_name == "adamw" else FusedLAMB
    clip = cfg.optim_grad_clip if cfg.optim_grad_clip > 0 else None
    return cls(groups, lr=cfg.optim_lr, betas=tuple(cfg.optim_betas), eps=cfg.optim_eps, max_grad_norm=clip)


def lr_at(cfg, step, total_steps, peak=None, warmup=None):
    """Linear warmup (``optim.warmup_steps``) to the peak, then cosine to ``optim.min_lr`` at ``total_steps``."""
    peak = cfg.optim_lr if peak is None else peak
    warmup = min(cfg.optim_warmup_steps if warmup is None else warmup, max(total_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.optim_min_lr + 0.5 * (peak - cfg.optim_min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr: float, temperature, lr_tau_schedule: str) -> None:
    for group in optimizer.param_groups:
        if "fastclip_lr_tau" in group:  # the temperature's own group (FastCLIP-v3)
            if lr_tau_schedule == "step_thresh":
                temperature.step_thresh_(group)
            continue
        group["lr"] = lr


def device_of(cfg) -> torch.device:
    if cfg.run_device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.run_device)
