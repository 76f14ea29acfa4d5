"""FastCLIP losses: loss + state update, fwd+bwd, per mode vs the ``clip`` mode and vs a
materialized dense implementation (fast_clip-style: [n, n] similarities, exp, masks); and, on a
GPU, the fused state-update kernel vs the same update in plain PyTorch ops (target >= 5x at a
global batch of 32k).

Single process (b = n). CPU runs n = 2048 (8192 with FASTCLIP_BENCH_FULL=1); GPU n = 4096, 32768.
"""

from functools import partial

import os
import statistics

import pytest
import torch
import torch.nn.functional as F
from harness import fwd_bwd_callable, machine, run_loss_benchmark, sync

from fastclip_kernels.fastclip import FastCLIPLoss, FastCLIPState
from fastclip_kernels.ops.state_update import UpdateConfig, state_update
from fastclip_kernels.fastclip.naive import fcco_surrogate_ref, gcl_g_ref
from fastclip_kernels.ops.state_update.naive import u_update_ref

FULL = os.environ.get("FASTCLIP_BENCH_FULL") == "1"
CPU_SHAPES = [(8192, 8192, 512)] if FULL else [(2048, 2048, 512)]
GPU_SHAPES = [(4096, 4096, 512), (32768, 32768, 768)]
PROVIDERS = ["fastclip-clip", "fastclip-gcl", "fastclip-rgcl", "fastclip-rgcl_g", "materialized-gcl"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")
SCALE = 1 / 0.07


def _materialized(n, dev):
    """fast_clip's computation on one process: dense g, u update, surrogate tau * g / u."""
    u = torch.zeros(2, n, device=dev)

    def loss(x, y, s):
        g1, g2 = gcl_g_ref(x.detach().float(), y.detach().float(), s.detach(), s.detach())
        u[0], u[1] = u_update_ref(u[0], g1, 0.8), u_update_ref(u[1], g2, 0.8)
        return fcco_surrogate_ref(
            x.float(), y.float(), 1 / s.detach(), 1 / s.detach(), u[0], u[1], 1e-14, 1 / s, 1 / s
        )

    return loss


def make_case(provider, b, n, d, dtype, mode, dev):
    impl, obj = provider.split("-")
    dtype = getattr(torch, dtype)
    x = F.normalize(torch.randn(n, d, device=dev), dim=-1).to(dtype).requires_grad_(mode != "fwd")
    y = F.normalize(torch.randn(n, d, device=dev), dim=-1).to(dtype).requires_grad_(mode != "fwd")
    s = torch.tensor(SCALE, device=dev, requires_grad=mode != "fwd" and obj in ("clip", "rgcl_g"))
    if impl == "materialized":
        return fwd_bwd_callable(_materialized(n, dev), (x, y, s), mode)
    fn = FastCLIPLoss(None if obj == "clip" else 4 * n, obj, gamma_min=0.8, device=dev)
    idx = torch.arange(n, device=dev)
    fn.set_epoch(1)
    if obj == "rgcl":
        return fwd_bwd_callable(lambda x, y: fn(x, y, None, idx), (x, y), mode)
    return fwd_bwd_callable(lambda x, y, s: fn(x, y, s, idx), (x, y, s), mode)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shapes; the GPU runs the GPU shapes")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: f"n{s[0]}-d{s[2]}")
def test_fastclip_loss_cpu(benchmark, record, shape, provider):
    run_loss_benchmark(
        benchmark, record, "fastclip_loss", make_case, provider, shape, "float32", "fwd+bwd", 3
    )


@needs_gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"n{s[0]}-d{s[2]}")
def test_fastclip_loss_gpu(benchmark, record, shape, provider):
    if provider.startswith("materialized") and shape[0] > 8192:
        pytest.skip("materialized [n, n] fp32 intermediates do not fit at n = 32768")
    run_loss_benchmark(
        benchmark, record, "fastclip_loss", make_case, provider, shape, "bfloat16", "fwd+bwd", 10
    )


def _update_case(impl, n, per_sample):
    dev = "cuda"
    state = FastCLIPState(400_000_000 // 8, rank=0, world_size=1, per_sample_tau=per_sample, device=dev)
    idx = torch.randperm(state.log_u.shape[1], device=dev)[:n]
    lam, delta = torch.randn(2, n, device=dev) + 5, -torch.rand(2, n, device=dev)
    pos, log_u = torch.randn(n, device=dev), torch.randn(2, n, device=dev)
    tau = torch.rand(2, n, device=dev) * 0.1 + 0.02
    cfg = UpdateConfig(gamma=0.8, eps=1e-14, rho=8.5, lr_tau=1e-2, beta1=0.9, beta2=0.999, step=3)
    if impl == "fused":
        update = partial(state_update, backend="triton")
    else:
        update = state_update
    return lambda: update(state, idx, lam, delta, pos, log_u, tau, cfg)


@needs_gpu
@pytest.mark.parametrize("per_sample", [False, True], ids=["u-only", "per-sample-tau"])
@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_state_update_gpu(benchmark, record, impl, per_sample):
    """Global batch 32k (b = 4096 on each of 8 ranks): every rank updates all 32768 anchors."""
    fn = _update_case(impl, 32768, per_sample)
    fn()
    benchmark.pedantic(lambda: (fn(), sync()), rounds=50, warmup_rounds=5, iterations=1)
    median = statistics.median(benchmark.stats.stats.data)
    record(
        bench="fastclip_state_update", shape=f"n32768-{'tau' if per_sample else 'u'}", provider=impl,
        mode="update", median_ms=f"{median * 1e3:.3f}", peak_gib="", tflops="",
    )  # fmt: skip
    assert machine()["gpu"] != "none"
