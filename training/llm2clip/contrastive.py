"""Caption-contrastive (CC) fine-tuning of a text encoder, and its diagnostic: caption retrieval accuracy.

LLM2CLIP tunes the LLM so that two captions of the same image land close: InfoNCE at tau = 0.02 over
caption pairs with in-batch negatives (their code adds one hard negative and a random direction;
here the library's symmetric ``FastContrastiveLoss`` with logit scale 1/tau, which covers both
directions). LoRA (r = 16, alpha = 16, dropout 0.05) through ``peft`` when it is installed, else the
whole model is tuned. CRA: for images with >= 2 captions, caption 0 of each image retrieves among
the caption-1s of all images (top-1), and back; LLM2CLIP reports 18 -> 73 for Llama-3-8B on COCO.

    >>> groups = [captions of image 0, captions of image 1, ...]
    >>> before = caption_retrieval_accuracy(enc, test_groups)
    >>> finetune(enc, train_groups, steps=300, batch_size=64)
    >>> after = caption_retrieval_accuracy(enc, test_groups)
"""

from __future__ import annotations

import random

import torch

from fastclip_kernels import FastContrastiveLoss
from fastclip_kernels.optim import FusedAdamW

from .encoder import MeanPoolEncoder

__all__ = [
    "add_lora",
    "caption_pairs",
    "caption_retrieval_accuracy",
    "finetune",
    "save_encoder",
    "top1_rates",
]

CC_TAU = 0.02


def _usable(groups) -> list[list[str]]:
    return [g for g in groups if len([c for c in g if c.strip()]) >= 2]


def caption_pairs(groups: list[list[str]], rng: random.Random) -> list[tuple[str, str]]:
    """One (query, positive) pair per image with >= 2 captions: two distinct captions in random order."""
    return [tuple(rng.sample([c for c in g if c.strip()], 2)) for g in _usable(groups)]


@torch.no_grad()
def caption_retrieval_accuracy(encoder: MeanPoolEncoder, groups, batch_size: int = 256) -> dict:
    """{"c0_to_c1", "c1_to_c0", "mean", "n"}: top-1 retrieval between the first two captions."""
    usable = _usable(groups)
    if len(usable) < 2:
        raise ValueError("caption retrieval needs at least 2 images with 2 captions each")
    first = encoder.encode([g[0] for g in usable], batch_size)
    second = encoder.encode([g[1] for g in usable], batch_size)
    a, b = top1_rates(first, second).tolist()
    return {"c0_to_c1": a, "c1_to_c0": b, "mean": (a + b) / 2, "n": len(usable)}


def top1_rates(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """first, second [n, d] (row i of each: one image) -> [2] top-1 rates first->second, second->first,
    computed on their device (fp32 scores; argmax ties go to the lowest index)."""
    sims = first.float() @ second.float().T
    target = torch.arange(sims.shape[0], device=sims.device)
    return torch.stack([(sims.argmax(1) == target).float().mean(), (sims.argmax(0) == target).float().mean()])


def add_lora(encoder: MeanPoolEncoder, r: int = 16, alpha: int = 16, dropout: float = 0.05) -> bool:
    """Wrap the encoder's model with LoRA adapters (peft); False when peft is not installed."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return False
    try:
        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout
        )  # peft picks the modules per model type
        encoder.model = get_peft_model(encoder.model, config)
    except ValueError:  # a model type peft has no default for
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear")
        encoder.model = get_peft_model(encoder.model, config)
    return True


def finetune(
    encoder: MeanPoolEncoder, groups, *, steps: int, batch_size: int = 64, lr: float | None = None,
    tau: float = CC_TAU, lora: bool | None = None, seed: int = 0, log=None,
) -> torch.Tensor:  # fmt: skip
    """CC fine-tuning for ``steps`` steps of ``batch_size`` images (one caption pair each) on the
    encoder's device; returns the losses [steps] on that device (no host read unless ``log`` is given). ``lora``: None = LoRA when peft is installed; lr default 2e-4 with LoRA, 2e-5 without."""
    usable = _usable(groups)
    if len(usable) < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the {len(usable)} images with 2+ captions")
    use_lora = add_lora(encoder) if lora in (None, True) else False
    if lora and not use_lora:
        raise ImportError("lora=True needs peft: pip install peft")
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = FusedAdamW(params, lr=lr or (2e-4 if use_lora else 2e-5), weight_decay=0.0)
    device = params[0].device
    loss_fn, scale = FastContrastiveLoss(), torch.tensor(1.0 / tau, device=device)
    rng, losses = random.Random(seed), torch.zeros(steps, device=device)
    encoder.train()
    for step in range(steps):
        pairs = caption_pairs(rng.sample(usable, batch_size), rng)
        query, positive = encoder([q for q, _ in pairs]), encoder([p for _, p in pairs])
        loss = loss_fn(query, positive, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.detach()  # stays on the device: read back only to log
        if log is not None and (step + 1) % 50 == 0:
            log(f"cc step {step + 1}/{steps} loss {losses[step - 49 : step + 1].mean().item():.4f}")
    encoder.eval()
    return losses


def save_encoder(encoder: MeanPoolEncoder, path) -> None:
    """Save a plain transformers folder (LoRA merged in) that ``MeanPoolEncoder(path)`` loads."""
    model = encoder.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        encoder.model = model
    model.save_pretrained(path)
    encoder.tokenizer.save_pretrained(path)
