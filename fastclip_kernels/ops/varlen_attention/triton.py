"""Varlen (packed) attention in Triton, FlashAttention-2 style: forward kernel and launcher.

B sequences are packed along the token axis: sequence b owns rows cu_seqlens[b] : cu_seqlens[b+1]
of q [T_q, H, d] and k, v [T_k, H, d] (cu_seqlens_q / cu_seqlens_k, int32 [B + 1]). Per sequence
and head, with s = softmax_scale (default d^-1/2):

    S = s * Q K^T,   P = softmax(S) row-wise,   O = P V,   lse_i = log sum_j exp(S_ij)

computed block by block with an online softmax (running max m, running sum l, fp32, in base 2:
exp(x) = exp2(x * log2 e)), so no [n, n] matrix is ever stored. ``causal`` keeps key j for query i
iff j <= i + n_k - n_q (aligned to the bottom-right corner, as flash-attn >= 2.1); a query row that
sees no key (n_k = 0, or causal with n_k < n_q) outputs 0 and stores lse = +inf.

Backward (``triton_varlen_bwd``), with dO the upstream gradient and delta_i = sum_c dO_ic O_ic:

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = s * dS K,   dK = s * dS^T Q

where P is recomputed from Q, K and the saved lse. Tiles: the forward grid is
(cdiv(max_seqlen_q, BLOCK_M), H, B); programs whose query block starts past their sequence return
at once, so a batch pays for max_seqlen / mean_seqlen idle programs (cheap: two loads each).
The head dim is padded to BLOCK_D = next_pow2(d) with masks. Kernels use the vocabulary in
CONTRIBUTING.md (pid_*, offs_*, mask_*, *_ptr, BLOCK_*; T tokens, H heads).
"""

import torch
import triton
import triton.language as tl

from ..common import small_tiles

LOG2E = 1.4426950408889634


@triton.jit
def _seq_bounds(cu_seqlens_ptr, pid_b):
    """(first packed row of sequence pid_b as int64, its length)."""
    start = tl.load(cu_seqlens_ptr + pid_b)
    end = tl.load(cu_seqlens_ptr + pid_b + 1)
    return start.to(tl.int64), end - start


@triton.jit
def _attention_mask(offs_m, offs_n, seqlen_q, seqlen_k, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] keep-mask of (query offs_m, key offs_n) inside one sequence. Query rows
    past the sequence are not masked: their q is 0 (finite scores), and nothing of them is stored."""
    mask = offs_n[None, :] < seqlen_k
    if CAUSAL:
        mask = mask & (offs_m[:, None] + (seqlen_k - seqlen_q) >= offs_n[None, :])
    return mask


@triton.jit
def _causal_kv_end(pid_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Keys past this bound are masked for every query of block pid_m."""
    kv_end = seqlen_k
    if CAUSAL:
        kv_end = tl.minimum(seqlen_k, tl.maximum((pid_m + 1) * BLOCK_M + seqlen_k - seqlen_q, 0))
    return kv_end


