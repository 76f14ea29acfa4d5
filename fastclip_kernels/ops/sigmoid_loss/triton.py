"""Triton kernel and launchers of the sigmoid (SigLIP) loss (math: ``__init__.py``).

``_sigmoid_loss_fwd_kernel``: per row block, sum_ij softplus(-y_ij z_ij), y = 2 pos - 1, z
recomputed tile by tile. The backward is the shared ``common.pairwise`` kernel with LOSS_SIGMOID.
"""

import torch
import triton
import triton.language as tl

from ..common.pairwise import LOSS_SIGMOID, check_row_strides, launch_config, pairwise_grad
from ..common.tiles import _is_positive, _rows, _similarity_tile, _softplus


@triton.jit
def _sigmoid_loss_fwd_kernel(
    a_ptr,
    c_ptr,
    scale_ptr,
    bias_ptr,
    partial_ptr,
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
    # One program: sum of softplus(-y_ij z_ij) over BLOCK_M rows and all N columns, written to
    # partial_ptr[pid_m] (summed on the host side in fixed order: deterministic, no atomics).
    # Grid: (cdiv(M, BLOCK_M),). Reads BLOCK_M*D + N*D elements; writes 1 fp32.
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    a_base, a_offs = _rows(a_ptr, pid_m * BLOCK_M, stride_am, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32) if HAS_BIAS else 0.0
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
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
        z = dot * scale + bias
        sp = _softplus(tl.where(_is_positive(offs_m, offs_n, label_offset), -z, z))
        acc += tl.sum(tl.where(mask_m[:, None] & mask_n[None, :], sp, 0.0), axis=1)
    tl.store(partial_ptr + pid_m, tl.sum(acc, axis=0))


def sigmoid_loss_fwd(a, c, scale, bias, label_offset: int):
    """sum_ij softplus(-y_ij z_ij) as a 0-d fp32 tensor, y_ij = +1 iff j = i + label_offset."""
    check_row_strides(a, c)
    M, D = a.shape
    cfg, bias_arg, precision = launch_config(a, scale, bias)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    partial = torch.empty(grid[0], device=a.device, dtype=torch.float32)
    _sigmoid_loss_fwd_kernel[grid](
        a,
        c,
        scale,
        bias_arg,
        partial,
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
    return partial.sum()


def sigmoid_loss_bwd(g, a, c, scale, bias, label_offset: int):
    """(grad_a, grad_c, ds, dbeta) of g * sum_ij softplus(-y_ij z_ij); g 0-d fp32."""
    grad_a, ds, db = pairwise_grad(a, c, scale, bias, label_offset, LOSS_SIGMOID, g=g)
    grad_c, _, _ = pairwise_grad(c, a, scale, bias, -label_offset, LOSS_SIGMOID, g=g)
    return grad_a, grad_c, ds, db


def sigmoid_loss_rows_bwd(g, a, c, scale, bias, label_offset: int):
    """(grad_a, ds, dbeta) of g * sum_ij softplus(-y_ij z_ij): the row gradient only (no dC pass)."""
    return pairwise_grad(a, c, scale, bias, label_offset, LOSS_SIGMOID, g=g)
