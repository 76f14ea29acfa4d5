"""FastCLIP state update on a GPU: the fused Triton kernel vs the same update in plain PyTorch ops
(``naive.state_update_ref``; target >= 5x at a global batch of 32k)."""

import statistics
from functools import partial

import pytest
import torch
from harness import machine, sync

from fastclip_kernels.fastclip import FastCLIPState
from fastclip_kernels.ops.state_update import UpdateConfig, state_update

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")


def _update_case(impl, n, per_sample):
    dev = "cuda"
    state = FastCLIPState(400_000_000 // 8, rank=0, world_size=1, per_sample_tau=per_sample, device=dev)
    idx = torch.randperm(state.log_u.shape[1], device=dev)[:n]
    lam, delta = torch.randn(2, n, device=dev) + 5, -torch.rand(2, n, device=dev)
    pos, log_u = torch.randn(n, device=dev), torch.randn(2, n, device=dev)
    tau = torch.rand(2, n, device=dev) * 0.1 + 0.02
    cfg = UpdateConfig(gamma=0.8, eps=1e-14, rho=8.5, lr_tau=1e-2, beta1=0.9, beta2=0.999, step=3)
    update = partial(state_update, backend="triton" if impl == "fused" else "reference")
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
