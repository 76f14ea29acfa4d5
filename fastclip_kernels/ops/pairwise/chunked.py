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


def _positives(z_blk, i0, i1, label_offset):
    """(rows, cols) index of the positives in a [i1 - i0, N] block: column i + label_offset."""
    rows = torch.arange(i1 - i0, device=z_blk.device)
    return rows, rows + i0 + label_offset


def _cast(a, c, scale, bias):
    acc = _accum_dtype(a.dtype)
    return a.to(acc), c.to(acc), scale.to(acc), (bias.to(acc) if bias is not None else None)


def cross_entropy_fwd(a, c, scale, bias, label_offset: int, cols: bool, chunk: int | None = None):
    """(lse_rows, ce_rows, lse_cols, ce_cols) of z = scale * a @ c.T + bias (col ones None if not cols).

    ce_rows_i = lse_rows_i - z_{i, i+o}; ce_cols_j = lse_cols_j - z_{j-o, j} (cols needs M == N, o == 0).
    """
    a, c, scale, bias = _cast(a, c, scale, bias)
    lse_rows, z_pos = a.new_empty(a.shape[0]), a.new_empty(a.shape[0])
    lse_cols = a.new_full((c.shape[0],), float("-inf")) if cols else None
    for i0, i1 in _row_chunks(a.shape[0], c.shape[0], chunk):
        _, z = _logits(a[i0:i1], c, scale, bias)
        lse_rows[i0:i1] = torch.logsumexp(z, dim=1)
        z_pos[i0:i1] = z[_positives(z, i0, i1, label_offset)]
        if cols:
            lse_cols = torch.logaddexp(lse_cols, torch.logsumexp(z, dim=0))
    ce_cols = lse_cols - z_pos if cols else None
    return lse_rows, lse_rows - z_pos, lse_cols, ce_cols


def sigmoid_loss_fwd(a, c, scale, bias, label_offset: int, chunk: int | None = None):
    """sum_ij softplus(-y_ij z_ij), y_ij = +1 iff j = i + label_offset, as a 0-d tensor."""
    a, c, scale, bias = _cast(a, c, scale, bias)
    total = a.new_zeros(())
    for i0, i1 in _row_chunks(a.shape[0], c.shape[0], chunk):
        _, z = _logits(a[i0:i1], c, scale, bias)
        pos = _positives(z, i0, i1, label_offset)
        z[pos] = -z[pos]
        total = total + softplus(z).sum()
    return total


def pairwise_bwd(a, c, scale, bias, weight_fn, chunk: int | None = None):
    """(dA, dC, ds, dbeta) for dL/dz_ij = weight_fn(z_blk, i0, i1), one recompute per block.

    weight_fn gets the [i1 - i0, N] logit block (accumulation dtype) and its row range.
    """
    a32, c32, scale32, bias32 = _cast(a, c, scale, bias)
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


def cross_entropy_weight(label_offset, lse_rows, g_rows, lse_cols=None, g_cols=None):
    """weight_fn for sum_i g_rows_i ce_rows_i (+ sum_j g_cols_j ce_cols_j)."""

    def weight(z, i0, i1):
        w = g_rows[i0:i1, None].to(z.dtype) * torch.exp(z - lse_rows[i0:i1, None].to(z.dtype))
        g_pos = g_rows[i0:i1].to(z.dtype)
        if lse_cols is not None:
            w += g_cols[None, :].to(z.dtype) * torch.exp(z - lse_cols[None, :].to(z.dtype))
            g_pos = g_pos + g_cols[i0 + label_offset : i1 + label_offset].to(z.dtype)
        w[_positives(z, i0, i1, label_offset)] -= g_pos
        return w

    return weight


def sigmoid_weight(label_offset, g):
    """weight_fn for g * sum_ij softplus(-y_ij z_ij)."""

    def weight(z, i0, i1):
        w = g.to(z.dtype) * torch.sigmoid(z)
        w[_positives(z, i0, i1, label_offset)] -= g.to(z.dtype)
        return w

    return weight
