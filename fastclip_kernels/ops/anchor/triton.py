"""Triton kernels for the per-anchor statistics and gradients (math in ``ops/anchor/__init__.py``).

Both kernels see A [M, D] (anchors, e.g. the local image features) and C [N, D] (candidates, e.g.
the gathered text features), and the similarities

    P_ij = <a_i, c_j>

recomputed tile by tile over the full D (fp32 accumulation) and never stored: memory is
O((M + N) * D). Row i's positive is column i + o (o = ``label_offset``); S_i is every column, or
every column but the positive when ``exclude_positive`` (FastCLIP's g).

``_anchor_stats_kernel`` (forward): with z_ij = s_i P_ij (s = per-row scale) and an online max,
    lse_i      = log sum_{j in S_i} exp(z_ij)
    mean_dot_i = sum_{j in S_i} exp(z_ij - lse_i) P_ij      (kept as an unnormalized running sum
                                                            rescaled with the max, like l_i)
    pos_dot_i  = P_{i, i+o}
Grid (cdiv(M, BLOCK_M),); reads BLOCK_M*D + N*D elements per program, writes 3*BLOCK_M fp32.

``_anchor_grad_kernel`` (backward): grad_a = W @ C with
    W_ij = [j in S_i] (row.coef_i exp(row.scale_i P_ij - row.shift_i)
                       + col.coef_j exp(col.scale_j P_ij - col.shift_j)) + [j = i + o] pos_coef_i
in fp32, zero outside the matrix, cast to C's dtype for the tensor-core product (fp16: rows rescaled by a
power of two first, ``tiles._rescale_rows``, so small W does not underflow). The row and
column terms are constexpr-optional (HAS_ROW, HAS_COL). Grid (cdiv(M, BLOCK_M), cdiv(D, BLOCK_DO)):
one program recomputes its P tiles over the full D and accumulates W @ C[:, BLOCK_DO block].
Per-anchor vectors are read through a stride, so a stride-0 ``expand`` of a scalar needs no copy.
Kernels use the vocabulary in CONTRIBUTING.md (pid_*, offs_*, mask_*, *_ptr, BLOCK_*).
"""

import torch
import triton
import triton.language as tl

from ..common import small_tiles
from ..common.pairwise import blocks, check_row_strides, input_precision, rescale_w
from ..common.tiles import _is_positive, _rescale_rows, _rows, _rows_again, _similarity_tile, _unscale_rows


