"""Chunked PyTorch implementation of the per-anchor ops (same math and API as ``triton.py``).

Rows of A are processed a chunk at a time against all of C, so the largest temporary is
[chunk, N]. Used for CPU tensors and fp64; it is also the specification of the Triton kernels.
"""

import torch

from ..common.chunked import accum_dtype, row_chunks


def _dots(a, c, i0, i1):
    return a[i0:i1] @ c.T


def _positive_mask(rows: int, n: int, i0: int, label_offset: int, device) -> torch.Tensor:
    """[rows, n] bool, True at (i, i0 + i + label_offset)."""
    cols = torch.arange(n, device=device)
    return cols[None, :] == (torch.arange(rows, device=device) + i0 + label_offset)[:, None]


def anchor_stats(a, c, row_scale, label_offset: int, exclude_positive: bool, chunk: int | None = None):
    """(lse [M], mean_dot [M], pos_dot [M]); see ``fastclip_kernels.ops.anchor.anchor_stats``."""
    acc = accum_dtype(a.dtype)
    a, c, row_scale = a.to(acc), c.to(acc), row_scale.to(acc)
    lse, mean_dot, pos_dot = (a.new_empty(a.shape[0]) for _ in range(3))
    for i0, i1 in row_chunks(a.shape[0], c.shape[0], chunk):
        dot = _dots(a, c, i0, i1)
        pos = _positive_mask(i1 - i0, c.shape[0], i0, label_offset, a.device)
        z = dot * row_scale[i0:i1, None]
        if exclude_positive:
            z = z.masked_fill(pos, float("-inf"))
        lse[i0:i1] = torch.logsumexp(z, dim=1)
        p = torch.exp(z - lse[i0:i1, None])
        mean_dot[i0:i1] = (p * dot).sum(dim=1)
        cols = torch.arange(i0, i1, device=a.device) + label_offset
        pos_dot[i0:i1] = dot.gather(1, cols[:, None]).squeeze(1)  # gather, not dot[pos]: no host sync
    return lse, mean_dot, pos_dot


def anchor_weight(dot, i0, label_offset, exclude_positive, pos_coef, row, col):
    """W = dL/d<a_i, c_j> for a [rows, N] block of dots starting at row i0 (see ``anchor_grad``)."""
    rows = dot.shape[0]
    w = torch.zeros_like(dot)
    if row is not None:
        scale, shift, coef = (t[i0 : i0 + rows, None].to(dot.dtype) for t in row)
        w += coef * torch.exp(scale * dot - shift)
    if col is not None:
        scale, shift, coef = (t[None, :].to(dot.dtype) for t in col)
        w += coef * torch.exp(scale * dot - shift)
    pos = _positive_mask(rows, dot.shape[1], i0, label_offset, dot.device)
    if exclude_positive:
        w = w.masked_fill(pos, 0.0)
    return w + pos * pos_coef[i0 : i0 + rows, None].to(dot.dtype)


def anchor_grad(a, c, label_offset, exclude_positive, pos_coef, row=None, col=None, chunk=None):
    """grad_a [M, D] = W @ C in a's dtype; see ``fastclip_kernels.ops.anchor.anchor_grad``."""
    acc = accum_dtype(a.dtype)
    a32, c32 = a.to(acc), c.to(acc)
    grad_a = torch.empty_like(a32)
    for i0, i1 in row_chunks(a.shape[0], c.shape[0], chunk):
        w = anchor_weight(_dots(a32, c32, i0, i1), i0, label_offset, exclude_positive, pos_coef, row, col)
        grad_a[i0:i1] = w @ c32
    return grad_a.to(a.dtype)
