"""FastCLIP losses: loss + state update, fwd+bwd, per mode vs the ``clip`` mode and vs a
materialized dense implementation (fast_clip-style: [n, n] similarities, exp, masks). The state
update alone: bench_state_update.py; the per-anchor ops alone: bench_anchor.py.

Single process (b = n). CPU runs n = 2048 (8192 with FASTCLIP_BENCH_FULL=1); GPU n = 4096, 32768.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from harness import fwd_bwd_callable, run_loss_benchmark

from fastclip_kernels.fastclip import FastCLIPLoss
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