@triton.jit
def _anchor_stats_kernel(
    a_ptr,
    c_ptr,
    row_scale_ptr,
    lse_ptr,
    mean_dot_ptr,
    pos_dot_ptr,
    M,
    N,
    D,
    stride_am,
    stride_cn,
    stride_s,
    label_offset,
    EXCLUDE_POSITIVE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_M anchors against all N candidates.  Grid: (cdiv(M, BLOCK_M),).
    # Reads BLOCK_M*D + N*D elements (C tiles hit L2 across programs); writes 3*BLOCK_M fp32.
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    a_base, a_offs = _rows(a_ptr, pid_m * BLOCK_M, stride_am, BLOCK_M)
    scale = tl.load(row_scale_ptr + offs_m * stride_s, mask=mask_m, other=0.0).to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mean_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
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
        pos = _is_positive(offs_m, offs_n, label_offset)
        pos_dot += tl.sum(tl.where(pos, dot, 0.0), axis=1)
        z = tl.where(mask_n[None, :], dot * scale[:, None], float("-inf"))
        if EXCLUDE_POSITIVE:
            z = tl.where(pos, float("-inf"), z)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        # Until a row has seen a kept column its max is -inf; subtract 0 then (no -inf - -inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(z - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        mean_acc = mean_acc * alpha + tl.sum(p * dot, axis=1)
        m_i = m_new
    tl.store(lse_ptr + offs_m, m_i + tl.log(l_i), mask=mask_m)
    tl.store(mean_dot_ptr + offs_m, mean_acc / l_i, mask=mask_m)
    tl.store(pos_dot_ptr + offs_m, pos_dot, mask=mask_m)


@triton.jit
def _load_vec(ptr, offs, mask, stride):
    """A per-anchor fp32 vector at ``offs`` (stride 0: one value broadcast), 0 where masked."""
    return tl.load(ptr + offs * stride, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _anchor_grad_kernel(
    a_ptr,
    c_ptr,
    grad_a_ptr,
    pos_coef_ptr,
    row_scale_ptr,
    row_shift_ptr,
    row_coef_ptr,
    col_scale_ptr,
    col_shift_ptr,
    col_coef_ptr,
    M,
    N,
    D,
    stride_am,
    stride_cn,
    stride_gm,
    stride_pc,
    stride_rs,
    stride_rh,
    stride_rc,
    stride_cs,
    stride_ch,
    stride_cc,
    label_offset,
    HAS_ROW: tl.constexpr,
    HAS_COL: tl.constexpr,
    EXCLUDE_POSITIVE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    RESCALE_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    # One program: grad_a[BLOCK_M rows, BLOCK_DO output dims] = sum_j W_ij c_j, recomputing each
    # P tile over the full D. Grid: (cdiv(M, BLOCK_M), cdiv(D, BLOCK_DO)).
    # Reads BLOCK_M*D + N*(D + BLOCK_DO) elements (+ 3N fp32 with HAS_COL); writes BLOCK_M*BLOCK_DO.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    a_base, a_offs = _rows(a_ptr, pid_m * BLOCK_M, stride_am, BLOCK_M)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < D
    pos_coef = _load_vec(pos_coef_ptr, offs_m, mask_m, stride_pc)
    if HAS_ROW:
        row_scale = _load_vec(row_scale_ptr, offs_m, mask_m, stride_rs)
        row_shift = _load_vec(row_shift_ptr, offs_m, mask_m, stride_rh)
        row_coef = _load_vec(row_coef_ptr, offs_m, mask_m, stride_rc)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    row_log2 = tl.full((BLOCK_M,), -126.0, dtype=tl.float32)
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
        c_base, c_offs = _rows_again(c_ptr, n0, stride_cn, BLOCK_N)
        w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_ROW:
            w += row_coef[:, None] * tl.exp(row_scale[:, None] * dot - row_shift[:, None])
        if HAS_COL:
            col_scale = _load_vec(col_scale_ptr, offs_n, mask_n, stride_cs)
            col_shift = _load_vec(col_shift_ptr, offs_n, mask_n, stride_ch)
            col_coef = _load_vec(col_coef_ptr, offs_n, mask_n, stride_cc)
            w += col_coef[None, :] * tl.exp(col_scale[None, :] * dot - col_shift[None, :])
        pos = _is_positive(offs_m, offs_n, label_offset)
        if EXCLUDE_POSITIVE:
            w = tl.where(pos, 0.0, w)
        w += tl.where(pos, pos_coef[:, None], 0.0)
        w = tl.where(mask_m[:, None] & mask_n[None, :], w, 0.0)
        c = tl.load(
            c_base + (c_offs[:, None] + offs_do[None, :]),
            mask=mask_n[:, None] & mask_do[None, :],
            other=0.0,
        )
        if RESCALE_W:
            w, acc, row_log2 = _rescale_rows(w, acc, row_log2)
        acc = tl.dot(w.to(c.dtype), c, acc, input_precision=INPUT_PRECISION)
    if RESCALE_W:
        acc = _unscale_rows(acc, row_log2)
    grad_base, grad_offs = _rows(grad_a_ptr, pid_m * BLOCK_M, stride_gm, BLOCK_M)
    tl.store(
        grad_base + (grad_offs[:, None] + offs_do[None, :]),
        acc.to(grad_a_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_do[None, :],
    )


# ----------------------------------------------------------------------------------------------
# Launchers: allocate, choose blocks, launch. Tensors in, tensors out; no autograd here.
# ----------------------------------------------------------------------------------------------


def _config(a) -> tuple[dict, str]:
    """(tile sizes, tl.dot input precision): pairwise's GPU or interpreter tiling."""
    precision = input_precision(a.dtype)
    return blocks(a.shape[1], small_tiles(), a.dtype, precision), precision


def anchor_stats(a, c, row_scale, label_offset: int, exclude_positive: bool):
    """(lse [M], mean_dot [M], pos_dot [M]) fp32; see ``fastclip_kernels.ops.anchor.anchor_stats``."""
    check_row_strides(a, c)
    M, D = a.shape
    cfg, precision = _config(a)
    lse = torch.empty(M, device=a.device, dtype=torch.float32)
    mean_dot, pos_dot = torch.empty_like(lse), torch.empty_like(lse)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _anchor_stats_kernel[grid](
        a,
        c,
        row_scale,
        lse,
        mean_dot,
        pos_dot,
        M,
        c.shape[0],
        D,
        a.stride(0),
        c.stride(0),
        row_scale.stride(0),
        label_offset,
        EXCLUDE_POSITIVE=exclude_positive,
        INPUT_PRECISION=precision,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )
    return lse, mean_dot, pos_dot


def anchor_grad(a, c, label_offset, exclude_positive, pos_coef, row, col):
    """grad_a [M, D] in a's dtype; see ``fastclip_kernels.ops.anchor.anchor_grad``.

    row / col: None or (scale, shift, coef) fp32 vectors of length M / N (any stride, 0 included).
    """
    check_row_strides(a, c)
    M, D = a.shape
    cfg, precision = _config(a)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_DO"]))
    grad_a = torch.empty_like(a)
    # An absent term's pointers are never read (HAS_ROW / HAS_COL = False): pass pos_coef.
    row_vecs = row if row is not None else (pos_coef,) * 3
    col_vecs = col if col is not None else (pos_coef,) * 3
    _anchor_grad_kernel[grid](
        a,
        c,
        grad_a,
        pos_coef,
        *row_vecs,
        *col_vecs,
        M,
        c.shape[0],
        D,
        a.stride(0),
        c.stride(0),
        grad_a.stride(0),
        pos_coef.stride(0),
        *(t.stride(0) for t in row_vecs),
        *(t.stride(0) for t in col_vecs),
        label_offset,
        HAS_ROW=row is not None,
        HAS_COL=col is not None,
        EXCLUDE_POSITIVE=exclude_positive,
        INPUT_PRECISION=precision,
        RESCALE_W=rescale_w(a.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_DO=cfg["BLOCK_DO"],
        num_warps=cfg["num_warps"],
    )
    return grad_a
