"""Triton kernels and launchers of the CLIP contrastive loss (math: ``__init__.py``).

``_row_cross_entropy_fwd_kernel``: lse_i = log sum_j exp(z_ij) with an online max (finite for any s
and feature norm) and ce_i = lse_i - z_{i,i+o}, z = s A C^T + beta recomputed tile by tile. The
column (text->image) cross-entropy is the same kernel with A and C swapped and o -> -o. The
backward is the shared ``common.pairwise`` kernel with LOSS_LSE.
"""

import torch
import triton
import triton.language as tl

from ..common.pairwise import LOSS_LSE, check_row_strides, launch_config, pairwise_grad
from ..common.tiles import _is_positive, _rows, _similarity_tile


@triton.jit
def _row_cross_entropy_fwd_kernel(
    a_ptr,
    c_ptr,
    scale_ptr,
    bias_ptr,
    lse_ptr,
    ce_ptr,
    M,
    N,
    D,
    stride_am,
    stride_cn,
    label_offset,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_M rows of A against all N rows of C.  Grid: (cdiv(M, BLOCK_M),).
    # Reads BLOCK_M*D + N*D elements (C tiles hit L2 across programs); writes 2*BLOCK_M fp32.
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    a_base, a_offs = _rows(a_ptr, pid_m * BLOCK_M, stride_am, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32) if HAS_BIAS else 0.0
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        c_base, c_offs = _rows(c_ptr, n0, stride_cn, BLOCK_N)
        dot = _similarity_tile(
            a_base,
            a_offs,
            c_base,
            c_offs,
            mask_m,
            mask_n,
            D,
            BLOCK_D,
            INPUT_PRECISION,
        )
        z = tl.where(mask_n[None, :], dot * scale + bias, float("-inf"))
        z_pos += tl.sum(tl.where(_is_positive(offs_m, offs_n, label_offset), z, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + offs_m, lse, mask=mask_m)
    tl.store(ce_ptr + offs_m, lse - z_pos, mask=mask_m)


def row_cross_entropy_fwd(a, c, scale, bias, label_offset: int):
    """(lse [M], ce [M]) fp32 of z = scale * a @ c.T + bias; ce_i = lse_i - z_{i, i+label_offset}."""
    check_row_strides(a, c)
    M, D = a.shape
    cfg, bias_arg, precision = launch_config(a, scale, bias)
    lse = torch.empty(M, device=a.device, dtype=torch.float32)
    ce = torch.empty_like(lse)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _row_cross_entropy_fwd_kernel[grid](
        a,
        c,
        scale,
        bias_arg,
        lse,
        ce,
        M,
        c.shape[0],
        D,
        a.stride(0),
        c.stride(0),
        label_offset,
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=precision,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )
    return lse, ce


def contrastive_loss_fwd(a, c, scale, bias, label_offset: int, cols: bool):
    """(lse_rows [M], ce_rows [M], lse_cols [N] or [0], ce_cols [N] or [0]) fp32; see ``chunked``."""
    lse_rows, ce_rows = row_cross_entropy_fwd(a, c, scale, bias, label_offset)
    if not cols:
        empty = lse_rows.new_empty(0)
        return lse_rows, ce_rows, empty, empty.clone()
    lse_cols, ce_cols = row_cross_entropy_fwd(c, a, scale, bias, -label_offset)
    return lse_rows, ce_rows, lse_cols, ce_cols


def contrastive_loss_bwd(a, c, scale, bias, label_offset: int, lse_rows, g_rows, lse_cols, g_cols):
    """(grad_a, grad_c, ds, dbeta) of sum_i g_rows_i ce_rows_i (+ sum_j g_cols_j ce_cols_j if
    lse_cols is not None). dC is dA of the transposed problem: rows and columns swap roles."""
    row_term = (lse_rows, g_rows)
    col_term = (lse_cols, g_cols) if lse_cols is not None else None
    grad_a, ds, db = pairwise_grad(a, c, scale, bias, label_offset, LOSS_LSE, row_term, col_term)
    grad_c, _, _ = pairwise_grad(c, a, scale, bias, -label_offset, LOSS_LSE, col_term, row_term)
    return grad_a, grad_c, ds, db
