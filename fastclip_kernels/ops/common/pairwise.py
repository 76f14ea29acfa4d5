"""Shared Triton tile math of the pairwise losses (contrastive, sigmoid) and the per-anchor ops.

For A [M, D] (rows), C [N, D] (columns) and z_ij = s * <a_i, c_j> + beta (recomputed tile by tile,
never stored), the backward of any loss with W_ij = dL/dz_ij is

    dA = s * W @ C,   dC = s * W^T @ A,   ds = sum_ij W_ij <a_i, c_j>,   dbeta = sum_ij W_ij.

``_pairwise_grad_kernel`` computes dA (and per-block partials of ds, dbeta); dC is the same kernel
with A and C swapped (W^T is W of the swapped problem, offset negated). W is:
    * LOSS_LSE:     W_ij = g_row_i (exp(z_ij - lse_row_i) - pos_ij) + g_col_j (exp(z_ij - lse_col_j) - pos_ij)
    * LOSS_SIGMOID: W_ij = g (sigmoid(z_ij) - pos_ij)
Row i's positive is column i + o (o = ``label_offset``). Also here: the tile configuration
(``launch_config``) every pairwise launcher uses. Vocabulary: CONTRIBUTING.md.
"""

import torch
import triton
import triton.language as tl

from . import small_tiles
from .tiles import (
    MAX_ROW_STRIDE,
    _pairwise_weight,
    _rescale_rows,
    _rows,
    _rows_again,
    _similarity_tile,
    _unscale_rows,
)

LOSS_LSE = 0
LOSS_SIGMOID = 1


@triton.jit
def _pairwise_grad_kernel(
    a_ptr,
    c_ptr,
    scale_ptr,
    bias_ptr,
    grad_a_ptr,
    partial_ptr,
    lse_row_ptr,
    g_row_ptr,
    lse_col_ptr,
    g_col_ptr,
    g_ptr,
    M,
    N,
    D,
    stride_am,
    stride_cn,
    stride_gm,
    num_blocks_m,
    label_offset,
    LOSS: tl.constexpr,
    HAS_ROW_TERM: tl.constexpr,
    HAS_COL_TERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    RESCALE_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    # One program: dA[BLOCK_M rows, BLOCK_DO output dims] = s * sum_j W_ij c_j, recomputing each
    # z tile over the full D. Grid: (cdiv(M, BLOCK_M), cdiv(D, BLOCK_DO)). Programs with
    # pid_d == 0 also write the partials of ds and dbeta (partial_ptr[0|1, pid_m]).
    # Reads BLOCK_M*D + N*(D + BLOCK_DO) elements; writes BLOCK_M*BLOCK_DO (+2 fp32).
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    a_base, a_offs = _rows(a_ptr, pid_m * BLOCK_M, stride_am, BLOCK_M)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < D
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32) if HAS_BIAS else 0.0
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    dscale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_M,), dtype=tl.float32)
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
        w = _pairwise_weight(
            dot * scale + bias,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            label_offset,
            lse_row_ptr,
            g_row_ptr,
            lse_col_ptr,
            g_col_ptr,
            g_ptr,
            LOSS,
            HAS_ROW_TERM,
            HAS_COL_TERM,
        )
        dscale += tl.sum(w * dot, axis=1)
        dbias += tl.sum(w, axis=1)
        c_base, c_offs = _rows_again(c_ptr, n0, stride_cn, BLOCK_N)
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
    grad_a = (acc * scale).to(grad_a_ptr.dtype.element_ty)
    grad_base, grad_offs = _rows(grad_a_ptr, pid_m * BLOCK_M, stride_gm, BLOCK_M)
    tl.store(
        grad_base + (grad_offs[:, None] + offs_do[None, :]),
        grad_a,
        mask=mask_m[:, None] & mask_do[None, :],
    )
    is_first_d = pid_d == 0
    tl.store(partial_ptr + pid_m, tl.sum(dscale, axis=0), mask=is_first_d)
    tl.store(partial_ptr + num_blocks_m + pid_m, tl.sum(dbias, axis=0), mask=is_first_d)


