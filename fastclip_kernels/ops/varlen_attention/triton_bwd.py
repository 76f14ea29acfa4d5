"""Varlen attention backward in Triton (math in ``triton.py``): three kernels, no atomics.

    1. ``_varlen_attention_bwd_preprocess_kernel``: delta_i = sum_c dO_ic O_ic  (fp32, [H, T_q]).
    2. ``_varlen_attention_bwd_dkdv_kernel``: one program owns BLOCK_N keys and loops over the query
       blocks that see them: dV += P^T dO, dK += dS^T Q (scaled once at the end).
    3. ``_varlen_attention_bwd_dq_kernel``: one program owns BLOCK_M queries and loops over their
       keys: dQ += dS K.

Each output tile is written by exactly one program, so gradients are deterministic (flash-attn's
``deterministic=False`` path accumulates dQ with atomics instead); the price is computing Q K^T and
dO V^T twice (once per kernel): 7 instead of 5 matmuls of n^2 d for backward.
P = exp2(S * log2 e - lse * log2 e) is recomputed from the saved lse; a row with lse = +inf (no
key) gets P = 0.
"""

import torch
import triton
import triton.language as tl

from .triton import _attention_mask, _causal_kv_end, _seq_bounds, config, input_precision


@triton.jit
def _varlen_attention_bwd_preprocess_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    T,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_delta_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: delta for BLOCK_M packed tokens of head pid_h (sequences do not matter here).
    # Grid: (cdiv(T, BLOCK_M), H). Reads 2*BLOCK_M*d elements; writes BLOCK_M fp32.
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(o_ptr + rows * stride_ot + pid_h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + rows * stride_dot + pid_h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_h * stride_delta_h + offs_m, delta, mask=offs_m < T)


