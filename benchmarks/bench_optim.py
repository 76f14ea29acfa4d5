"""Optimizer step on a ViT-B/16 CLIP-sized parameter list (~150M parameters in ~300 tensors):
step time and achieved GB/s from a traffic model (AdamW >= 28 B per fp32 parameter: read p, g, m, v,
write p, m, v; LAMB 44 B: a second pass reads p, m, v and writes p).

Providers: torch AdamW foreach / fused, ours (reference on CPU; Triton and native CUDA on a GPU), a
per-tensor Python LAMB (our reference, as pytorch-lamb style code runs) and the fused LAMBs, and apex
FusedAdam / FusedLAMB when installed. CPU runs the full list with 3 rounds; GPU targets on an H200:
>= 85% of HBM bandwidth, >= 1.0x torch fused AdamW, >= 3x the per-tensor LAMB.
"""

import statistics

import pytest
import torch
from harness import device, sync

from fastclip_kernels.optim import FusedAdamW, FusedLAMB

BYTES_PER_PARAM = {"adamw": 28, "lamb": 44}


def _vit_b16_clip_shapes():
    """Parameter shapes of OpenAI CLIP ViT-B/16 (149.6M parameters, 302 tensors)."""
    shapes = [(768, 3, 16, 16), (768,), (197, 768), (768,), (768,)]  # patch, cls, pos, ln_pre
    for width, layers in ((768, 12), (512, 12)):
        for _ in range(layers):
            shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
            shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    shapes += [(768,), (768,), (768, 512), (49408, 512), (77, 512), (512,), (512,), (512, 512), ()]
    return shapes


def _params(dev):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dev).requires_grad_() for s in _vit_b16_clip_shapes()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _optimizer(provider, params):
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.2},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kind, impl = provider.split("-", 1)
    if kind == "torch":
        return torch.optim.AdamW(groups, lr=1e-3, **{impl: True})
    if kind == "apex":
        apex_optimizers = pytest.importorskip("apex.optimizers", reason="apex (NVIDIA) not installed")
        cls = apex_optimizers.FusedAdam if impl == "adamw" else apex_optimizers.FusedLAMB
        return cls(groups, lr=1e-3)
    cls = FusedAdamW if kind == "ours" else FusedLAMB
    return cls(groups, lr=1e-3, impl=impl)


CPU_PROVIDERS = [
    "torch-foreach",
    "torch-fused",
    "ours-reference",
    "ours-native",
    "lamb-reference",
    "lamb-native",
]
GPU_PROVIDERS = [
    "torch-foreach", "torch-fused", "ours-triton", "ours-native",
    "lamb-reference", "lamb-triton", "lamb-native", "apex-adamw", "apex-lamb",
]  # fmt: skip


def _run(benchmark, record, provider, rounds):
    dev = device()
    params = _params(dev)
    opt = _optimizer(provider, params)
    if provider.endswith("native"):
        from fastclip_kernels.ops.optim import native

        if not native.available(torch.device(dev)):
            pytest.skip("fastclip_kernels._C has no CUDA kernels (built without nvcc)")
    opt.step()  # warm-up: state allocation, compilation, pointer tables
    sync()
    benchmark.pedantic(lambda: (opt.step(), sync()), rounds=rounds, warmup_rounds=1, iterations=1)
    median = statistics.median(benchmark.stats.stats.data)
    numel = sum(p.numel() for p in params)
    algo = "lamb" if provider.startswith(("lamb", "apex-lamb")) else "adamw"
    gbps = BYTES_PER_PARAM[algo] * numel / median / 1e9
    benchmark.extra_info.update(params=numel, gbps=gbps)
    record(
        bench="optimizer_step", shape=f"vit-b16-clip-{numel / 1e6:.1f}M-{len(params)}t", provider=provider,
        mode=algo, median_ms=f"{median * 1e3:.2f}", peak_gib="", tflops="", gbps=f"{gbps:.1f}",
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU providers; the GPU runs the GPU list")
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_optimizer_step_cpu(benchmark, record, provider):
    _run(benchmark, record, provider, rounds=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_optimizer_step_gpu(benchmark, record, provider):
    _run(benchmark, record, provider, rounds=20)
