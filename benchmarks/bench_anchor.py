"""FastCLIP's per-anchor ops: ``anchor_stats`` and ``anchor_grad`` (ours: chunked on CPU, Triton on a
GPU) vs the dense reference (``naive.py``: materialized [b, n] dots). Time, peak memory and TFLOP/s
from an explicit model: each op is one [b, n, D] matmul-equivalent, 2 b n D FLOPs (stats: dots;
grad: dots recomputed + W @ C, i.e. 4 b n D)."""

import statistics

import pytest
import torch
import torch.nn.functional as F
from harness import GIB, device, peak_bytes, sync

from fastclip_kernels.ops import anchor_grad, anchor_stats
from fastclip_kernels.ops.anchor.naive import anchor_grad_ref, anchor_stats_ref

CPU_SHAPES = [(1024, 4096, 512)]
GPU_SHAPES = [(4096, 32768, 768)]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")


def make_case(provider, b, n, d, dtype, op, dev):
    dtype = getattr(torch, dtype)
    a = F.normalize(torch.randn(b, d, device=dev), dim=-1).to(dtype)
    c = F.normalize(torch.randn(n, d, device=dev), dim=-1).to(dtype)
    s = torch.full((b,), 1 / 0.07, device=dev)
    lse, _, _ = anchor_stats(a, c, s, label_offset=0)
    row, col = (
        (s, lse, torch.rand(b, device=dev)),
        (torch.full((n,), 1 / 0.07, device=dev), torch.rand(n, device=dev) + 10, torch.rand(n, device=dev)),
    )
    pos_coef = torch.rand(b, device=dev)
    if op == "stats":
        if provider == "fastclip":
            return lambda: anchor_stats(a, c, s, label_offset=0)
        return lambda: anchor_stats_ref(a, c, s, 0)
    if provider == "fastclip":
        return lambda: anchor_grad(a, c, pos_coef, row=row, col=col, label_offset=0)
    return lambda: anchor_grad_ref(a, c, pos_coef, row, col, 0)


def _run(benchmark, record, shape, provider, op, dtype, rounds):
    b, n, d = shape
    dev = device()
    fn = make_case(provider, b, n, d, dtype, op, dev)
    fn()
    benchmark.pedantic(lambda: (fn(), sync()), rounds=rounds, warmup_rounds=0, iterations=1)
    median = statistics.median(benchmark.stats.stats.data)
    peak = peak_bytes(make_case, provider, b, n, d, dtype, op, dev)
    flops = (2 if op == "stats" else 4) * b * n * d
    record(
        bench=f"anchor_{op}", shape=f"b{b}-N{n}-d{d}-{dtype}", provider=provider, mode=op,
        median_ms=f"{median * 1e3:.2f}", peak_gib=f"{peak / GIB:.4f}", tflops=f"{flops / median / 1e12:.3f}",
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shapes; the GPU runs the GPU shapes")
@pytest.mark.parametrize("op", ["stats", "grad"])
@pytest.mark.parametrize("provider", ["materialized", "fastclip"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: f"b{s[0]}-N{s[1]}-d{s[2]}")
def test_anchor_cpu(benchmark, record, shape, provider, op):
    _run(benchmark, record, shape, provider, op, "float32", 3)


@needs_gpu
@pytest.mark.parametrize("op", ["stats", "grad"])
@pytest.mark.parametrize("provider", ["materialized", "fastclip"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"b{s[0]}-N{s[1]}-d{s[2]}")
def test_anchor_gpu(benchmark, record, shape, provider, op):
    _run(benchmark, record, shape, provider, op, "bfloat16", 10)
