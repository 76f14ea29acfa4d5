"""Chunked PyTorch algorithm of the contrastive loss (CPU tensors, fp64): same contract as ``triton.py``.

Both row and column log-sum-exps come out of one pass over [chunk, N] blocks (the column LSE is
merged across chunks with logaddexp).
"""

import torch

from ..common.chunked import cast, logits, pairwise_bwd, positives, row_chunks


def cross_entropy_fwd(a, c, scale, bias, label_offset: int, cols: bool, chunk: int | None = None):
    """(lse_rows, ce_rows, lse_cols, ce_cols) of z = scale * a @ c.T + bias (col ones None if not cols).

    ce_rows_i = lse_rows_i - z_{i, i+o}; ce_cols_j = lse_cols_j - z_{j-o, j} (cols needs M == N, o == 0).
    """
    a, c, scale, bias = cast(a, c, scale, bias)
    lse_rows, z_pos = a.new_empty(a.shape[0]), a.new_empty(a.shape[0])
    lse_cols = a.new_full((c.shape[0],), float("-inf")) if cols else None
    for i0, i1 in row_chunks(a.shape[0], c.shape[0], chunk):
        _, z = logits(a[i0:i1], c, scale, bias)
        lse_rows[i0:i1] = torch.logsumexp(z, dim=1)
        z_pos[i0:i1] = z[positives(z, i0, i1, label_offset)]
        if cols:
            lse_cols = torch.logaddexp(lse_cols, torch.logsumexp(z, dim=0))
    ce_cols = lse_cols - z_pos if cols else None
    return lse_rows, lse_rows - z_pos, lse_cols, ce_cols


def cross_entropy_weight(label_offset, lse_rows, g_rows, lse_cols=None, g_cols=None):
    """weight_fn for sum_i g_rows_i ce_rows_i (+ sum_j g_cols_j ce_cols_j)."""

    def weight(z, i0, i1):
        w = g_rows[i0:i1, None].to(z.dtype) * torch.exp(z - lse_rows[i0:i1, None].to(z.dtype))
        g_pos = g_rows[i0:i1].to(z.dtype)
        if lse_cols is not None:
            w += g_cols[None, :].to(z.dtype) * torch.exp(z - lse_cols[None, :].to(z.dtype))
            g_pos = g_pos + g_cols[i0 + label_offset : i1 + label_offset].to(z.dtype)
        w[positives(z, i0, i1, label_offset)] -= g_pos
        return w

    return weight


def contrastive_loss_fwd(a, c, scale, bias, label_offset: int, cols: bool):
    """(lse_rows [M], ce_rows [M], lse_cols [N] or [0], ce_cols [N] or [0]) in the accumulation dtype."""
    lse_rows, ce_rows, lse_cols, ce_cols = cross_entropy_fwd(a, c, scale, bias, label_offset, cols)
    if not cols:
        lse_cols, ce_cols = lse_rows.new_empty(0), lse_rows.new_empty(0)
    return lse_rows, ce_rows, lse_cols, ce_cols


def contrastive_loss_bwd(a, c, scale, bias, label_offset: int, lse_rows, g_rows, lse_cols, g_cols):
    """(grad_a, grad_c, ds, dbeta); the column term is used iff lse_cols is not None."""
    weight = cross_entropy_weight(label_offset, lse_rows, g_rows, lse_cols, g_cols)
    return pairwise_bwd(a, c, scale, bias, weight)