@triton.jit
def _varlen_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lse_h,
    softmax_scale,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_M queries of one (sequence pid_b, head pid_h) against all keys of that
    # sequence (up to the causal bound). Grid: (cdiv(max_seqlen_q, BLOCK_M), H, B).
    # Reads BLOCK_M*d (q) + 2*n_k*d (k, v: L2 hits across the query blocks of a sequence);
    # writes BLOCK_M*d (o) + BLOCK_M fp32 (lse). FLOPs: 4*BLOCK_M*n_k*d.
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
    q_ptr += q_start * stride_qt + pid_h * stride_qh
    k_ptr += k_start * stride_kt + pid_h * stride_kh
    v_ptr += k_start * stride_vt + pid_h * stride_vh
    q = tl.load(
        q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    qk_scale = softmax_scale * 1.4426950408889634  # log2(e): the softmax runs in base 2
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kv_end = _causal_kv_end(pid_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_kv = (offs_kn < seqlen_k)[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + offs_kn[:, None] * stride_kt + offs_d[None, :], mask=mask_kv, other=0.0)
        v = tl.load(v_ptr + offs_kn[:, None] * stride_vt + offs_d[None, :], mask=mask_kv, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(_attention_mask(offs_m, offs_kn, seqlen_q, seqlen_k, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    o_ptr += q_start * stride_ot + pid_h * stride_oh
    tl.store(
        o_ptr + offs_m[:, None] * stride_ot + offs_d[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )
    tl.store(lse_ptr + pid_h * stride_lse_h + q_start + offs_m, lse, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Launcher: allocate, choose blocks, launch. Tensors in, tensors out; no autograd here.
# ----------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, num_warps) by (kernel, "half" | "fp32", BLOCK_D == 128). wgmma needs >= 64
# rows in the first operand: the query block of "fwd"/"dq", the key block (BLOCK_N) of "dkdv".
# Wide heads: the backward's [64, 128] fp32 accumulators need 8 warps and a smaller dK/dV query
# block. Each entry compiles for sm_90 without spills (tests/hopper_attention.py, triton 3.9).
TILES = {
    ("fwd", "half", False): (64, 64, 4),
    ("fwd", "half", True): (64, 64, 4),
    ("fwd", "fp32", False): (64, 32, 4),
    ("fwd", "fp32", True): (64, 32, 4),
    ("dq", "half", False): (64, 64, 4),
    ("dq", "half", True): (64, 64, 8),
    ("dq", "fp32", False): (64, 32, 4),
    ("dq", "fp32", True): (64, 32, 8),
    ("dkdv", "half", False): (64, 64, 4),
    ("dkdv", "half", True): (32, 64, 8),
    ("dkdv", "fp32", False): (16, 64, 4),
    ("dkdv", "fp32", True): (32, 64, 8),
    # fp32 without TF32 (input_precision "ieee", PyTorch's default): FMA dots, no wgmma, so no 64-row
    # minimum; the tf32 tiles spill here (fwd 1,000 B at d = 64 and 6,944 at d = 128, dK/dV 2,780).
    ("fwd", "fp32_fma", False): (64, 32, 8),
    ("fwd", "fp32_fma", True): (32, 64, 8),
    ("dq", "fp32_fma", False): (64, 32, 8),
    ("dq", "fp32_fma", True): (32, 16, 4),  # (32, 64, 8) spills 128 B with Triton 3.6 at d = 80
    ("dkdv", "fp32_fma", False): (32, 32, 8),
    ("dkdv", "fp32_fma", True): (16, 64, 8),
}
CAUSAL_TILES = {("dkdv", "fp32", True): (64, 64, 8)}  # (32, 64) spills 32 B with the causal mask


def config(kernel: str, head_dim: int, dtype: torch.dtype, precision: str, causal: bool = False) -> dict:
    """Tiles of ``kernel`` ("fwd", "dkdv", "dq"): a fixed table, no autotuning (one compile per
    (dtype, precision, d, causal)); the interpreter runs the same tiles, so CPU tests check their block
    logic (the tf32 "fp32" ones where tests/test_production_tiles.py forces the GPU configurations). ``precision``: the launch's ``input_precision(dtype)`` (fp32 "ieee" has its own tiles).

    fp16/bf16 fwd: 64 x 64 x 4 warps -- ViT lengths 50-260 fill 1-5 query blocks with at most 63
    padded rows; num_stages is Triton's default (3), the value tests/compile_for_hopper.py compiles.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype != torch.float32:
        kind = "half"
    else:
        kind = "fp32" if precision == "tf32" else "fp32_fma"
    key = (kernel, kind, block_d >= 128)
    block_m, block_n, num_warps = (causal and CAUSAL_TILES.get(key)) or TILES[key]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: "tf32" for fp32 where torch allows TF32 matmuls (not in the
    interpreter, which has no TF32, unless a test forces the GPU configurations there: its dots
    stay exact fp32, so the "fp32" tiles then run with fp32 numerics), else "ieee"."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not small_tiles():
        return "tf32"
    return "ieee"


def varlen_attention_fwd(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, softmax_scale: float, causal: bool
):
    """(o [T_q, H, d] in q's dtype, lse [H, T_q] fp32). q, k, v: [T, H, d] views with unit last stride."""
    T, H, d = q.shape
    B = cu_seqlens_q.numel() - 1
    precision = input_precision(q.dtype)
    cfg = config("fwd", d, q.dtype, precision, causal)
    o = torch.empty((T, H, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), H, B)
    _varlen_attention_fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o.stride(0),
        o.stride(1),
        lse.stride(0),
        softmax_scale,
        CAUSAL=causal,
        HEAD_DIM=d,
        INPUT_PRECISION=precision,
        **cfg,
    )
    return o, lse
