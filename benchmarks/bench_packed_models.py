"""Packed CLIP towers vs the dense, padded towers (same weights), forward + backward.

* Text: CLIP's text tower (vocab 49408, context 77, width 512, 12 layers, 8 heads) on captions with
  a realistic length distribution (log-normal, mean ~15 tokens, clipped to [4, 77]): ``padded77``
  (DenseTextTransformer on [B, 77] ids, SDPA causal) vs ``packed`` (PackedTextTransformer on the
  real tokens only, varlen attention). GPU target: packed >= 2.5x faster.
* Vision: ViT-B/16 at 224 px: ``packed-keep25`` (49 of 196 patches per image, CLIPA/FLIP random
  masking) vs ``packed-all`` and the dense ``dense-all`` / ``dense-keep25`` (open_clip
  PatchDropout). GPU target: packed-keep25 <= 0.3x the time of packed-all.

bf16 parameters and activations on a GPU; CPU runs tiny shapes in fp32 with the reference attention
so that ``pytest benchmarks/ --benchmark-only`` passes everywhere. TFLOP/s counts the *useful* work
of the real tokens (same count for padded and packed): per token and layer 24 D^2 (qkv, out, MLP),
per sequence and layer 4 n^2 D for attention (half of it when causal), patch embedding 2 K D per
patch; fwd+bwd = 3x fwd. ``vs_base`` is the time over the base provider's (padded77; packed-all).
"""

import math
import statistics

import pytest
import torch
from harness import GIB, device, peak_bytes, sync

from fastclip_kernels.models import DenseTextTransformer, DenseViT, PackedTextTransformer, PackedViT

ON_GPU = torch.cuda.is_available()
TEXT = (
    dict(vocab_size=49408, context_length=77, width=512, layers=12, heads=8, output_dim=512, batch=1024)
    if ON_GPU
    else dict(vocab_size=1000, context_length=77, width=64, layers=2, heads=2, output_dim=32, batch=16)
)
VIT = (
    dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512, batch=256)
    if ON_GPU
    else dict(image_size=64, patch_size=8, width=64, layers=2, heads=2, output_dim=32, batch=16)
)
ATTN = "auto" if ON_GPU else "reference"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ROUNDS = 10 if ON_GPU else 3
BASE = {"packed_text": "padded77", "packed_vit": "packed-all"}  # vs_base divides by this provider's time
_MEDIANS: dict[tuple[str, str], float] = {}


def caption_lengths(batch: int, context: int, seed: int = 0) -> list[int]:
    """Log-normal caption lengths (tokens incl. SOT/EOT), mean ~15, clipped to [4, context]."""
    gen = torch.Generator().manual_seed(seed)
    mu, sigma = math.log(15.0) - 0.125, 0.5  # E = exp(mu + sigma^2 / 2) = 15
    raw = torch.empty(batch, dtype=torch.float64).log_normal_(mu, sigma, generator=gen)
    return raw.round().clamp(4, context).long().tolist()


def _model_flops(width, layers, seqlens, causal, patch_k=0):
    tokens = sum(seqlens)
    attn = 4 * sum(n * n for n in seqlens) * width * (0.5 if causal else 1.0)
    patch = 2 * patch_k * width * (tokens - len(seqlens))
    return 3 * (layers * (24 * tokens * width**2 + attn) + patch)


def make_text_case(provider, dev):
    """One fwd+bwd of the text tower (module level: the CPU peak runs it in a spawned process)."""
    cfg = {k: v for k, v in TEXT.items() if k != "batch"}
    B, L = TEXT["batch"], TEXT["context_length"]
    torch.manual_seed(0)
    lengths = caption_lengths(B, L)
    ids = torch.randint(1, cfg["vocab_size"], (B, L), device=dev)
    if provider == "padded77":
        model = DenseTextTransformer(**cfg).to(dev, DTYPE)
        lens = torch.tensor(lengths, device=dev)
        step = lambda: model(ids, lens)  # noqa: E731
    else:
        model = PackedTextTransformer(**cfg, attn_backend=ATTN).to(dev, DTYPE)
        flat = torch.cat([ids[b, :n] for b, n in enumerate(lengths)])  # the loader's packed output
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        step = lambda: model(flat, cu, max(lengths))  # noqa: E731
    return _fwd_bwd(model, step), _model_flops(cfg["width"], cfg["layers"], lengths, causal=True)


def make_vit_case(provider, dev):
    cfg = {k: v for k, v in VIT.items() if k != "batch"}
    B = VIT["batch"]
    grid = (cfg["image_size"] // cfg["patch_size"]) ** 2
    keep = grid // 4 if provider.endswith("keep25") else grid
    torch.manual_seed(0)
    images = torch.randn(B, 3, cfg["image_size"], cfg["image_size"], device=dev)
    keep_idx = torch.rand(B, grid, device=dev).argsort(1)[:, :keep].sort(1).values if keep < grid else None
    cls = DenseViT if provider.startswith("dense") else PackedViT
    kw = {} if cls is DenseViT else dict(attn_backend=ATTN)
    model = cls(**cfg, **kw).to(dev, DTYPE)
    flops = _model_flops(cfg["width"], cfg["layers"], [1 + keep] * B, False, 3 * cfg["patch_size"] ** 2)
    return _fwd_bwd(model, lambda: model(images, keep_idx)), flops


def _fwd_bwd(model, step):
    def run():
        model.zero_grad(set_to_none=True)
        step().float().square().mean().backward()
        sync()

    return run


def _make(bench, provider, dev):
    return (make_text_case if bench == "packed_text" else make_vit_case)(provider, dev)[0]


def _run(benchmark, record, bench, provider, shape):
    dev = device()
    fn, flops = (make_text_case if bench == "packed_text" else make_vit_case)(provider, dev)
    fn()  # warm-up: Triton compiles on the first call
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    median = statistics.median(benchmark.stats.stats.data)
    peak = peak_bytes(_make, bench, provider, dev)
    _MEDIANS[bench, provider] = median
    base = _MEDIANS.get((bench, BASE[bench]))  # None when the base provider was deselected
    vs_base = f"{median / base:.3f}" if base else ""
    tflops = flops / median / 1e12
    benchmark.extra_info.update(peak_gib=peak / GIB, tflops=tflops, vs_base=vs_base)
    record(
        bench=bench, shape=shape, provider=provider, mode="fwd+bwd", median_ms=f"{median * 1e3:.2f}",
        peak_gib=f"{peak / GIB:.4f}", tflops=f"{tflops:.3f}", vs_base=vs_base,
    )  # fmt: skip


_TEXT_SHAPE = f"B{TEXT['batch']}-w{TEXT['width']}-L{TEXT['layers']}-mean15-{str(DTYPE)[6:]}"
_VIT_SHAPE = f"B{VIT['batch']}-{VIT['image_size']}px-p{VIT['patch_size']}-w{VIT['width']}-L{VIT['layers']}-{str(DTYPE)[6:]}"


@pytest.mark.parametrize("provider", ["padded77", "packed"])
def test_text_tower(benchmark, record, provider):
    _run(benchmark, record, "packed_text", provider, _TEXT_SHAPE)


@pytest.mark.parametrize("provider", ["packed-all", "packed-keep25", "dense-all", "dense-keep25"])
def test_vit_tower(benchmark, record, provider):
    _run(benchmark, record, "packed_vit", provider, _VIT_SHAPE)
