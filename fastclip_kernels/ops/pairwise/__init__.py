"""Losses that sum over a tiled similarity matrix z = s * A @ C.T + beta, with autograd.

Two algorithms of the same math:
    * ``tiled``   -- Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): nothing of size
      [M, N] is ever stored.
    * ``chunked`` -- PyTorch, rows of A a chunk at a time (CPU tensors, fp64).

Public entry points: :func:`similarity_cross_entropy` and :func:`sigmoid_loss_sum`.
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


class SimilarityCrossEntropyFunction(torch.autograd.Function):
    """(ce_rows [M], ce_cols [N] or empty): per-row (and per-column) cross-entropy of z."""

    @staticmethod
    def forward(ctx, a, c, scale, bias, label_offset: int, cols: bool, backend: str):
        a, c = _rows_contiguous(a), _rows_contiguous(c)
        if backend == "triton":
            tiled = _tiled()
            lse_rows, ce_rows = tiled.row_cross_entropy_fwd(a, c, scale, bias, label_offset)
            # Column j's cross-entropy is row j's of the transposed problem (offset negated).
            lse_cols, ce_cols = (
                tiled.row_cross_entropy_fwd(c, a, scale, bias, -label_offset) if cols else (None, None)
            )
        else:
            lse_rows, ce_rows, lse_cols, ce_cols = chunked.cross_entropy_fwd(
                a, c, scale, bias, label_offset, cols
            )
        if not cols:
            lse_cols = ce_cols = lse_rows.new_empty(0)
        ctx.save_for_backward(a, c, scale, bias, lse_rows, lse_cols)
        ctx.label_offset, ctx.cols, ctx.backend = label_offset, cols, backend
        return ce_rows, ce_cols

    @staticmethod
    def backward(ctx, g_rows, g_cols):
        a, c, scale, bias, lse_rows, lse_cols = ctx.saved_tensors
        offset = ctx.label_offset
        row_term = (lse_rows, g_rows.contiguous())
        col_term = (lse_cols, g_cols.contiguous()) if ctx.cols else None
        if ctx.backend == "triton":
            tiled = _tiled()
            grad_a, ds, db = tiled.pairwise_grad(
                a, c, scale, bias, offset, tiled.LOSS_LSE, row_term, col_term
            )
            # dC is dA of the transposed problem: rows and columns swap roles.
            grad_c, _, _ = tiled.pairwise_grad(c, a, scale, bias, -offset, tiled.LOSS_LSE, col_term, row_term)
        else:
            weight = chunked.cross_entropy_weight(offset, *row_term, *(col_term or (None, None)))
            grad_a, grad_c, ds, db = chunked.pairwise_bwd(a, c, scale, bias, weight)
        return grad_a, grad_c, _grad_like(ds, scale), _grad_like(db, bias), None, None, None


class SigmoidLossFunction(torch.autograd.Function):
    """sum_ij softplus(-y_ij z_ij), a 0-d fp32 (fp64 for fp64 inputs) tensor."""

    @staticmethod
    def forward(ctx, a, c, scale, bias, label_offset: int, backend: str):
        a, c = _rows_contiguous(a), _rows_contiguous(c)
        if backend == "triton":
            total = _tiled().sigmoid_loss_fwd(a, c, scale, bias, label_offset)
        else:
            total = chunked.sigmoid_loss_fwd(a, c, scale, bias, label_offset)
        ctx.save_for_backward(a, c, scale, bias)
        ctx.label_offset, ctx.backend = label_offset, backend
        return total

    @staticmethod
    def backward(ctx, g):
        a, c, scale, bias = ctx.saved_tensors
        offset = ctx.label_offset
        g = g.reshape(()).to(torch.float64 if a.dtype == torch.float64 else torch.float32)
        if ctx.backend == "triton":
            tiled = _tiled()
            grad_a, ds, db = tiled.pairwise_grad(a, c, scale, bias, offset, tiled.LOSS_SIGMOID, g=g)
            grad_c, _, _ = tiled.pairwise_grad(c, a, scale, bias, -offset, tiled.LOSS_SIGMOID, g=g)
        else:
            grad_a, grad_c, ds, db = chunked.pairwise_bwd(
                a, c, scale, bias, chunked.sigmoid_weight(offset, g)
            )
        return grad_a, grad_c, _grad_like(ds, scale), _grad_like(db, bias), None, None


def similarity_cross_entropy(
    a, c, logit_scale, logit_bias=None, *, label_offset=0, cols=True, backend="auto"
):
    """Per-row (and per-column) cross-entropy of the logits, without materializing them.

    Args:
        a (torch.Tensor): [M, D] row features (fp16/bf16/fp32; fp64 on the chunked backend).
        c (torch.Tensor): [N, D] column features, same dtype and device, contiguous rows.
        logit_scale (torch.Tensor): 0-d or [1] scale s (already exponentiated), same device.
        logit_bias (torch.Tensor, optional): 0-d or [1] additive bias beta.
        label_offset (int): row i's positive is column i + label_offset.
        cols (bool): also the column cross-entropies (needs M == N and label_offset == 0).
    Returns:
        (ce_rows [M], ce_cols [N] or empty [0]) in fp32 (fp64 for fp64 inputs), where
        ce_rows_i = log sum_j exp(z_ij) - z_{i,i+o}, ce_cols_j = log sum_i exp(z_ij) - z_{j,j},
        z = s * a @ c.T + beta.
    """
    if cols and (a.shape[0] != c.shape[0] or label_offset != 0):
        raise ValueError("cols=True needs a square problem: M == N and label_offset == 0")
    backend = resolve_backend(backend, a)
    return SimilarityCrossEntropyFunction.apply(a, c, logit_scale, logit_bias, label_offset, cols, backend)


def sigmoid_loss_sum(a, c, logit_scale, logit_bias, *, label_offset=0, backend="auto"):
    """sum_ij softplus(-y_ij z_ij) with y_ij = +1 iff j = i + label_offset, else -1 (0-d tensor).

    Arguments as :func:`similarity_cross_entropy`; this is SigLIP's -sum_ij logsigmoid(y_ij z_ij).
    """
    backend = resolve_backend(backend, a)
    return SigmoidLossFunction.apply(a, c, logit_scale, logit_bias, label_offset, backend)
