"""Builders for a run's model-side objects: tokenizer, optimizer, LR schedule, device, eval loaders.

The data side is ``training.data.sources``, the loss and temperature ``training.objective``.
Everything is a function of the TrainConfig (and the run directory), so a resumed run rebuilds the
same objects and then loads their state.
"""

import hashlib
import math
import os

import torch
from torch.utils.data import DataLoader

from fastclip_kernels.optim import FusedAdamW, FusedLAMB

from .config import ConfigError
from .data.datasets import SkipCorrupt
from .model import param_groups
from .tokenizer import CaptionTokenizer

__all__ = ["device_of", "kernels", "loader", "lr_at", "optimizer", "tokenizer"]


def loader(dataset, batch_size, workers=0, pin_memory=False):
    """An in-order loader of ``Batch`` es (corrupt items dropped and counted): evaluation, shards."""
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=SkipCorrupt(), pin_memory=pin_memory
    )


def tokenizer(cfg, captions, run_dir):
    """Load ``data.tokenizer`` or the run's own, else the one trained on the same captions and vocabulary
    size by an earlier run under ``run.output_dir/tokenizers/``, else train one and save it there: HF's
    trainer may order merges of equal count differently between runs, so runs of one dataset share one
    tokenizer (same seed, same model)."""
    if cfg.model_text_tower == "adapter":  # LLM2CLIP: captions map to rows of the embedding cache
        from .llm2clip.cache import CacheTokenizer, EmbeddingCache

        return CacheTokenizer(EmbeddingCache(cfg.data_text_embeddings))
    path = cfg.data_tokenizer or os.path.join(run_dir, "tokenizer.json")
    if os.path.exists(path):
        return CaptionTokenizer.load(path)
    key = hashlib.sha256("\n".join([str(cfg.data_vocab_size), *captions]).encode()).hexdigest()[:16]
    shared = os.path.join(cfg.run_output_dir, "tokenizers", f"{key}.json")  # one per (captions, vocab size)
    if os.path.exists(shared):
        tok = CaptionTokenizer.load(shared)
    else:
        tok = CaptionTokenizer.train(captions, vocab_size=cfg.data_vocab_size, min_frequency=1)
        os.makedirs(os.path.dirname(shared), exist_ok=True)
        tok.save(shared)
    tok.save(path)
    return tok


def kernels(cfg, device=None) -> str:
    """The backend every op of the step gets (attention, patch embedding, loss, FastCLIP state update,
    optimizer): ``train.kernels``, "auto" (Triton on a GPU, PyTorch on a CPU) or "triton" (the GPU
    kernels everywhere; on a CPU ``device`` through the Triton interpreter, which needs
    TRITON_INTERPRET=1 in the environment before Triton is imported)."""
    if cfg.train_kernels == "triton" and device is not None and torch.device(device).type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                "train_kernels='triton' on a CPU device runs the Triton interpreter: start the run with "
                "TRITON_INTERPRET=1 in the environment (or use train.kernels=auto)"
            )
    return cfg.train_kernels


def optimizer(cfg, model, objective):
    """The fused optimizer over ``model``'s groups; the temperature's group as ``objective`` says;
    its kernels as ``train.kernels`` says."""
    objective.prepare(model)
    groups = param_groups(model, cfg.optim_weight_decay, lr_tau=objective.own_lr_tau())
    cls = FusedAdamW if cfg.optim_name == "adamw" else FusedLAMB
    clip = cfg.optim_grad_clip if cfg.optim_grad_clip > 0 else None
    return cls(groups, lr=cfg.optim_lr, betas=tuple(cfg.optim_betas), eps=cfg.optim_eps, max_grad_norm=clip,
               impl=getattr(cfg, "train_kernels", "auto"))  # fmt: skip


def lr_at(cfg, step, total_steps, peak=None, warmup=None):
    """Linear warmup (``optim.warmup_steps``) to the peak, then cosine to ``optim.min_lr`` at ``total_steps``."""
    peak = cfg.optim_lr if peak is None else peak
    warmup = min(cfg.optim_warmup_steps if warmup is None else warmup, max(total_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.optim_min_lr + 0.5 * (peak - cfg.optim_min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def device_of(cfg) -> torch.device:
    if cfg.run_device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.run_device)
