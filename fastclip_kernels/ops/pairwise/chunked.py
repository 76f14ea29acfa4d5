"""Chunked PyTorch implementation of the pairwise kernels in ``tiled.py`` (same math, same API).

Used for CPU tensors (and fp64 anywhere). Rows of A are processed ``chunk`` at a time against all
of C, so the largest temporary is [chunk, N] and memory stays O((M + N) * D + chunk * N); both
row and column log-sum-exps come out of one pass (the column LSE is merged across chunks with
logaddexp). The backward recomputes each [chunk, N] block once and emits dA, dC, ds and dbeta.
"""

import torch

#: Elements in one [chunk, N] logit block (16 MiB in fp32): small next to a materialized
#: [M, N] matrix, big enough that each block is a well-shaped matmul.
BLOCK_ELEMENTS = 1 << 22


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(z)), exact to rounding for all z (torch's softplus turns linear above 20)."""
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(M: int, N: int, chunk: int | None):
    step = chunk or max(1, BLOCK_ELEMENTS // max(N, 1))
    return [(i, min(i + step, M)) for i in range(0, M, step)]


def _logits(a_blk, c, scale, bias):
    dot = a_blk @ c.T
    z = dot * scale
    return dot, (z + bias if bias is not None else z)


def logsumexp_fwd(a, c, scale, bias, rows: bool, cols: bool, chunk: int | None = None):
    """(lse_rows [M] or None, lse_cols [N] or None) of z = scale * a @ c.T + bias."""
    acc = _accum_dtype(a.dtype)
    a, c = a.to(acc), c.to(acc)
    scale = scale.to(acc)
    bias = bias.to(acc) if bias is not None else None
    lse_rows = a.new_empty(a.shape[0]) if rows else None
    lse_cols = a.new_full((c.shape[0],), float("-inf")) if cols else None
    for i0, i1 in _row_chunks(a.shape[0], c.shape[0], chunk):
        _, z = _logits(a[i0:i1], c, scale, bias)
        if rows:
            lse_rows[i0:i1] = torch.logsumexp(z, dim=1)
        if cols:
            lse_cols = torch.logaddexp(lse_cols, torch.logsumexp(z, dim=0))
    return lse_rows, lse_cols


def softplus_sum_fwd(a, c, scale, bias, chunk: int | None = None):
    """sum_ij softplus(z_ij) as a 0-d tensor in the accumulation dtype."""
    acc = _accum_dtype(a.dtype)
    a, c = a.to(acc), c.to(acc)
    scale = scale.to(acc)
    bias = bias.to(acc) if bias is not None else None
    total = a.new_zeros(())
    for i0, i1 in _row_chunks(a.shape[0], c.shape[0], chunk):
        _, z = _logits(a[i0:i1], c, scale, bias)
        total = total + softplus(z).sum()
    return total


def pairwise_bwd(a, c, scale, bias, weight_fn, chunk: int | None = None):
    """(dA, dC, ds, dbeta) for dL/dz_ij = weight_fn(z_blk, i0, i1), one recompute per block.

    weight_fn gets the [i1 - i0, N] logit block (accumulation dtype) and its row range.
    """
    acc = _accum_dtype(a.dtype)
    a32, c32 = a.to(acc), c.to(acc)
    scale32 = scale.to(acc)
    bias32 = bias.to(acc) if bias is not None else None
    grad_a = torch.empty_like(a32)
    grad_c = torch.zeros_like(c32)
    dscale = a32.new_zeros(())
    dbias = a32.new_zeros(())
    for i0, i1 in _row_chunks(a.shape[0], c.shape[0], chunk):
        dot, z = _logits(a32[i0:i1], c32, scale32, bias32)
        w = weight_fn(z, i0, i1)
        grad_a[i0:i1] = (w @ c32) * scale32
        grad_c.addmm_(w.T, a32[i0:i1], alpha=1.0)
        dscale = dscale + (w * dot).sum()
        dbias = dbias + w.sum()
    grad_c.mul_(scale32)
    return grad_a.to(a.dtype), grad_c.to(c.dtype), dscale, dbias


def lse_weight(lse_rows, g_rows, lse_cols, g_cols):
    """weight_fn for sums of row and column log-sum-exps (either may be None)."""

    def weight(z, i0, i1):
        w = torch.zeros_like(z)
        if lse_rows is not None:
            w += g_rows[i0:i1, None].to(z.dtype) * torch.exp(z - lse_rows[i0:i1, None].to(z.dtype))
        if lse_cols is not None:
            w += g_cols[None, :].to(z.dtype) * torch.exp(z - lse_cols[None, :].to(z.dtype))
        return w

    return weight


def sigmoid_weight(g):
    """weight_fn for g * sum_ij softplus(z_ij)."""
    return lambda z, i0, i1: g.to(z.dtype) * torch.sigmoid(z)