@triton.jit
def _varlen_attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lse_h,
    softmax_scale,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: dK, dV of BLOCK_N keys of one (sequence pid_b, head pid_h), looping over the
    # query blocks that attend to them. Grid: (cdiv(max_seqlen_k, BLOCK_N), H, B).
    # Reads 2*BLOCK_N*d (k, v) + 2*n_q*d (q, dO) + 2*n_q fp32; writes 2*BLOCK_N*d.
    # FLOPs: 8*BLOCK_N*n_q*d (S^T, dP^T, dV, dK).
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    k_start, seqlen_k = _seq_bounds(cu_seqlens_k_ptr, pid_b)
    if pid_n * BLOCK_N >= seqlen_k:
        return
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q_ptr, pid_b)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_kv = (offs_n < seqlen_k)[:, None] & mask_d[None, :]
    k_ptr += k_start * stride_kt + pid_h * stride_kh
    v_ptr += k_start * stride_vt + pid_h * stride_vh
    k = tl.load(k_ptr + offs_n[:, None] * stride_kt + offs_d[None, :], mask=mask_kv, other=0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vt + offs_d[None, :], mask=mask_kv, other=0.0)
    q_ptr += q_start * stride_qt + pid_h * stride_qh
    do_ptr += q_start * stride_dot + pid_h * stride_doh
    lse_ptr += pid_h * stride_lse_h + q_start
    delta_ptr += pid_h * stride_lse_h + q_start
    qk_scale = softmax_scale * 1.4426950408889634
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    q_begin = 0
    if CAUSAL:  # queries before this bound see none of these keys
        q_begin = tl.maximum(pid_n * BLOCK_N - (seqlen_k - seqlen_q), 0) // BLOCK_M * BLOCK_M
    for start_m in range(q_begin, seqlen_q, BLOCK_M):
        offs_qm = start_m + offs_m
        mask_m = offs_qm < seqlen_q
        mask_q = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + offs_qm[:, None] * stride_qt + offs_d[None, :], mask=mask_q, other=0.0)
        do = tl.load(do_ptr + offs_qm[:, None] * stride_dot + offs_d[None, :], mask=mask_q, other=0.0)
        lse = tl.load(lse_ptr + offs_qm, mask=mask_m, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_qm, mask=mask_m, other=0.0)
        # Transposed tiles [BLOCK_N, BLOCK_M]: rows are keys, so the dots below need no transposes.
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        # Queries past the sequence have lse = +inf, so P^T = 0 there; keys past it give rows of
        # dK, dV that are never stored: only the causal mask is needed.
        p_t = tl.exp2(s_t - lse[None, :])
        if CAUSAL:
            p_t = tl.where(offs_qm[None, :] + (seqlen_k - seqlen_q) >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    dk_ptr += k_start * stride_dkt + pid_h * stride_dkh
    dv_ptr += k_start * stride_dvt + pid_h * stride_dvh
    tl.store(
        dk_ptr + offs_n[:, None] * stride_dkt + offs_d[None, :],
        (dk * softmax_scale).to(dk_ptr.dtype.element_ty),
        mask=mask_kv,
    )
    tl.store(
        dv_ptr + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask_kv
    )


@triton.jit
def _varlen_attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_lse_h,
    softmax_scale,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: dQ of BLOCK_M queries of one (sequence pid_b, head pid_h), looping over their
    # keys. Grid: (cdiv(max_seqlen_q, BLOCK_M), H, B). Reads 2*BLOCK_M*d (q, dO) + 2*BLOCK_M fp32
    # + 2*n_k*d (k, v); writes BLOCK_M*d. FLOPs: 6*BLOCK_M*n_k*d (S, dP, dQ).
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    q_start, seqlen_q = _seq_bounds(cu_seqlens_q_ptr, pid_b)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    k_start, seqlen_k = _seq_bounds(cu_seqlens_k_ptr, pid_b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM
    mask_q = mask_m[:, None] & mask_d[None, :]
    q_ptr += q_start * stride_qt + pid_h * stride_qh
    do_ptr += q_start * stride_dot + pid_h * stride_doh
    q = tl.load(q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask_q, other=0.0)
    do = tl.load(do_ptr + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask_q, other=0.0)
    lse_offs = pid_h * stride_lse_h + q_start + offs_m
    lse = tl.load(lse_ptr + lse_offs, mask=mask_m, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + lse_offs, mask=mask_m, other=0.0)
    k_ptr += k_start * stride_kt + pid_h * stride_kh
    v_ptr += k_start * stride_vt + pid_h * stride_vh
    qk_scale = softmax_scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kv_end = _causal_kv_end(pid_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_kv = (offs_kn < seqlen_k)[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + offs_kn[:, None] * stride_kt + offs_d[None, :], mask=mask_kv, other=0.0)
        v = tl.load(v_ptr + offs_kn[:, None] * stride_vt + offs_d[None, :], mask=mask_kv, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        keep = _attention_mask(offs_m, offs_kn, seqlen_q, seqlen_k, CAUSAL)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    dq_ptr += q_start * stride_dqt + pid_h * stride_dqh
    tl.store(
        dq_ptr + offs_m[:, None] * stride_dqt + offs_d[None, :],
        (dq * softmax_scale).to(dq_ptr.dtype.element_ty),
        mask=mask_q,
    )


def _st(x):
    return x.stride(0), x.stride(1)


def varlen_attention_bwd(
    do,
    q,
    k,
    v,
    o,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    causal,
    dq,
    dk,
    dv,
):
    """Fill dq [T_q, H, d], dk, dv [T_k, H, d] (preallocated, possibly strided views of one d(qkv)).

    do, q, k, v, o: [T, H, d] with unit last stride; lse: [H, T_q] fp32 from the forward.
    """
    T, H, d = q.shape
    B = cu_seqlens_q.numel() - 1
    precision = input_precision(q.dtype)
    delta = torch.empty_like(lse)
    pre = config("dq", d, q.dtype, precision)
    _varlen_attention_bwd_preprocess_kernel[(triton.cdiv(T, pre["BLOCK_M"]), H)](
        o, do, delta, T, *_st(o), *_st(do), delta.stride(0),
        HEAD_DIM=d, BLOCK_M=pre["BLOCK_M"], BLOCK_D=pre["BLOCK_D"], num_warps=4,
    )  # fmt: skip
    cfg = config("dkdv", d, q.dtype, precision, causal)
    _varlen_attention_bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, cfg["BLOCK_N"]), H, B)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
        *_st(q), *_st(k), *_st(v), *_st(do), *_st(dk), *_st(dv), lse.stride(0), softmax_scale,
        CAUSAL=causal, HEAD_DIM=d, INPUT_PRECISION=precision, **cfg,
    )  # fmt: skip
    cfg = config("dq", d, q.dtype, precision, causal)
    _varlen_attention_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), H, B)](
        q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
        *_st(q), *_st(k), *_st(v), *_st(do), *_st(dq), lse.stride(0), softmax_scale,
        CAUSAL=causal, HEAD_DIM=d, INPUT_PRECISION=precision, **cfg,
    )  # fmt: skip
    return dq, dk, dv
