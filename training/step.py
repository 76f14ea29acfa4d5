"""One training step, top to bottom: batch -> tokens -> token reduction -> device -> packed towers ->
features -> loss -> backward -> update.

``TrainStep.__call__`` is the whole step; ``to_device`` is the only place a batch moves to the model's
device (images as uint8 when the data gives them so, ids, CLIPA's keep_idx, the global indices); uint8
images are normalized there (``device_images``) and CLIPA's resize runs there too, after the copy.
CLIPA token reduction is seeded by
``seeds.generator`` from (run seed, step) for image masks, drawn for the whole global batch so that
rank r's rows (r, r + K, ...) do not depend on K, and from (run seed, step, rank) for random / block
text masks. Truncation, resize and syntax masking are deterministic.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch

from fastclip_kernels import tokens
from fastclip_kernels.tokens.syntax_table import build_syntax_rank, load_syntax_rank, save_syntax_rank

from . import dist
from .data.datasets import normalize
from .monitor import step_flops
from .seeds import generator

__all__ = [
    "DeviceBatch",
    "FiniteWatch",
    "NonFiniteLoss",
    "TrainStep",
    "autocast",
    "device_images",
    "pos_table",
    "reduce_tokens",
    "to_device",
]


class NonFiniteLoss(RuntimeError):
    pass


class FiniteWatch:
    """The first step whose mean loss was not finite, kept on the device: ``update`` each step (no host
    read), ``check`` where the loop reads the device anyway (log rows, checkpoints, evaluation, the
    end): one read, and NonFiniteLoss naming that step. Steps after a non-finite loss still run (their
    updates may spoil the model in memory); the loop checks before it saves, so no checkpoint holds them.
    """

    def __init__(self):
        self.first_bad: torch.Tensor | None = None  # 0-d int64 on the loss's device; 0: none yet

    def update(self, mean_loss: torch.Tensor, step: int) -> None:
        """Record ``step`` (0-based) if ``mean_loss`` is not finite and no earlier step was."""
        first = (
            self.first_bad if self.first_bad is not None else torch.zeros_like(mean_loss, dtype=torch.int64)
        )
        self.first_bad = torch.where(torch.isfinite(mean_loss).logical_not() & (first == 0), step + 1, first)

    def check(self) -> None:
        """Raise NonFiniteLoss if a step so far had a non-finite loss (reads one int back)."""
        bad = 0 if self.first_bad is None else int(self.first_bad)
        if bad:
            raise NonFiniteLoss(f"non-finite loss at step {bad}; last checkpoint kept")


class DeviceBatch(NamedTuple):
    """A step's inputs on the model's device: images [B, 3, H, W], ids [B, L], keep_idx [B, k] or None,
    indices [B] (global); lengths stay a host list (the packed towers' cu_seqlens are built from it)."""

    images: torch.Tensor
    ids: torch.Tensor
    lengths: list[int]
    keep_idx: torch.Tensor | None
    indices: torch.Tensor


def to_device(images, ids, lengths, keep_idx, indices, device) -> DeviceBatch:
    """Every tensor of the step to ``device`` (the one move of the step)."""
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return DeviceBatch(move(images), move(ids), [int(n) for n in lengths], move(keep_idx), move(indices))


def kept_patches(cfg, grid: tuple[int, int]) -> int:
    return max(1, round(cfg.clipa_image_keep * grid[0] * grid[1]))


def device_images(cfg, images: torch.Tensor, stage: int) -> torch.Tensor:
    """Images on the model's device -> the towers' input: uint8 normalized with CLIP's mean/std (fp32),
    then in CLIPA stage 1 with the resize strategy resized to ``clipa.image_resize`` (deterministic)."""
    if images.dtype == torch.uint8:
        images = normalize(images)
    if stage == 1 and cfg.clipa_image_strategy == "resize":
        images = tokens.resize_images(images, cfg.clipa_image_resize)
    return images


def reduce_tokens(cfg, images, ids, lengths, step: int, ranks, patch_size: int, pos_rank=None):
    """CLIPA stage 1: (images, ids, lengths, keep_idx [B, k] or None); ``ranks``: (rank, K). Images are
    only read for their shape: the resize strategy runs on the device (``device_images``)."""
    rank, world = ranks
    gen = generator(cfg.run_seed, "image_mask", step)
    keep_idx, strategy = None, cfg.clipa_image_strategy
    grid, rows = (images.shape[-2] // patch_size, images.shape[-1] // patch_size), images.shape[0] * world
    if strategy == "random":
        keep_idx = tokens.random_keep(rows, grid, kept_patches(cfg, grid), generator=gen)[rank::world]
    elif strategy == "block":
        keep_idx = tokens.block_keep(rows, grid, kept_patches(cfg, grid), generator=gen)[rank::world]
    elif strategy == "grid":
        keep_idx = tokens.grid_keep(rows, grid, generator=gen)[rank::world]
    text = cfg.clipa_text_strategy
    if text != "none" and ids.shape[1] > cfg.clipa_text_length:
        if text == "syntax":
            ids, lengths = tokens.syntax_mask(ids, lengths, cfg.clipa_text_length, pos_rank)
        else:
            fn = {"truncate": tokens.truncate, "random": tokens.random_mask, "block": tokens.block_mask}[text]
            extra = (
                {} if text == "truncate" else {"generator": generator(cfg.run_seed, "text_mask", step, rank)}
            )
            ids, lengths = fn(ids, lengths, cfg.clipa_text_length, **extra)
    return images, ids, lengths, keep_idx


class TrainStep:
    """One optimizer step of a run: ``step(batch, step, stage, lr) -> (mean loss over ranks, FLOPs)``.
    No host read: the loss stays on the device and a non-finite one is recorded in ``watch``
    (:class:`FiniteWatch`, which the loop checks at its log steps).

    Args: cfg (TrainConfig), tok (``encode_batch(texts, L) -> ids, lengths``), net (the model, maybe
    DDP / compiled), model (the bare CLIP), objective (``training.objective.Objective``), optimizer,
    ranks (``dist.Ranks``), device, pos_rank (syntax masking's table or None), watch (a FiniteWatch
    shared over the run; a new one if None).
    """

    def __init__(self, cfg, tok, net, model, objective, optimizer, ranks, device, pos_rank=None, watch=None):
        self.cfg, self.tok, self.net, self.model, self.objective = cfg, tok, net, model, objective
        self.opt, self.ranks, self.device, self.pos_rank = optimizer, ranks, device, pos_rank
        self.watch = watch if watch is not None else FiniteWatch()
        self.patch = cfg.model_dims()["patch_size"]

    def __call__(self, batch, step: int, stage: int, lr: float, total_steps: int):
        cfg = self.cfg
        texts = [t if isinstance(t, str) else t[0] for t in batch.targets]
        ids, lengths = self.tok.encode_batch(texts, cfg.data_context_length)
        images, keep_idx = batch.images, None
        if stage == 1:
            ranks = (self.ranks.rank, self.ranks.world_size)
            images, ids, lengths, keep_idx = reduce_tokens(
                cfg, images, ids, lengths, step, ranks, self.patch, self.pos_rank
            )
        x = to_device(images, ids, lengths.tolist(), keep_idx, batch.indices, self.device)
        x = x._replace(images=device_images(cfg, x.images, stage))
        self.objective.set_lr(self.opt, lr, self.model, step, total_steps)
        with autocast(cfg, self.device):
            img, txt = self.net(x.images, x.ids, x.lengths, x.keep_idx)
        loss = self.objective.loss(self.model, img.float(), txt.float(), x.indices)
        mean_loss = dist.mean_over_ranks(loss, self.ranks)
        self.watch.update(mean_loss, step)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.objective.after_update(self.model)
        grid = (x.images.shape[-2] // self.patch, x.images.shape[-1] // self.patch)
        n_img = keep_idx.shape[1] if keep_idx is not None else grid[0] * grid[1]
        return mean_loss, step_flops(cfg.model_dims(), [n_img] * len(texts), x.lengths)


def pos_table(cfg, tokenizer, run_dir: str, is_main: bool = True):
    """The POS rank table [vocab] for syntax masking (None for other strategies): ``clipa.pos_table``
    if given, else the run's saved one, else built with ``clipa.syntax_tagger`` by rank 0 and saved to the run."""
    if cfg.clipa_text_strategy != "syntax":
        return None
    path = cfg.clipa_pos_table or os.path.join(run_dir, "pos_rank.pt")
    if not os.path.exists(path):
        if cfg.clipa_pos_table:
            raise FileNotFoundError(f"clipa.pos_table: no file {cfg.clipa_pos_table}")
        if not is_main:
            raise FileNotFoundError(f"{path}: rank 0 should have written it")
        save_syntax_rank(build_syntax_rank(tokenizer.vocab(), tagger=cfg.clipa_syntax_tagger), path)
    table = load_syntax_rank(path)
    if table.numel() != tokenizer.vocab_size:
        raise ValueError(
            f"clipa.pos_table has {table.numel()} entries; the tokenizer has {tokenizer.vocab_size}"
        )
    return table


def autocast(cfg, device: torch.device):
    """bf16 autocast for the towers: on a GPU with precision auto/bf16, on a CPU only with bf16."""
    on = cfg.train_precision == "bf16" or (cfg.train_precision == "auto" and device.type == "cuda")
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
