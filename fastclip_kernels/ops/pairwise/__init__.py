"""Losses that sum over a tiled similarity matrix z = s * A @ C.T + beta, with autograd.

Two algorithms of the same math:
    * ``tiled``   -- Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): nothing of size
      [M, N] is ever stored.
    * ``chunked`` -- PyTorch, rows of A a chunk at a time (CPU tensors, fp64).

Public entry points: :func:`similarity_logsumexp` and :func:`similarity_softplus_sum`.
"""

import os

import torch

from . import chunked

BACKENDS = ("auto", "triton", "chunked")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tiled():
    try:
        from . import tiled
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "backend='triton' needs Triton: pip install triton (or use backend='chunked')"
        ) from err
    return tiled


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'triton' or 'chunked' for features ``x``; 'auto' picks Triton on CUDA for fp16/bf16/fp32."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "chunked":
        return backend
    triton_ok = x.dtype in _TRITON_DTYPES
    if backend == "auto":
        if x.is_cuda and triton_ok:
            try:
                _tiled()
                return "triton"
            except RuntimeError:
                return "chunked"
        return "chunked"
    if not triton_ok:
        raise ValueError(f"backend='triton' supports {_TRITON_DTYPES}, got features of {x.dtype}")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import "
            "(or use backend='chunked')"
        )
    return "triton"


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _grad_like(grad: torch.Tensor, ref: torch.Tensor | None):
    if ref is None or not ref.requires_grad:
        return None
    return grad.reshape(ref.shape).to(ref.dtype)


class SimilarityLogSumExpFunction(torch.autograd.Function):
    """(lse_rows [M], lse_cols [N]) of z = s * a @ c.T + beta; an absent side is an empty tensor."""

    @staticmethod
    def forward(ctx, a, c, scale, bias, rows: bool, cols: bool, backend: str):
        a, c = _rows_contiguous(a), _rows_contiguous(c)
        if backend == "triton":
            tiled = _tiled()
            lse_rows = tiled.row_logsumexp_fwd(a, c, scale, bias) if rows else None
            lse_cols = tiled.row_logsumexp_fwd(c, a, scale, bias) if cols else None
        else:
            lse_rows, lse_cols = chunked.logsumexp_fwd(a, c, scale, bias, rows, cols)
        empty = a.new_empty(0, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)
        lse_rows = lse_rows if rows else empty
        lse_cols = lse_cols if cols else empty
        ctx.save_for_backward(a, c, scale, bias, lse_rows, lse_cols)
        ctx.rows, ctx.cols, ctx.backend = rows, cols, backend
        return lse_rows, lse_cols

    @staticmethod
    def backward(ctx, g_rows, g_cols):
        a, c, scale, bias, lse_rows, lse_cols = ctx.saved_tensors
        row_term = (lse_rows, g_rows.contiguous()) if ctx.rows else None
        col_term = (lse_cols, g_cols.contiguous()) if ctx.cols else None
        if ctx.backend == "triton":
            tiled = _tiled()
            grad_a, ds, db = tiled.pairwise_grad(a, c, scale, bias, tiled.LOSS_LSE, row_term, col_term)
            # dC is dA of the transposed problem: rows and columns swap roles.
            grad_c, _, _ = tiled.pairwise_grad(c, a, scale, bias, tiled.LOSS_LSE, col_term, row_term)
        else:
            weight = chunked.lse_weight(*(row_term or (None, None)), *(col_term or (None, None)))
            grad_a, grad_c, ds, db = chunked.pairwise_bwd(a, c, scale, bias, weight)
        return grad_a, grad_c, _grad_like(ds, scale), _grad_like(db, bias), None, None, None


class SimilaritySoftplusSumFunction(torch.autograd.Function):
    """sum_ij softplus(z_ij), a 0-d fp32 (fp64 for fp64 inputs) tensor."""

    @staticmethod
    def forward(ctx, a, c, scale, bias, backend: str):
        a, c = _rows_contiguous(a), _rows_contiguous(c)
        if backend == "triton":
            total = _tiled().softplus_sum_fwd(a, c, scale, bias)
        else:
            total = chunked.softplus_sum_fwd(a, c, scale, bias)
        ctx.save_for_backward(a, c, scale, bias)
        ctx.backend = backend
        return total

    @staticmethod
    def backward(ctx, g):
        a, c, scale, bias = ctx.saved_tensors
        g = g.reshape(()).to(torch.float64 if a.dtype == torch.float64 else torch.float32)
        if ctx.backend == "triton":
            tiled = _tiled()
            grad_a, ds, db = tiled.pairwise_grad(a, c, scale, bias, tiled.LOSS_SIGMOID, g=g)
            grad_c, _, _ = tiled.pairwise_grad(c, a, scale, bias, tiled.LOSS_SIGMOID, g=g)
        else:
            weight = chunked.sigmoid_weight(g)
            grad_a, grad_c, ds, db = chunked.pairwise_bwd(a, c, scale, bias, weight)
        return grad_a, grad_c, _grad_like(ds, scale), _grad_like(db, bias), None


def similarity_logsumexp(a, c, logit_scale, logit_bias=None, *, rows=True, cols=True, backend="auto"):
    """Row and column log-sum-exp of the logits, without materializing them.

    Args:
        a (torch.Tensor): [M, D] row features (fp16/bf16/fp32; fp64 on the chunked backend).
        c (torch.Tensor): [N, D] column features, same dtype and device.
        logit_scale (torch.Tensor): 0-d or [1] scale s (already exponentiated), same device.
        logit_bias (torch.Tensor, optional): 0-d or [1] additive bias beta.
        rows, cols (bool): which log-sum-exps to compute.
    Returns:
        (lse_rows [M], lse_cols [N]) in fp32 (fp64 for fp64 inputs); an absent side is empty.
        lse_rows_i = log sum_j exp(s <a_i, c_j> + beta), lse_cols_j = log sum_i exp(...).
    """
    backend = resolve_backend(backend, a)
    return SimilarityLogSumExpFunction.apply(a, c, logit_scale, logit_bias, rows, cols, backend)


def similarity_softplus_sum(a, c, logit_scale, logit_bias=None, *, backend="auto"):
    """sum_ij softplus(s <a_i, c_j> + beta) as a 0-d tensor; arguments as :func:`similarity_logsumexp`."""
    backend = resolve_backend(backend, a)
    return SimilaritySoftplusSumFunction.apply(a, c, logit_scale, logit_bias, backend)
