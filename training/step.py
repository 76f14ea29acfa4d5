"""One training step's parts: CLIPA token reduction, the loss call per mode, mixed precision, and the
syntax-masking POS table.

Token reduction is seeded by (run seed, step): a resumed run draws the same masks. Image masks are
drawn for the whole global batch and rank r takes rows r, r + K, ... (the rows of its samples in the
single-process batch, see ``GlobalIndexSampler``), so they do not depend on the number of ranks K;
random / block text masks are drawn per rank (seeded by rank too). Truncation, resize and syntax
masking are deterministic.
"""

from __future__ import annotations

import contextlib
import os

import torch

from fastclip_kernels import tokens
from fastclip_kernels.tokens.syntax_table import build_syntax_rank, load_syntax_rank, save_syntax_rank

__all__ = ["autocast", "kept_patches", "loss_of", "pos_table", "reduce_tokens"]


def kept_patches(cfg, grid: tuple[int, int]) -> int:
    return max(1, round(cfg.clipa_image_keep * grid[0] * grid[1]))


def reduce_tokens(cfg, images, ids, lengths, step: int, ranks, patch_size: int, pos_rank=None):
    """CLIPA stage 1: (images (resized), ids, lengths, keep_idx [B, k] or None); ``ranks``: (rank, K)."""
    rank, world = ranks
    gen = torch.Generator().manual_seed(cfg.run_seed * 1_000_003 + step)
    keep_idx, strategy = None, cfg.clipa_image_strategy
    grid, rows = (images.shape[-2] // patch_size, images.shape[-1] // patch_size), images.shape[0] * world
    if strategy == "random":
        keep_idx = tokens.random_keep(rows, grid, kept_patches(cfg, grid), generator=gen)[rank::world]
    elif strategy == "block":
        keep_idx = tokens.block_keep(rows, grid, kept_patches(cfg, grid), generator=gen)[rank::world]
    elif strategy == "grid":
        keep_idx = tokens.grid_keep(rows, grid, generator=gen)[rank::world]
    elif strategy == "resize":
        images = tokens.resize_images(images, cfg.clipa_image_resize)
    text = cfg.clipa_text_strategy
    if text != "none" and ids.shape[1] > cfg.clipa_text_length:
        if text == "syntax":
            ids, lengths = tokens.syntax_mask(ids, lengths, cfg.clipa_text_length, pos_rank)
        else:
            fn = {"truncate": tokens.truncate, "random": tokens.random_mask, "block": tokens.block_mask}[text]
            text_gen = torch.Generator().manual_seed((cfg.run_seed * 1_000_003 + step) * 1009 + rank)
            extra = {} if text == "truncate" else {"generator": text_gen}
            ids, lengths = fn(ids, lengths, cfg.clipa_text_length, **extra)
    return images, ids, lengths, keep_idx


def pos_table(cfg, tokenizer, run_dir: str, is_main: bool = True):
    """The POS rank table [vocab] for syntax masking (None for other strategies): ``clipa.pos_table``
    if given, else the run's saved one, else built with NLTK by rank 0 and saved to the run."""
    if cfg.clipa_text_strategy != "syntax":
        return None
    path = cfg.clipa_pos_table or os.path.join(run_dir, "pos_rank.pt")
    if not os.path.exists(path):
        if cfg.clipa_pos_table:
            raise FileNotFoundError(f"clipa.pos_table: no file {cfg.clipa_pos_table}")
        if not is_main:
            raise FileNotFoundError(f"{path}: rank 0 should have written it")
        save_syntax_rank(build_syntax_rank(tokenizer.vocab(), tagger="nltk"), path)
    table = load_syntax_rank(path)
    if table.numel() != tokenizer.vocab_size:
        raise ValueError(
            f"clipa.pos_table has {table.numel()} entries; the tokenizer has {tokenizer.vocab_size}"
        )
    return table


def loss_of(cfg, loss_fn, model, img, txt, indices):
    """The configured loss of the features; ``model`` gives the temperature (and SigLIP's bias)."""
    if cfg.loss_mode == "clip":
        return loss_fn(img, txt, model.temperature())
    if cfg.loss_mode == "siglip":
        return loss_fn(img, txt, model.temperature(), model.logit_bias)
    scale = None if cfg.loss_mode == "rgcl" else model.temperature()
    return loss_fn(img, txt, scale, indices)


def autocast(cfg, device: torch.device):
    """bf16 autocast for the towers: on a GPU with precision auto/bf16, on a CPU only with bf16."""
    on = cfg.train_precision == "bf16" or (cfg.train_precision == "auto" and device.type == "cuda")
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
