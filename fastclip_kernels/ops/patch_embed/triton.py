"""Triton kernel of the packed patch embedding (see ``patch_embed.py`` for the math and the API).

One gather-GEMM: each kept patch's pixels are read straight from the [B, C, H, W] image tensor
(any batch/channel/row strides; a row's pixels contiguous, else the launcher copies), multiplied
by the flattened conv weight [D, C*P*P], on top of the patch's position row and the bias, with one
store into the packed token tensor.
No [T_p, C*P*P] patch matrix (unfold copy) is ever written.
"""

import torch
import triton
import triton.language as tl

from ..common import small_tiles
from .naive import gather_patches

_DPOS_CHUNK = 1 << 16  # tokens per fp32 scatter-add chunk in the backward (bounds the fp32 copy)


@triton.jit
def _patch_embed_fwd_kernel(
    img_ptr,
    idx_ptr,
    batch_ptr,
    w_ptr,
    bias_ptr,
    pos_ptr,
    out_ptr,
    T_p,
    D,
    grid_w,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_pos,
    stride_out,
    C: tl.constexpr,
    P: tl.constexpr,
    P_POW2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_T kept patches x BLOCK_D output features,
    #   out[row_t, d] = pos[1 + patch_t, d] + bias[d] + sum_k pixel_t[k] W[d, k],
    # k = (c, ky, kx) in nn.Conv2d's weight order, row_t = t + batch_t + 1 (each sequence's class
    # token sits in front of its patches). The K loop walks patch rows padded to P_POW2 pixels, so
    # kx is contiguous (coalesced image reads). Grid: (cdiv(D, BLOCK_D) * cdiv(T_p, BLOCK_T),), the
    # D blocks of one token block adjacent: its pixels come from HBM once, then from L2.
    # Reads BLOCK_T*C*P*P pixels, BLOCK_D*C*P*P weights, BLOCK_T*BLOCK_D position values; writes
    # BLOCK_T*BLOCK_D tokens. FLOPs 2*T_p*C*P*P*D in all.
    pid = tl.program_id(0)
    num_d = tl.cdiv(D, BLOCK_D)
    pid_t = pid // num_d
    pid_d = pid % num_d
    t0 = pid_t * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T_p
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_td = mask_t[:, None] & mask_d[None, :]
    patch = tl.load(idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int32)
    batch = tl.load(batch_ptr + offs_t, mask=mask_t, other=0)
    # The accumulator starts as position + bias (loaded before the loop: fewer live registers after).
    acc = tl.load(pos_ptr + (patch + 1)[:, None] * stride_pos + offs_d[None, :], mask=mask_td, other=0.0)
    acc = acc.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    # Top-left pixel of each patch (int64: B*C*H*W may pass 2**31 elements).
    row_off = batch.to(tl.int64) * stride_ib + ((patch // grid_w) * stride_ih + (patch % grid_w)) * P
    for k0 in range(0, C * P * P_POW2, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kx = offs_k % P_POW2
        r = offs_k // P_POW2  # patch row c * P + ky
        mask_k = (kx < P) & (r < C * P)
        col_off = (r // P) * stride_ic + (r % P) * stride_ih + kx
        x = tl.load(
            img_ptr + row_off[:, None] + col_off[None, :],
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        )
        # W^T tile [BLOCK_K, BLOCK_D] of the contiguous [D, K] weight (K-major, as wgmma wants).
        w = tl.load(
            w_ptr + offs_d[None, :] * (C * P * P) + (r * P + kx)[:, None],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = tl.dot(x.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
    # Rows relative to the block's first output row (int32 offsets from an int64 base).
    b0 = tl.load(batch_ptr + t0)
    out_ptr += (t0 + b0 + 1).to(tl.int64) * stride_out
    rows = tl.arange(0, BLOCK_T) + (batch - b0)
    tl.store(
        out_ptr + rows[:, None] * stride_out + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_td
    )


# ----------------------------------------------------------------------------------------------
# Launcher: allocate, choose blocks, launch. Tensors in, tensors out; no autograd here.
# ----------------------------------------------------------------------------------------------


def blocks(dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes. GPU: 64 tokens x 128 features, 8 warps, K steps of 32 (two padded patch rows;
    16 for fp32/tf32): on sm_90 179-232 registers and no spills for every shipped configuration
    (tests/hopper_patch_embed.py), where 128 x 128 tiles or 64-wide K steps spill. Interpreter:
    the smallest legal tiles (it runs one program at a time)."""
    if interpret:
        return dict(BLOCK_T=16, BLOCK_D=32, BLOCK_K=32, num_warps=4)
    block_k = 16 if dtype == torch.float32 else 32
    return dict(BLOCK_T=64, BLOCK_D=128, BLOCK_K=block_k, num_warps=8)


def input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def patch_embed_fwd(images, weight, bias, pos, idx, batch, num_tokens: int, patch_size: int):
    """Patch rows of the packed tokens [num_tokens, D] in ``weight``'s dtype; class rows are left
    uninitialized (the caller writes them).

    images [B, C, H, W] (any float dtype; copied if a row's pixels are not contiguous); weight [D, C*P*P] contiguous (compute
    dtype); bias [D] or None; pos [1 + gh*gw, D] (row 0: class position); idx [T_p] int64 patch
    index in [0, gh*gw); batch [T_p] int32 sequence of each patch, non-decreasing.
    """
    D = weight.shape[0]
    T_p = idx.shape[0]
    cfg = blocks(weight.dtype, small_tiles())
    if images.stride(3) != 1:  # e.g. channels-last: the kernel reads rows of contiguous pixels
        images = images.contiguous()
    out = torch.empty(num_tokens, D, device=weight.device, dtype=weight.dtype)
    if T_p == 0:
        return out
    grid = (triton.cdiv(T_p, cfg["BLOCK_T"]) * triton.cdiv(D, cfg["BLOCK_D"]),)
    _patch_embed_fwd_kernel[grid](
        images,
        idx,
        batch,
        weight,
        bias if bias is not None else weight,  # never read when HAS_BIAS=False
        pos,
        out,
        T_p,
        D,
        images.shape[3] // patch_size,
        *images.stride()[:3],
        pos.stride(0),
        out.stride(0),
        C=images.shape[1],
        P=patch_size,
        P_POW2=triton.next_power_of_2(patch_size),
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=input_precision(weight.dtype),
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"],
    )
    return out


def patch_embed_bwd(dout, images, weight, pos, cls, idx, batch, cls_rows, patch_size: int):
    """(dW [D, C*P*P], dbias [D], dpos, dcls) of the Triton path's tokens, in PyTorch: dW = dP^T @
    patches with the kept pixels re-gathered (never saved); no image gradient."""
    dtype = weight.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    T_p = idx.shape[0]
    dpatch = dout[torch.arange(T_p, device=dout.device) + batch.long() + 1]
    dw = dpatch.to(dtype).T @ gather_patches(images, idx, batch, patch_size).to(dtype)
    db = dpatch.sum(0, dtype=acc).to(dtype)
    dcls_sum = dout[cls_rows].sum(0, dtype=acc)
    dpos = torch.zeros(pos.shape, device=dout.device, dtype=acc)
    # Host loop (sizes are known, no sync); index_add_ uses atomics on CUDA (not bitwise
    # deterministic), in fp32, so the low-precision rounding happens once at the end.
    for s in range(0, T_p, _DPOS_CHUNK):
        dpos.index_add_(0, idx[s : s + _DPOS_CHUNK] + 1, dpatch[s : s + _DPOS_CHUNK].to(acc))
    dpos[0] += dcls_sum
    return dw, db, dpos.to(pos.dtype), dcls_sum.to(cls.dtype)
