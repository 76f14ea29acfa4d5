"""fp16 backward at large b*N: W = dL/dz must not underflow in the second GEMM (issue 13, section 2).

At batch b and N columns W is about S/(2 b N) (S: the AMP loss scale), below fp16's smallest normal
(2^-14) once b*N passes ~2^15 * S and zero below 2^-24. The kernels rescale each row of W by a
power of two before casting it (``ops/common/tiles._rescale_rows``). Here N = 1024 real columns give
P ~ 1/N, and the upstream gradient stands in for S/(2b) of a large batch, so W reaches the magnitude it
has at b = N = 65536; dA = s W C stays in fp16's normal range (it sums N terms).
Errors are normwise (max |dA - fp64| / max |fp64|), bounded by a multiple of the error of the fp64
result rounded to fp16, the best any fp16 output can do.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device

from fastclip_kernels.ops.anchor import anchor_grad
from fastclip_kernels.ops.contrastive_loss import similarity_cross_entropy

M, N, D = 16, 1024, 32
SCALE = 14.3
# log2 of the typical |W| the upstream gradient produces: 2^-10 (fine before the fix), 2^-17 (b = N =
# 65536 under a 2^16 loss scale: subnormal in fp16), 2^-25 (b = N = 5800 unscaled: zero in fp16).
W_LOG2 = [-10, -17, -25]
FACTOR = 4.0  # kernel error <= FACTOR x (fp64 truth rounded to fp16) error


def _features(device):
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    c[:M] = F.normalize(c[:M] + a, dim=-1)
    return a.to(device, torch.float16), c.to(device, torch.float16)


def normwise_err(x, ref) -> float:
    return ((x.double().cpu() - ref).abs().max() / ref.abs().max()).item()


def _check(name, ours, truth):
    best = normwise_err(truth.half(), truth)
    err = normwise_err(ours, truth)
    assert torch.isfinite(ours).all()
    assert err <= FACTOR * best, f"{name}: fp16 normwise err {err:.3e} > {FACTOR} x rounding {best:.3e}"
    return err


@pytest.mark.parametrize("w_log2", W_LOG2)
def test_pairwise_grad_fp16_small_w(w_log2):
    """Row cross-entropy (the contrastive loss's pairwise backward) with W ~ 2^w_log2."""
    a, c = _features(triton_device())
    g_row = 2.0**w_log2 * N  # W_ij = g_i (P_ij - pos_ij) with P ~ 1/N
    a16 = a.clone().requires_grad_(True)
    scale = torch.tensor(SCALE, device=a.device)
    ce, _ = similarity_cross_entropy(a16, c, scale, cols=False, backend="triton")
    (ours,) = torch.autograd.grad(ce.sum() * g_row, a16)
    a64 = a.double().cpu().requires_grad_(True)
    z = SCALE * a64 @ c.double().cpu().T
    ce64 = torch.logsumexp(z, dim=1) - z.diagonal()
    (truth,) = torch.autograd.grad(ce64.sum() * g_row, a64)
    assert truth.abs().max() > 2.0**-13  # dA itself stays normal in fp16
    _check("dA", ours, truth)


@pytest.mark.parametrize("w_log2", W_LOG2)
def test_anchor_grad_fp16_small_w(w_log2):
    """anchor_grad with W_ij = coef_i exp(s P_ij - shift_i), |W| ~ 2^w_log2."""
    a, c = _features(triton_device())
    c = c * 64  # |c| = 64 and s / 64: same logits, grad_a = W C 64x larger (normal in fp16)
    a64, c64 = a.double().cpu(), c.double().cpu()
    p = a64 @ c64.T
    s = torch.full((M,), SCALE / 64, dtype=torch.float64)
    shift = torch.logsumexp(s[:, None] * p, dim=1)  # exp(s P - shift) is a softmax: ~1/N
    coef = torch.full((M,), 2.0**w_log2 * N, dtype=torch.float64)
    pos_coef = -coef
    w = coef[:, None] * torch.exp(s[:, None] * p - shift[:, None])
    w[torch.arange(M), torch.arange(M)] = pos_coef  # exclude_positive: the positive gets pos_coef only
    truth = w @ c64
    dev = a.device
    row = tuple(t.float().to(dev) for t in (s, shift, coef))
    ours = anchor_grad(a, c, pos_coef.float().to(dev), row=row, exclude_positive=True, backend="triton")
    _check("grad_a", ours, truth)
