"""Varlen (packed) attention: our Triton kernels and the backends against a per-sequence reference.

Forward and every gradient are checked with the tolerance rule (helpers.assert_close_to_ref):
error vs an fp64 per-sequence softmax <= 2x PyTorch's own error in the same dtype + a floor.
Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest), so shapes stay tiny: the full
length mix runs at H = 2, d = 32; wider heads run a shorter mix. bf16 needs a GPU.
"""

import importlib

import pytest
import torch
from conftest import triton_device
from helpers import assert_close_to_ref

from fastclip_kernels.ops.varlen_attention import (
    varlen_attention,
    varlen_attention_qkvpacked,
    varlen_attention_ref,
)

LENGTHS = [1, 2, 17, 49, 64, 97, 129, 197, 257]  # crosses every 16/32/64 tile boundary
SHORT = [1, 17, 64, 97]
varlen_module = importlib.import_module("fastclip_kernels.ops.varlen_attention")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot needs a GPU")


def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def packed_qkv(lengths, heads, d, dtype, device, scale=1.0) -> torch.Tensor:
    return (scale * torch.randn(sum(lengths), 3, heads, d, device=device)).to(dtype)


def ref_out_and_grad(qkv, cu, grad_out, causal, upcast, scale=None):
    """(out, d qkv) of the reference on a copy of qkv (fp64 copy when upcast is 'fp64')."""
    x = qkv.detach().to(torch.float64 if upcast == "fp64" else qkv.dtype).requires_grad_(True)
    out = varlen_attention_ref(
        x[:, 0], x[:, 1], x[:, 2], cu, softmax_scale=scale, causal=causal, upcast=upcast == "fp64"
    )
    out.backward(grad_out.to(x.dtype))
    return out, x.grad


