"""GPU-only FastCLIPLoss checks: no host synchronization in forward + backward (CUDA's sync debug
mode turns any device->host sync into an error), and bf16 / fp16 / fp32 against the fp64 chunked
path. Skipped without CUDA (the Triton interpreter cannot run bf16 dots)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close

from fastclip_kernels.fastclip import FastCLIPLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODES = ["clip", "gcl", "gcl_g", "rgcl", "rgcl_g"]


def _inputs(b, d, dtype, mode, device="cuda", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=-1)
    y = F.normalize(x + 0.5 * torch.randn(b, d, generator=gen, dtype=torch.float64), dim=-1)
    x, y = (t.to(device, dtype).requires_grad_() for t in (x, y))
    scale = (
        None
        if mode == "rgcl"
        else torch.tensor(14.3, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    )
    if scale is not None and mode in ("clip", "gcl_g", "rgcl_g"):
        scale.requires_grad_()
    return x, y, scale


@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync_in_forward_and_backward(mode):
    fn = FastCLIPLoss(100_000, mode, device="cuda", gamma_min=0.5)
    idx = torch.randperm(100_000, device="cuda")[:512]  # device indices: never read on the host
    x, y, s = _inputs(512, 256, torch.bfloat16, mode)
    fn(x, y, s, idx).backward()  # warm-up: Triton compiles here
    fn.set_epoch(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fn(x, y, s, idx)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_matches_fp64(mode, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    kw = dict(gamma_min=0.5, rho=2.0)
    fast = FastCLIPLoss(4096, mode, device="cuda", backend="triton", **kw)
    ref = FastCLIPLoss(4096, mode, state_dtype=torch.float64, backend="chunked", **kw)
    for epoch in (0, 1):
        idx = torch.arange(300) + 7 * epoch
        fast.set_epoch(epoch)
        ref.set_epoch(epoch)
        x, y, s = _inputs(300, 200, dtype, mode, seed=epoch)
        # The reference sees the same rounded inputs: this measures the kernels, not the rounding.
        x64, y64 = (t.detach().double().cpu().requires_grad_() for t in (x, y))
        s64 = None if s is None else s.detach().double().cpu()
        got = [fast(x, y, s, idx.cuda())]
        got += torch.autograd.grad(got[0], [x, y])
        want = [ref(x64, y64, s64, idx)]
        want += torch.autograd.grad(want[0], [x64, y64])
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for name, g, w in zip(("loss", "dx", "dy"), got, want, strict=True):
            assert_rel_close(f"{mode} {dtype} epoch {epoch} {name}", g.double().cpu(), w, tol)
