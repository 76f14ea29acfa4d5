"""The SDPA backend of varlen attention (the CPU path of "auto") against the per-sequence reference.

fp64 values and every gradient to 1e-10: the dense path (all lengths equal: a ViT's packed images),
the padded, masked path (text: different lengths, causal), cross lengths with bottom-right causal
rows that have no keys, and empty sequences.
"""

import pytest
import torch

from fastclip_kernels.ops.varlen_attention import (
    varlen_attention,
    varlen_attention_qkvpacked,
    varlen_attention_ref,
)


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _values_and_grads(fn, q, k, v, grad_out):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "lengths_q,lengths_k",
    [([5, 5, 5], [5, 5, 5]), ([1, 7, 3, 16], [1, 7, 3, 16]), ([2, 0, 4], [2, 0, 4]), ([3, 4], [1, 6])],
    ids=["dense", "varlen", "empty", "cross"],
)
def test_sdpa_equals_reference_fp64(lengths_q, lengths_k, causal):
    gen = torch.Generator().manual_seed(0)
    heads, d = 2, 8
    q = torch.randn(sum(lengths_q), heads, d, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(sum(lengths_k), heads, d, dtype=torch.float64, generator=gen) for _ in range(2))
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=gen)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    args = (cu_q, cu_k, max(lengths_q), max(lengths_k))

    def sdpa(q_, k_, v_):
        return varlen_attention(q_, k_, v_, *args, causal=causal, backend="sdpa")

    def ref(q_, k_, v_):
        return varlen_attention_ref(q_, k_, v_, cu_q, cu_k, causal=causal)

    got, got_grads = _values_and_grads(sdpa, q, k, v, grad_out)
    want, want_grads = _values_and_grads(ref, q, k, v, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


def test_qkvpacked_auto_on_cpu_fp32_matches_reference():
    lengths = [4, 9, 9, 1]
    qkv = torch.randn(sum(lengths), 3, 2, 16, requires_grad=True)
    cu = _cu(lengths)
    got = varlen_attention_qkvpacked(qkv, cu, 9, causal=True)
    want = varlen_attention_ref(*qkv.unbind(1), cu, causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
