"""The loop's training step (``training.step.TrainStep``) at the smallest honest size, for the tests that
run it on another path: the Triton interpreter (``train.kernels=triton``), the meta device, the host-read
probe. Width 32, one layer and two heads per tower, patch 8 on 32 px images (16 patches), batch 8,
captions of up to 16 tokens masked to 8, CLIPA random image masking (half the patches) unless told.

    >>> cfg = tiny_cfg(monkeypatch, "rgcl_g")
    >>> model, objective, opt, step = tiny_parts(cfg, torch.device("cpu"))
    >>> loss, flops = step(tiny_batch(0), 0, 1, cfg.optim_lr, 10)
"""

import torch

from training import build, config, dist
from training.config import parse_args
from training.data.datasets import Batch
from training.model import build_model
from training.objective import Objective
from training.step import TrainStep
from training.tokenizer import CaptionTokenizer

MODES = ["clip", "siglip", "gcl", "gcl_g", "rgcl", "rgcl_g"]
SIZE = (32, 1, 2, 8, 32, 1, 2, 32)  # MODEL_SIZES' layout: vision w, layers, heads, patch, text w, l, h, out
BATCH, SAMPLES, IMAGE = 8, 64, 32
CAPTIONS = [
    "a small red circle on the left of a big blue square near the top",
    "two green triangles under one yellow star in the middle of the picture",
    "a large purple square above three small orange circles at the bottom right",
    "one blue star and one red triangle side by side on a white ground",
]


def tiny_cfg(monkeypatch, mode: str, *extra: str):
    """The demo preset at the size above (``model.size tiny`` patched to it for this test)."""
    monkeypatch.setitem(config.MODEL_SIZES, "tiny", SIZE)
    return parse_args([
        "--preset", "demo", "--model.size", "tiny", "--loss.mode", mode, "--data.image_size", str(IMAGE),
        "--data.context_length", "16", "--data.num_samples", str(SAMPLES), "--train.batch_size", str(BATCH),
        "--clipa.image_strategy", "random", "--clipa.text_strategy", "random", "--clipa.text_length", "8",
        "--optim.warmup_steps", "0", *extra,
    ])  # fmt: skip


def tiny_tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=64, min_frequency=1)


def tiny_parts(cfg, device, tok=None, seed: int = 0):
    """(model, objective, optimizer, TrainStep) on ``device``, the model initialized from ``seed``."""
    tok = tok or tiny_tokenizer()
    torch.manual_seed(seed)
    model = build_model(cfg, tok.vocab_size).to(device)
    if cfg.clipa_image_strategy == "resize":  # as the loop's Run: stage 1 at the smaller size
        model.visual.resize_pos_embed(cfg.clipa_image_resize)
    objective = Objective(cfg, SAMPLES, device)
    opt = build.optimizer(cfg, model, objective)
    step = TrainStep(cfg, tok, model, model, objective, opt, dist.Ranks(device=device), device)
    return model, objective, opt, step


def tiny_batch(step: int, image_size: int = IMAGE) -> Batch:
    """A loader's batch (CPU tensors, captions as text) for ``step``."""
    gen = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(BATCH, 3, image_size, image_size, generator=gen)
    texts = [CAPTIONS[int(i)] for i in torch.randint(len(CAPTIONS), (BATCH,), generator=gen)]
    indices = torch.randperm(SAMPLES, generator=gen)[:BATCH]
    return Batch(images, texts, indices, 0)