def check_packed(lengths, heads, d, dtype, causal):
    device = triton_device()
    floor = 1e-6 if dtype == torch.float32 else 1e-5  # x (1 + max |ref|)
    qkv = packed_qkv(lengths, heads, d, dtype, device).requires_grad_(True)
    cu = cu_seqlens(lengths, device)
    out = varlen_attention_qkvpacked(qkv, cu, max(lengths), causal=causal, backend="triton")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    truth, truth_grad = ref_out_and_grad(qkv, cu, grad_out, causal, "fp64")
    same, same_grad = ref_out_and_grad(qkv, cu, grad_out, causal, "same")
    assert out.dtype == dtype and qkv.grad.shape == qkv.shape
    assert_close_to_ref("out", out, truth, same, floor=floor)
    for i, name in enumerate(["dq", "dk", "dv"]):
        assert_close_to_ref(name, qkv.grad[:, i], truth_grad[:, i], same_grad[:, i], floor=floor)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_all_lengths(dtype, causal):
    check_packed(LENGTHS, heads=2, d=32, dtype=dtype, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_packed_head_dims(d, dtype, causal):
    check_packed(SHORT, heads=1, d=d, dtype=dtype, causal=causal)


@needs_gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_packed_bf16(d, causal):
    check_packed(LENGTHS, heads=3, d=d, dtype=torch.bfloat16, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_separate_qkv_equals_packed(causal):
    device, lengths = triton_device(), [3, 64, 70]
    cu = cu_seqlens(lengths, device)
    qkv = packed_qkv(lengths, 2, 32, torch.float32, device).requires_grad_(True)
    out_packed = varlen_attention_qkvpacked(qkv, cu, 70, causal=causal, backend="triton")
    grad_out = torch.randn_like(out_packed)
    out_packed.backward(grad_out)
    q, k, v = (qkv.detach()[:, i].clone().requires_grad_(True) for i in range(3))
    out = varlen_attention(q, k, v, cu, cu, 70, 70, causal=causal, backend="triton")
    out.backward(grad_out)
    torch.testing.assert_close(out, out_packed, rtol=0, atol=0)
    for i, x in enumerate((q, k, v)):
        torch.testing.assert_close(x.grad, qkv.grad[:, i], rtol=0, atol=0)


def test_strided_packed_view_and_upper_bound_max_seqlen():
    """qkv as a slice of a wider buffer (read through strides) and max_seqlen > the longest."""
    device, lengths = triton_device(), [5, 40]
    cu = cu_seqlens(lengths, device)
    wide = torch.randn(45, 4, 2, 32, device=device)
    qkv = wide[:, 1:].requires_grad_(False)
    out = varlen_attention_qkvpacked(qkv, cu, 300, backend="triton")
    ref = varlen_attention_ref(qkv[:, 0].double(), qkv[:, 1].double(), qkv[:, 2].double(), cu)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_cross_lengths_bottom_right_causal():
    """q and k/v with different lengths, empty sequences, and causal rows that see no key (-> 0)."""
    device = triton_device()
    lens_q, lens_k = [3, 0, 20, 70, 5], [7, 4, 0, 66, 2]
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    q = torch.randn(sum(lens_q), 2, 32, device=device, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 32, device=device, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 32, device=device, requires_grad=True)
    for causal in (False, True):
        out = varlen_attention(q, k, v, cu_q, cu_k, 70, 66, causal=causal, backend="triton")
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad_out)
        x64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        ref = varlen_attention_ref(*x64, cu_q, cu_k, causal=causal)
        want = torch.autograd.grad(ref, x64, grad_out.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    rows_without_keys = slice(3 + 20, 3 + 20 + 4)  # causal: query i of sequence 3 sees j <= i - 4
    assert out[rows_without_keys].abs().max() == 0


def test_empty_sequences_in_self_attention():
    device, lengths = triton_device(), [0, 5, 0, 0, 33, 0]
    qkv = packed_qkv(lengths, 1, 32, torch.float32, device).requires_grad_(True)
    cu = cu_seqlens(lengths, device)
    out = varlen_attention_qkvpacked(qkv, cu, 33, backend="triton")
    out.sum().backward()
    ref, ref_grad = ref_out_and_grad(qkv, cu, torch.ones_like(out), False, "fp64")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


def test_lse_and_extreme_scores_stay_finite():
    from fastclip_kernels.ops.varlen_attention.triton import varlen_attention_fwd

    device, lengths = triton_device(), [1, 30, 65]
    cu = cu_seqlens(lengths, device)
    qkv = packed_qkv(lengths, 2, 32, torch.float32, device, scale=30.0)  # |scores| ~ 1e3
    q, k, v = qkv.unbind(1)
    out, lse = varlen_attention_fwd(q, k, v, cu, cu, 65, 32**-0.5, False)
    ref = varlen_attention_ref(q.double(), k.double(), v.double(), cu)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # scores of ~1e3 in fp32 lose ~1e-4 absolute: compare with PyTorch's own fp32 error
    assert_close_to_ref("out", out, ref, varlen_attention_ref(q, k, v, cu), floor=1e-5)
    bounds = cu.tolist()
    for b in range(len(lengths)):
        qb = q[bounds[b] : bounds[b + 1]].double().transpose(0, 1)
        kb = k[bounds[b] : bounds[b + 1]].double().transpose(0, 1)
        want = torch.logsumexp(qb @ kb.transpose(1, 2) * 32**-0.5, dim=-1)
        torch.testing.assert_close(lse[:, bounds[b] : bounds[b + 1]].double(), want, rtol=1e-5, atol=1e-4)


def test_auto_on_cpu_is_sdpa_and_fp64_the_reference():
    lengths = [3, 9]
    qkv = packed_qkv(lengths, 2, 32, torch.float32, "cpu")
    cu = cu_seqlens(lengths)
    want = varlen_attention_qkvpacked(qkv, cu, 9, backend="sdpa")
    torch.testing.assert_close(varlen_attention_qkvpacked(qkv, cu, 9), want, rtol=0, atol=0)
    qkv = qkv.double()
    want = varlen_attention_ref(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu)
    torch.testing.assert_close(varlen_attention_qkvpacked(qkv, cu, 9), want, rtol=0, atol=0)


def test_reference_gradcheck_fp64():
    lengths, device = [2, 0, 3], "cpu"
    q, k, v = (torch.randn(5, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = cu_seqlens(lengths, device)
    cu_k = cu_seqlens([1, 2, 2], device)  # causal with n_k < n_q: a row without keys
    assert torch.autograd.gradcheck(lambda *x: varlen_attention_ref(*x, cu, cu_k, causal=True), (q, k, v))


def test_torch_backend_nested_matches_reference():
    lengths = [1, 17, 40]
    cu = cu_seqlens(lengths)
    qkv = packed_qkv(lengths, 2, 32, torch.float64, "cpu").requires_grad_(True)
    q, k, v = (x.to(torch.float32) for x in qkv.unbind(1))
    try:
        out = varlen_attention(q, k, v, cu, cu, 40, 40, backend="torch")
    except RuntimeError as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"nested-tensor SDPA does not run on this CPU build: {err}")
    ref = varlen_attention_ref(q, k, v, cu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(out.sum(), qkv)[0]
    g_ref = torch.autograd.grad(ref.sum(), qkv)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="causal"):
        varlen_attention(q, k, v, cu, cu, 40, 40, causal=True, backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_no_host_sync_on_cuda(monkeypatch):
    lengths = [50, 197, 120]
    cu = cu_seqlens(lengths, "cuda")
    qkv = packed_qkv(lengths, 2, 64, torch.bfloat16, "cuda").requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = varlen_attention_qkvpacked(qkv, cu, 256)  # auto -> triton, cu_seqlens not read
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setenv("FASTCLIP_CHECK_SEQLENS", "1")
    with pytest.raises(ValueError, match="max_seqlen = 100 is smaller"):
        varlen_attention_qkvpacked(qkv, cu, 100)


# --- bad input ---------------------------------------------------------------------------------


def _good(lengths=(3, 5), d=32, dtype=torch.float32):
    return packed_qkv(lengths, 2, d, dtype, "cpu"), cu_seqlens(lengths), max(lengths)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda cu: cu.to(torch.int64), TypeError, r"cu_seqlens must have dtype torch\.int32"),
        (lambda cu: cu.flip(0), ValueError, r"cu_seqlens\[0\] must be 0"),
        (lambda cu: torch.tensor([0, 5, 3, 8], dtype=torch.int32), ValueError, r"non-decreasing"),
        (lambda cu: torch.tensor([0, 3, 7], dtype=torch.int32), ValueError, r"cu_seqlens\[-1\] must equal"),
        (lambda cu: cu[None], ValueError, r"cu_seqlens must be 1-D"),
        (lambda cu: cu[:1], ValueError, r"cu_seqlens must be 1-D \[B \+ 1\] with B >= 1"),
    ],
    ids=["int64", "not-zero-start", "decreasing", "last-not-T", "2d", "no-sequence"],
)
def test_bad_cu_seqlens(mutate, error, match):
    qkv, cu, max_seqlen = _good()
    with pytest.raises(error, match=match):
        varlen_attention_qkvpacked(qkv, mutate(cu), max_seqlen, backend="triton")


@pytest.mark.parametrize(
    "cu, max_seqlen, match",
    [
        ([0, 3, 8], 4, r"max_seqlen = 4 is smaller than the longest sequence in cu_seqlens"),
        ([0, 3, 7], 5, r"cu_seqlens\[-1\] must equal the number of packed tokens T = 8"),
        ([0, 3, 2, 8], 6, r"cu_seqlens must be non-decreasing"),
        ([1, 3, 8], 5, r"cu_seqlens\[0\] must be 0"),
    ],
    ids=["max-seqlen-short", "last-below-T", "decreasing", "not-zero-start"],
)
def test_bad_cu_seqlens_fail_on_device_without_host_checks(monkeypatch, cu, max_seqlen, match):
    """As on CUDA (values never read on the host): torch._assert_async, raised at once on CPU. Without it
    the kernels leave the rows past max_seqlen (or past cu_seqlens[-1]) of o, dK and dV unwritten."""
    monkeypatch.setattr(varlen_module, "seqlens_checked", lambda cu: False)
    qkv, _, _ = _good()
    with pytest.raises(RuntimeError, match=match):
        varlen_attention_qkvpacked(qkv, torch.tensor(cu, dtype=torch.int32), max_seqlen, backend="triton")
    q, k, v = qkv.unbind(1)
    cu = torch.tensor(cu, dtype=torch.int32)
    match_q = match.replace("cu_seqlens", "cu_seqlens_q").replace("max_seqlen =", "max_seqlen_q =")
    with pytest.raises(RuntimeError, match=match_q):
        varlen_attention(q, k, v, cu, cu, max_seqlen, 8, backend="triton")


def test_bad_max_seqlen():
    qkv, cu, _ = _good()
    with pytest.raises(ValueError, match=r"max_seqlen = 4 is smaller than the longest sequence"):
        varlen_attention_qkvpacked(qkv, cu, 4)
    with pytest.raises(TypeError, match="max_seqlen must be a Python int"):
        varlen_attention_qkvpacked(qkv, cu, torch.tensor(5))
    with pytest.raises(ValueError, match="max_seqlen must be a positive int"):
        varlen_attention_qkvpacked(qkv, cu, 0)
    q, k, v = qkv.unbind(1)
    with pytest.raises(ValueError, match=r"max_seqlen_k = 2 is smaller"):
        varlen_attention(q, k, v, cu, cu, 5, 2)


def test_bad_dropout_scale_and_backend():
    qkv, cu, n = _good()
    with pytest.raises(ValueError, match="dropout_p must be 0.0"):
        varlen_attention_qkvpacked(qkv, cu, n, dropout_p=0.1)
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        varlen_attention_qkvpacked(qkv, cu, n, softmax_scale=float("nan"))
    with pytest.raises(ValueError, match="backend must be one of"):
        varlen_attention_qkvpacked(qkv, cu, n, backend="flash")


@pytest.mark.parametrize("d", [36, 8, 256])
def test_bad_head_dim_on_triton(d):
    qkv, cu, n = _good(d=d)
    with pytest.raises(ValueError, match=rf"head dim .* multiple of 8 in \[16, 128\], got {d}"):
        varlen_attention_qkvpacked(qkv, cu, n, backend="triton")
    varlen_attention_qkvpacked(qkv, cu, n, backend="reference")  # the reference takes any d


def test_bad_shapes_and_dtypes():
    qkv, cu, n = _good()
    with pytest.raises(ValueError, match=r"qkv must be \[T, 3, H, d\]"):
        varlen_attention_qkvpacked(qkv[:, :2], cu, n)
    with pytest.raises(TypeError, match="backend='triton' supports fp16/bf16/fp32"):
        varlen_attention_qkvpacked(qkv.double(), cu, n, backend="triton")
    q, k, v = qkv.unbind(1)
    with pytest.raises(ValueError, match="k and v must be"):
        varlen_attention(q, k[:, :1], v, cu, cu, n, n)
    with pytest.raises(TypeError, match="v is torch.float16"):
        varlen_attention(q, k, v.half(), cu, cu, n, n)
    with pytest.raises(ValueError, match="cu_seqlens_k has 1 sequences"):
        varlen_attention(q, k, v, cu, torch.tensor([0, 8], dtype=torch.int32), n, 8)
