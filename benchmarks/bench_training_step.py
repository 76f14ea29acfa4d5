"""One whole CLIP training step (both towers, loss, backward, fused AdamW), samples/s and MFU.

ViT-B/16 at 224 px + CLIP's text tower (12 x 512, vocab 49408, context 77), batch 256 on a GPU
(``FASTCLIP_BENCH_STEP_BATCH`` to change it), bf16 autocast with fp32 parameters as in
``training/``; captions with a realistic length distribution (mean ~15 tokens). Providers:

* ``packed-keep50`` / ``packed-keep25``: CLIPA / FLIP stage 1 - 98 or 49 of the 196 patches kept per
  image (random), packed text (real tokens only), the library's tiled loss (FastContrastiveLoss).
* ``packed-full``: all 196 patches, packed text, the tiled loss.
* ``dense-full``: the baseline - dense towers on all patches and text padded to 77 (SDPA), and the
  materialized loss (the [B, B] logits and two cross-entropies, as open_clip's ClipLoss).

samples/s = batch / median step time; MFU = the model FLOPs of the tokens computed (the training
loop's ``step_flops``: the dense baseline is charged for its padding too) over the GPU's dense bf16
peak; ``vs_base`` = dense-full's time over this provider's (a speed-up). CPU: tiny sizes, fp32,
reference attention, so that ``pytest benchmarks/ --benchmark-only`` passes everywhere.
"""

import os
import statistics

import pytest
import torch
from bench_packed_models import caption_lengths
from harness import device, sync

from fastclip_kernels import FastContrastiveLoss
from fastclip_kernels.models import DenseTextTransformer, DenseViT, PackedTextTransformer, PackedViT
from fastclip_kernels.ops.contrastive_loss.naive import contrastive_loss_ref
from fastclip_kernels.optim import FusedAdamW
from training.monitor import peak_flops, step_flops

ON_GPU = torch.cuda.is_available()
BATCH = int(os.environ.get("FASTCLIP_BENCH_STEP_BATCH", 256)) if ON_GPU else 8
VIT = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512) if ON_GPU else \
    dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, output_dim=32)  # fmt: skip
TEXT = dict(vocab_size=49408, context_length=77, width=512, layers=12, heads=8, output_dim=512) if ON_GPU else \
    dict(vocab_size=1000, context_length=77, width=64, layers=2, heads=2, output_dim=32)  # fmt: skip
ATTN = "auto" if ON_GPU else "reference"
ROUNDS = 10 if ON_GPU else 2
KEEP = {"packed-keep50": 0.5, "packed-keep25": 0.25, "packed-full": 1.0, "dense-full": 1.0}
_MEDIANS: dict[str, float] = {}


def _dims():
    return dict(vision_width=VIT["width"], vision_layers=VIT["layers"], patch_size=VIT["patch_size"],
                output_dim=VIT["output_dim"], text_width=TEXT["width"], text_layers=TEXT["layers"])  # fmt: skip


def make_step(provider: str, dev):
    """(step callable, model FLOPs of one step)."""
    torch.manual_seed(0)
    grid = (VIT["image_size"] // VIT["patch_size"]) ** 2
    keep = max(1, round(KEEP[provider] * grid))
    lengths = caption_lengths(BATCH, TEXT["context_length"])
    images = torch.randn(BATCH, 3, VIT["image_size"], VIT["image_size"], device=dev)
    ids = torch.randint(4, TEXT["vocab_size"], (BATCH, TEXT["context_length"]), device=dev)
    keep_idx = (
        torch.rand(BATCH, grid, device=dev).argsort(1)[:, :keep].sort(1).values if keep < grid else None
    )
    if provider == "dense-full":
        vit, text = DenseViT(**VIT), DenseTextTransformer(**TEXT)
        lens = torch.tensor(lengths, device=dev)
        towers = lambda: (vit(images), text(ids, lens))  # noqa: E731
        loss_fn = lambda i, t, s: contrastive_loss_ref(i, t, s)  # noqa: E731
        flops = step_flops(_dims(), [grid] * BATCH, [TEXT["context_length"]] * BATCH)
    else:
        vit, text = PackedViT(**VIT, attn_backend=ATTN), PackedTextTransformer(**TEXT, attn_backend=ATTN)
        towers = lambda: (vit(images, keep_idx), text(ids, lengths=lengths))  # noqa: E731
        loss_fn = FastContrastiveLoss()
        flops = step_flops(_dims(), [keep] * BATCH, lengths)
    vit, text = vit.to(dev), text.to(dev)
    scale = torch.nn.Parameter(torch.tensor(1 / 0.07, device=dev))
    opt = FusedAdamW([*vit.parameters(), *text.parameters(), scale], lr=1e-4)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if ON_GPU else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            img, txt = towers()
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        loss_fn(img, txt, scale).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    return step, flops


@pytest.mark.parametrize("provider", ["dense-full", "packed-full", "packed-keep50", "packed-keep25"])
def test_training_step(benchmark, record, provider):
    dev = device()
    step, flops = make_step(provider, dev)
    step()  # warm-up: Triton compiles, optimizer state
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    median = statistics.median(benchmark.stats.stats.data)
    _MEDIANS[provider] = median
    base = _MEDIANS.get("dense-full")
    peak = peak_flops(torch.device(dev))
    mfu = f"{flops / median / peak:.3f}" if peak else ""
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else float("nan")
    benchmark.extra_info.update(samples_per_s=BATCH / median, mfu=mfu)
    record(
        bench="training_step", shape=f"B{BATCH}-vit{VIT['width']}x{VIT['layers']}-text{TEXT['width']}x{TEXT['layers']}",
        provider=provider, mode="step", median_ms=f"{median * 1e3:.2f}", samples_per_s=f"{BATCH / median:.1f}",
        mfu=mfu, peak_gib=f"{peak_gib:.3f}", tflops=f"{flops / median / 1e12:.3f}",
        vs_base=f"{base / median:.3f}" if base else "",
    )  # fmt: skip
