"""Packed patch embedding of the kept patches (CLIPA-style 25 % of a 14x14 grid): ours (Triton on a
GPU; the gather + matmul reference on CPU) vs the dense ``nn.Conv2d`` over all patches followed by
a gather of the kept tokens. Time, peak memory and TFLOP/s from the matmul model 2 T_p D C P^2
(fwd; x3 with the weight gradients)."""

import statistics

import pytest
import torch
import torch.nn.functional as F
from harness import GIB, device, peak_bytes, sync

from fastclip_kernels.ops.patch_embed import patch_embed, pos_embed_2d_sincos

CPU_SHAPES = [(8, 224, 16, 768, 49)]  # B, image size, P, D, kept patches per image
GPU_SHAPES = [(512, 224, 16, 768, 49)]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")


def make_case(provider, B, size, P, D, keep, dtype, mode, dev):
    dtype = getattr(torch, dtype)
    grid = size // P
    images = torch.randn(B, 3, size, size, device=dev, dtype=dtype)
    w = (torch.randn(D, 3, P, P, device=dev, dtype=dtype) * 0.02).requires_grad_(mode != "fwd")
    pos = pos_embed_2d_sincos(grid, grid, D).to(dev, dtype).requires_grad_(mode != "fwd")
    cls = torch.zeros(D, device=dev, dtype=dtype, requires_grad=mode != "fwd")
    keep_idx = torch.rand(B, grid * grid, device=dev).argsort(dim=1)[:, :keep]

    def ours():
        return patch_embed(images, w, None, pos, cls, keep_idx).tokens

    def dense():
        x = F.conv2d(images, w, stride=P).flatten(2).transpose(1, 2) + pos[1:]
        kept = x.gather(1, keep_idx[..., None].expand(-1, -1, D))
        return torch.cat([(cls + pos[0]).expand(B, 1, D), kept], dim=1).reshape(-1, D)

    fn = ours if provider == "fastclip" else dense

    def run():
        out = fn()
        if mode != "fwd":
            out.float().sum().backward()
        return out

    return run


def _run(benchmark, record, shape, provider, mode, dtype, rounds):
    B, size, P, D, keep = shape
    dev = device()
    fn = make_case(provider, B, size, P, D, keep, dtype, mode, dev)
    fn()
    benchmark.pedantic(lambda: (fn(), sync()), rounds=rounds, warmup_rounds=0, iterations=1)
    median = statistics.median(benchmark.stats.stats.data)
    peak = peak_bytes(make_case, provider, B, size, P, D, keep, dtype, mode, dev)
    flops = 2 * B * keep * D * 3 * P * P * (1 if mode == "fwd" else 2)  # dense conv: more, not counted
    record(
        bench="patch_embed", shape=f"B{B}-{size}px-P{P}-D{D}-keep{keep}-{dtype}", provider=provider, mode=mode,
        median_ms=f"{median * 1e3:.2f}", peak_gib=f"{peak / GIB:.4f}", tflops=f"{flops / median / 1e12:.3f}",
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shapes; the GPU runs the GPU shapes")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["dense_conv", "fastclip"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: f"B{s[0]}-keep{s[4]}")
def test_patch_embed_cpu(benchmark, record, shape, provider, mode):
    _run(benchmark, record, shape, provider, mode, "float32", 3)


@needs_gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["dense_conv", "fastclip"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"B{s[0]}-keep{s[4]}")
def test_patch_embed_gpu(benchmark, record, shape, provider, mode):
    _run(benchmark, record, shape, provider, mode, "bfloat16", 10)