def blocks(D: int, interpret: bool, dtype: torch.dtype, precision: str) -> dict:
    """Tile sizes of every pairwise and anchor launch (and what tests/compile_for_hopper.py compiles).

    GPU, tensor-core dots (fp16/bf16, fp32 as tf32): 64x64 tiles, 64-wide D steps, BLOCK_DO up to 128.
    GPU, fp32 without TF32 (``precision == "ieee"``, PyTorch's default): FMA dots, no wgmma; 32-wide
    D steps and BLOCK_DO <= 64 keep every kernel spill-free on sm_90 (64-wide D steps spill 12-92 B,
    BLOCK_DO = 128 36-84 B). Interpreter: the smallest legal tiles (it runs one numpy program at a time).
    """
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32, BLOCK_DO=32, num_warps=4)
    block_do = max(16, triton.next_power_of_2(D))
    if fp32_fma(dtype, precision):
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DO=min(64, block_do), num_warps=8)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DO=min(128, block_do), num_warps=8)


def input_precision(dtype) -> str:
    """tl.dot's input precision: "tf32" for fp32 only where torch allows TF32 matmuls, else "ieee"."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def fp32_fma(dtype, precision: str) -> bool:
    """True for fp32 dots without TF32: computed with FMAs (no tensor cores), so smaller tiles."""
    return dtype == torch.float32 and precision == "ieee"


def rescale_w(dtype) -> bool:
    """Whether W needs the per-row power-of-two rescale before its GEMM: fp16 only (bf16 and fp32 have
    fp32's exponent range, so W ~ 1/(2 b N) stays normal there)."""
    return dtype == torch.float16


def check_row_strides(*tensors) -> None:
    """Row strides the kernels' int32 in-chunk offsets can address (``tiles._rows``)."""
    for t in tensors:
        if t.stride(0) >= MAX_ROW_STRIDE:
            raise ValueError(
                f"features with a row stride of {t.stride(0)} elements (>= {MAX_ROW_STRIDE}) are not "
                "supported by the Triton kernels; pass contiguous [B, D] features with D < that"
            )


def launch_config(a, scale, bias):
    """(tiles, bias pointer, dot precision) of a pairwise launch on features ``a``."""
    precision = input_precision(a.dtype)
    cfg = blocks(a.shape[1], small_tiles(), a.dtype, precision)
    # Without a bias, HAS_BIAS=False and the pointer is never read: pass scale, allocate nothing.
    return cfg, (bias if bias is not None else scale), precision


def pairwise_grad(a, c, scale, bias, label_offset, loss, row_term=None, col_term=None, g=None):
    """dA [M, D] (a's dtype) and the 0-d fp32 partial sums (ds, dbeta) for W of ``loss``.

    row_term / col_term: (lse [M] or [N], upstream grad of lse) for LOSS_LSE, else None.
    g: 0-d fp32 upstream grad of the sigmoid-loss sum for LOSS_SIGMOID.
    """
    check_row_strides(a, c)
    M, D = a.shape
    cfg, bias_arg, precision = launch_config(a, scale, bias)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_DO"]))
    grad_a = torch.empty_like(a)
    partial = torch.empty((2, grid[0]), device=a.device, dtype=torch.float32)
    unused = partial  # any fp32 pointer stands in for an absent term; never read
    lse_row, g_row = row_term if row_term is not None else (unused, unused)
    lse_col, g_col = col_term if col_term is not None else (unused, unused)
    _pairwise_grad_kernel[grid](
        a,
        c,
        scale,
        bias_arg,
        grad_a,
        partial,
        lse_row,
        g_row,
        lse_col,
        g_col,
        g if g is not None else unused,
        M,
        c.shape[0],
        D,
        a.stride(0),
        c.stride(0),
        grad_a.stride(0),
        grid[0],
        label_offset,
        LOSS=loss,
        HAS_ROW_TERM=row_term is not None,
        HAS_COL_TERM=col_term is not None,
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=precision,
        RESCALE_W=rescale_w(a.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_DO=cfg["BLOCK_DO"],
        num_warps=cfg["num_warps"],
    )
    dscale, dbias = partial.sum(dim=1)
    return grad_a, dscale, dbias
